"""baselines/ppo.py: online PPO (Schulman et al. 2017) for RLHF (Ziegler et al. 2019), the paper's RL baseline, with
the toxicity scorer as the reward model.

Objective (x a prompt, y ~ π_θ(·|x), p_0 the initial model, λ = --kl-coef):
    max_θ  E_x E_{y ~ π_θ(·|x)} [ r(x, y) − λ · Σ_t log( π_θ(y_t | x, y<t) / p_0(y_t | x, y<t) ) ]
    r(x, y) = 1 − toxicity(y)   (the scorer: scorers.make_scorer)
Per-token rewards of a rollout, t = 1..T over y's tokens (the EOS that ended y included):
    r_t = −λ · (log π_old(y_t|x, y<t) − log p_0(y_t|x, y<t))  +  1[t = T] · r(x, y)
GAE with the value head V (a linear layer on π_θ's last hidden state), V(s_{T+1}) = 0:
    δ_t = r_t + γ V(s_{t+1}) − V(s_t),   A_t = Σ_l (γ λ_gae)^l δ_{t+l},   R_t = A_t + V(s_t)
Clipped losses per response token (ρ_t = π_θ(y_t|·) / π_old(y_t|·), Â = A whitened over the rollout batch),
minimised for --ppo-epochs passes of shuffled minibatches per rollout batch:
    L_pg = E[ max(−Â ρ_t, −Â clip(ρ_t, 1 − ε, 1 + ε)) ]
    L_V  = ½ E[ max((V − R)², (V_old + clip(V − V_old, −ε_V, ε_V) − R)²) ]
    loss = L_pg + c_V · L_V
Adaptive KL (--target-kl, Ziegler et al.): λ ← λ · (1 + clip(KL/target − 1, −0.2, 0.2) · n_rollouts/horizon).
Rollouts come from sample.generate_batched (nucleus top_p, temperature, control tokens suppressed, as sample.py), with
y's exact token ids; the log-probs mask the same control tokens, so π_old is exactly the sampling distribution.

Input  --prompts JSONL (common.load_prompts), --model p_0 (π_θ starts from it), --scorer (scorers.make_scorer spec).
Output --out RUN: RUN/ppo_log.jsonl, a row per update {update, generations, score, toxicity, kl, kl_coef, pg_loss,
       vf_loss, clipfrac, approx_kl, ...}; every --save-every updates RUN/iter_k/model/: save_pretrained + tokenizer +
       value_head.safetensors + train_summary.json (method "ppo", generations_sampled: rollouts drawn so far, read by
       alt_loop.py --compare); RUN/ppo_summary.json at the end. The newest iter_k/model also holds state.pt (Adam
       moments, λ, counters): a rerun resumes from it, bit-identical to an uninterrupted run, and a finished RUN
       prints "done" (a larger --updates extends it).
       With --eval, evaluate.py measures p_0 into RUN/iter_0/eval and each checkpoint into RUN/iter_k/eval, with
       alt_loop.py's flags, so the run folder compares directly with ALT's.
Launch, from the repo root (elsewhere: PYTHONPATH=REPO):
    python -m baselines.ppo --model toy/model --prompts toy/prompts/train.jsonl --out runs/toy-ppo --eval
    python evaluate.py --model runs/toy-ppo/iter_1/model --condition none --out runs/toy-ppo/iter_1/eval \
        --prompts toy/prompts/val.jsonl --num-samples 10 --seed 0 --fluency-model toy/model      # what --eval runs
    python alt_loop.py --compare runs/toy-alt-rm runs/toy-quark runs/toy-dpo runs/toy-ppo --out runs/compare
"""

import argparse
import glob
import os
import random
import shlex
import shutil
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file, save_file

import bookkeeping
import common
import train
from bookkeeping import AltError
from sample import generate_batched
from scorers import make_scorer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
rel = lambda *p: os.path.relpath(os.path.join(ROOT, *p))  # noqa: E731  repo paths, short in printed commands


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="ppo.py",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    # ---- defaults block: the toy (80 updates x 32 prompts x 4 samples = 10240 rollouts, > ALT's 9600 in alt_loop)
    a(
        "--model",
        default=rel("toy", "model"),
        help="p_0: the start of π_θ and the KL reference (paper: GPT-2 large)",
    )
    a(
        "--prompts",
        default=rel("toy", "prompts", "train.jsonl"),
        help="training prompts x (paper: RTP train)",
    )
    a("--out", default="runs/toy-ppo", help="run folder")
    a(
        "--scorer",
        default="profanity-check",
        help="reward model: r = 1 − toxicity (paper: Perspective API)",
    )
    a("--updates", type=int, default=80, help="rollout batches (PPO iterations)")
    a("--rollout-prompts", type=int, default=32, help="prompts per rollout batch")
    a(
        "--num-samples",
        type=int,
        default=4,
        help="y per prompt per rollout batch (as sample.py / alt_loop)",
    )
    a("--max-new-tokens", type=int, default=20, help="rollout length (paper: 20)")
    a(
        "--min-new-tokens",
        type=bookkeeping.finite(0, kind=int),
        default=3,
        help="EOS blocked for the first N tokens (official sampler: 3; = --max-new-tokens: fixed length)",
    )
    a("--top-p", type=float, default=1.0, help="rollout nucleus p (paper's training samples: 1.0)")
    a("--temperature", type=float, default=1.0, help="rollout temperature (paper: 1.0)")
    a(
        "--kl-coef",
        type=float,
        default=0.2,
        help="λ of the per-token KL penalty to p_0 (Ziegler et al. / TRL: 0.2; "
        "at 0.05 the toy policy learns to stop early, mean length 17 -> 4 tokens in 20 updates)",
    )
    a(
        "--target-kl",
        type=float,
        default=None,
        help="adaptive λ toward this KL per sequence (Ziegler: 6 nats; off)",
    )
    a(
        "--horizon",
        type=float,
        default=10000,
        help="adaptive-KL horizon in rollouts (Ziegler et al.: 10000)",
    )
    a("--gamma", type=float, default=1.0, help="discount γ (RLHF: 1)")
    a("--lam", type=float, default=0.95, help="GAE λ_gae (Ziegler et al. / TRL: 0.95)")
    a("--clip", type=float, default=0.2, help="policy ratio clip ε (PPO: 0.2)")
    a("--vf-clip", type=float, default=0.2, help="value clip ε_V (TRL: 0.2)")
    a("--vf-coef", type=float, default=0.1, help="value-loss weight c_V (TRL: 0.1)")
    a(
        "--ppo-epochs",
        type=int,
        default=2,
        help="passes over each rollout batch (TRL: 4; 2 keeps the toy run short)",
    )
    a("--minibatch", type=int, default=32, help="rollouts per gradient step")
    a(
        "--lr",
        type=float,
        default=2e-5,
        help="AdamW learning rate (Ziegler et al. GPT-2: 1.41e-5; toy: 2e-5)",
    )
    a("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip")
    a("--gen-batch-size", type=int, default=64, help="prompts per model.generate call")
    a(
        "--save-every",
        type=int,
        default=20,
        help="write RUN/iter_k/model every N updates (toy: 4 checkpoints)",
    )
    a("--seed", type=int, default=0, help="prompt order, rollouts, minibatches")
    a(
        "--eval",
        action="store_true",
        help="run evaluate.py on p_0 and on each checkpoint (commands are printed)",
    )
    a(
        "--eval-prompts",
        default=rel("toy", "prompts", "val.jsonl"),
        help="--eval prompts (alt_loop: toy val)",
    )
    a(
        "--eval-samples",
        type=int,
        default=10,
        help="--eval samples per prompt (alt_loop: 10; paper: 25)",
    )
    a("--eval-args", default="", help="extra evaluate.py flags for --eval (a quoted string)")
    a("--overwrite", action="store_true", help="delete RUN's checkpoints and log and start over")
    a("--trust-remote-code", action="store_true", help="allow custom model code (off: GPT-2)")
    args = p.parse_args(argv)
    for name in (
        "updates",
        "rollout_prompts",
        "num_samples",
        "max_new_tokens",
        "ppo_epochs",
        "minibatch",
        "gen_batch_size",
        "save_every",
        "eval_samples",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not (
        args.lr > 0
        and args.kl_coef >= 0
        and args.clip > 0
        and args.vf_clip > 0
        and 0 < args.top_p <= 1
        and args.temperature > 0
        and 0 <= args.gamma <= 1
        and 0 <= args.lam <= 1
    ):
        p.error(
            "need --lr, --clip, --vf-clip, --temperature > 0, --kl-coef >= 0, --top-p in (0, 1], γ, λ in [0, 1]"
        )
    if args.target_kl is not None and not (args.target_kl > 0 and args.kl_coef > 0):
        p.error("--target-kl must be > 0 and needs --kl-coef > 0")
    return args


# ----------------------------------------------------------------------------- the PPO pieces (tested vs brute force)
def kl_rewards(logp, ref_logp, scores, mask, kl_coef):
    """r_t = −λ (log π(y_t) − log p_0(y_t)) on every response token, + r(x, y) on y's last one: [B, R]."""
    rewards = -kl_coef * (logp - ref_logp) * mask
    last = mask.long().sum(1) - 1  # y is right-padded: its last token's column
    rewards[torch.arange(len(rewards)), last] += scores
    return rewards


def gae(rewards, values, mask, gamma, lam):
    """Rewards, V(s_t) and the response mask [B, R] (right-padded) -> (advantages A_t, returns R_t) [B, R]."""
    # padding: r = 0 and V = 0, so V(s_{T+1}) = 0 past y's end
    rewards, values = rewards * mask, values * mask
    adv, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_v = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        # δ_t + γλ A_{t+1}
        running = rewards[:, t] + gamma * next_v - values[:, t] + gamma * lam * running
        adv[:, t] = running
    return adv * mask, (adv + values) * mask


def whiten(x, mask):
    n, mean = mask.sum(), (x * mask).sum() / mask.sum()
    return (
        (x - mean)
        * torch.rsqrt((((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1) + 1e-8)
        * mask
    )


def ppo_losses(logp, old_logp, adv, values, old_values, returns, mask, clip, vf_clip):
    """Clipped policy loss and clipped value loss, token means over the mask, and diagnostics."""
    n = mask.sum()
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    v_clipped = old_values + (values - old_values).clamp(-vf_clip, vf_clip)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    with torch.no_grad():
        stats = dict(
            clipfrac=((((ratio - 1).abs() > clip) & mask).sum() / n).item(),
            approx_kl=((0.5 * (logp - old_logp) ** 2 * mask).sum() / n).item(),
        )
    return (pg * mask).sum() / n, (vf * mask).sum() / n, stats


def forward(model, batch, control_ids, value_head=None):
    """log π(y_t | x, y<t) [B, R] with control tokens masked as sampling masks them (0 at padding), and V(s_t)."""
    R = batch["targets"].shape[1]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=R + 1,
        use_cache=False,
        output_hidden_states=value_head is not None,
    )
    logits = out.logits[:, :-1].float()  # [B, R, V]: column P-1+t predicts y_t
    if len(control_ids):
        logits = logits.index_fill(-1, control_ids, float("-inf"))
    mask = batch["resp_mask"]
    logp = (
        torch.log_softmax(logits, -1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1) * mask
    )
    if value_head is None:
        return logp, None
    # [B, R, H]: the state s_t = (x, y<t) before y_t
    hidden = out.hidden_states[-1][:, -(R + 1) : -1]
    return logp, value_head(hidden.float()).squeeze(-1) * mask


def take(batch, idx):
    """Rows idx of a collated batch, trimmed of the columns that are padding in all of them."""
    sub = {k: v[idx] for k, v in batch.items()}
    lead = int(sub["attention_mask"].any(0).int().argmax())  # the first column any row uses
    r = int(sub["resp_mask"].any(0).sum())  # y is right-padded: the response columns any row uses
    end = sub["input_ids"].shape[1] - sub["targets"].shape[1] + r
    return {
        k: v[:, lead:end] if k in ("input_ids", "attention_mask", "position_ids") else v[:, :r]
        for k, v in sub.items()
    }


def learn(policy, ref, value_head, optimizer, batch, scores, control, kl_coef, args, seed):
    """One PPO update on a rollout batch (N rollouts): π_old / p_0 log-probs and V_old, per-token rewards r_t, GAE,
    then --ppo-epochs passes of clipped minibatch steps. -> mean diagnostics, KL per sequence, tokens processed."""
    device = next(policy.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    mask, N, mb = batch["resp_mask"], len(scores), args.minibatch
    chunks = torch.arange(N, device=device).split(mb)
    with torch.no_grad():
        wide = lambda t: torch.nn.functional.pad(t, (0, mask.shape[1] - t.shape[1]))  # noqa: E731  back to [., R]
        old_logp, old_v = (
            torch.cat([wide(x) for x in t])
            for t in zip(*[forward(policy, take(batch, c), control, value_head) for c in chunks])
        )
        ref_logp = torch.cat([wide(forward(ref, take(batch, c), control)[0]) for c in chunks])
        rewards = kl_rewards(old_logp, ref_logp, scores.to(device), mask, kl_coef)
        adv, returns = gae(rewards, old_v, mask, args.gamma, args.lam)
        adv = whiten(adv, mask)
    gen = torch.Generator().manual_seed(seed)
    sums, n_steps, tokens = dict(pg_loss=0.0, vf_loss=0.0, clipfrac=0.0, approx_kl=0.0), 0, 0
    for _ in range(args.ppo_epochs):
        perm = torch.randperm(N, generator=gen).to(device)
        for i in perm.split(mb):
            sub = take(batch, i)
            r = sub["targets"].shape[1]
            logp, v = forward(policy, sub, control, value_head)
            pg, vf, st = ppo_losses(
                logp,
                old_logp[i, :r],
                adv[i, :r],
                v,
                old_v[i, :r],
                returns[i, :r],
                sub["resp_mask"],
                args.clip,
                args.vf_clip,
            )
            (pg + args.vf_coef * vf).backward()
            torch.nn.utils.clip_grad_norm_(
                [*policy.parameters(), *value_head.parameters()], args.max_grad_norm
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for k, val in dict(pg_loss=pg.item(), vf_loss=vf.item(), **st).items():
                sums[k] += val
            n_steps, tokens = n_steps + 1, tokens + int(sub["attention_mask"].sum())
    return dict(
        kl=((old_logp - ref_logp) * mask).sum(1).mean().item(),
        **{k: v / n_steps for k, v in sums.items()},
        mean_len=mask.sum(1).float().mean().item(),
        tokens=tokens + 2 * int(batch["attention_mask"].sum()),
    )


# ----------------------------------------------------------------------------- rollouts, checkpoints, evaluation
def prompt_batch(n_prompts, size, update, seed):
    """Indices of the update's prompts: a fresh shuffle of all prompts per pass, walked in order."""
    start, end = update * size, (update + 1) * size
    order = [
        i
        for epoch in range(start // n_prompts, (end - 1) // n_prompts + 1)
        for i in random.Random(f"{seed}-{epoch}").sample(range(n_prompts), n_prompts)
    ]
    return order[start % n_prompts : start % n_prompts + size]


def rollout(policy, tok, prompts, score, args, update):
    """y ~ π_θ(·|x), r = 1 − toxicity(y) -> (collated batch of (x, y) ids, scores [N], texts, counts)."""
    inputs = [p["prompt"] for p in prompts]
    outs = generate_batched(
        policy,
        tok,
        inputs,
        args.num_samples,
        args.max_new_tokens,
        args.top_p,
        args.temperature,
        args.gen_batch_size,
        seed=args.seed * 1_000_003 + update,
        progress=False,
        return_ids=True,
        min_new_tokens=min(args.min_new_tokens, args.max_new_tokens),
    )
    flat = [(i, y) for i, ys in enumerate(outs) for y in ys]
    tox = score([y["generation"] for _, y in flat])
    # scorer failures: dropped, counted
    keep = [(i, y, t) for (i, y), t in zip(flat, tox) if t is not None]
    if not keep:
        raise AltError(
            f"update {update + 1}: the scorer returned no score for any of {len(flat)} rollouts"
        )
    ctx = bookkeeping.context_length(policy.config)
    eos, pre = (
        tok.eos_token_id,
        [t[-(ctx - args.max_new_tokens) :] for t in tok(inputs)["input_ids"]],
    )
    bos = tok.bos_token_id if tok.bos_token_id is not None else eos
    # x as generate saw it
    pairs = [
        train.pack(pre[i], y["ids"], None if y["truncated"] else eos, bos, ctx) for i, y, _ in keep
    ]
    scores = torch.tensor([1.0 - t for _, _, t in keep])
    return (
        train.collate(pairs, tok.pad_token_id),
        scores,
        [y["generation"] for _, y, _ in keep],
        dict(drawn=len(flat), unscored=len(flat) - len(keep)),
    )


def save_iter(out, k, policy, tok, value_head, summary, state):
    """RUN/iter_k/model with the value head and the summary (bookkeeping.save_checkpoint: written, then swapped in);
    only the newest checkpoint keeps its resume state.pt."""

    def extra(folder):
        head = {n: t.contiguous() for n, t in value_head.state_dict().items()}
        save_file(head, os.path.join(folder, "value_head.safetensors"))
        bookkeeping.write_json(os.path.join(folder, "train_summary.json"), summary)

    # a run extended past a partial last checkpoint
    shutil.rmtree(os.path.join(out, f"iter_{k}", "eval"), ignore_errors=True)
    bookkeeping.save_checkpoint(
        os.path.join(out, f"iter_{k}"), policy, tok, state, name="model", extra=extra
    )
    for old in checkpoints(out, "state.pt")[:-1]:
        os.remove(old)


def checkpoints(out, name):
    """RUN/iter_k/model/NAME paths, by k."""
    return sorted(
        glob.glob(os.path.join(out, "iter_*", "model", name)),
        key=lambda p: int(p.split(os.sep)[-3][5:]),
    )


def evaluate_all(args):
    """evaluate.py on p_0 (iter_0) and every checkpoint without an eval yet, with alt_loop.py's evaluation flags."""
    todo = [(args.model, os.path.join(args.out, "iter_0", "eval"))]
    todo += [
        (os.path.dirname(s), os.path.join(os.path.dirname(os.path.dirname(s)), "eval"))
        for s in checkpoints(args.out, "train_summary.json")
    ]
    for model, out in todo:
        if os.path.exists(os.path.join(out, "eval.json")):
            continue
        cmd = [
            rel("evaluate.py"),
            "--model",
            model,
            "--condition",
            "none",
            "--out",
            out,
            "--prompts",
            args.eval_prompts,
            "--num-samples",
            str(args.eval_samples),
            "--seed",
            str(args.seed),
            "--fluency-model",
            args.model,
            *shlex.split(args.eval_args),
        ]
        print(f"\n[ppo] $ python {' '.join(map(shlex.quote, cmd))}", flush=True)
        if subprocess.run([sys.executable, *cmd]).returncode != 0:
            raise AltError(f"evaluation failed: python {' '.join(map(shlex.quote, cmd))}")


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    # --overwrite deletes parts of --out: no input may be, hold or lie inside it
    bookkeeping.refuse_overlap(
        {"--out": args.out},
        {"--model": args.model, "--prompts": args.prompts, "--eval-prompts": args.eval_prompts},
    )
    done_path, log_path = (
        os.path.join(args.out, "ppo_summary.json"),
        os.path.join(args.out, "ppo_log.jsonl"),
    )
    stale = glob.glob(os.path.join(args.out, "iter_*")) + glob.glob(
        os.path.join(args.out, "ppo_*.json*")
    )
    # a finished RUN with fewer --updates than asked is extended; evaluations are extras, not settings
    done = os.path.exists(done_path) and not args.overwrite
    extend = done and bookkeeping.read_json(done_path)["updates"] < args.updates
    keep = {k: v for k, v in vars(args).items() if k != "updates" and not k.startswith("eval")}
    say = f"extending {args.out} to {args.updates} updates" if extend else "done"
    finished = bookkeeping.finished("ppo.py", args.out, keep, [done_path], stale, say)
    if finished and not extend:
        if args.eval:
            evaluate_all(args)
        return
    prompts = common.load_prompts(args.prompts)
    if len(prompts) < args.rollout_prompts or any(not p["prompt"].strip() for p in prompts):
        raise AltError(
            f"{args.prompts}: PPO needs >= --rollout-prompts ({args.rollout_prompts}) prompts, none empty "
            f"(found {len(prompts)}, {sum(not p['prompt'].strip() for p in prompts)} empty)"
        )
    score = make_scorer(args.scorer)  # before any model: a bad spec fails at once
    if args.eval:
        evaluate_all(args)
    device = bookkeeping.default_device_dtype()[0]
    ck = ([os.path.dirname(p) for p in checkpoints(args.out, "state.pt")] or [None])[-1]
    policy, tok = common.load_policy(
        ck or args.model, device, "float32", trust_remote_code=args.trust_remote_code
    )
    ref, _ = common.load_policy(
        args.model, device, "float32", trust_remote_code=args.trust_remote_code
    )
    ref.eval().requires_grad_(False)
    # dropout off: ρ = 1 on the first minibatch, as PPO assumes (the toy has no dropout anyway)
    policy.eval()
    value_head = torch.nn.Linear(policy.config.hidden_size, 1).to(device)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    control = torch.tensor(common.control_token_ids(tok), dtype=torch.long, device=device)
    optimizer = torch.optim.AdamW(
        [*policy.parameters(), *value_head.parameters()], lr=args.lr, eps=1e-5, weight_decay=0.0
    )
    fingerprint = {
        k: getattr(args, k)
        for k in (
            "model",
            "prompts",
            "scorer",
            "rollout_prompts",
            "num_samples",
            "max_new_tokens",
            "top_p",
            "temperature",
            "seed",
            "save_every",
        )
    }
    update, generations, kl_coef = 0, 0, args.kl_coef
    if ck:
        value_head.load_state_dict(
            load_file(os.path.join(ck, "value_head.safetensors"), device=device)
        )
        state = bookkeeping.load_checkpoint(ck, fingerprint, optimizer)
        update, generations, kl_coef = state["update"], state["generations"], state["kl_coef"]
        print(f"[ppo] resuming after update {update} from {ck}", flush=True)
    log_fh = bookkeeping.open_log(log_path, update, key="update")
    t_start, last = time.time(), {}

    while update < args.updates:
        t0 = time.time()
        idx = prompt_batch(len(prompts), args.rollout_prompts, update, args.seed)
        batch, scores, texts, counts = rollout(
            policy, tok, [prompts[i] for i in idx], score, args, update
        )
        t_roll = time.time() - t0
        stats = learn(
            policy,
            ref,
            value_head,
            optimizer,
            batch,
            scores,
            control,
            kl_coef,
            args,
            seed=args.seed * 1_000_003 + update,
        )
        t_upd = time.time() - t0 - t_roll
        update, generations = update + 1, generations + counts["drawn"]
        if args.target_kl:  # Ziegler et al.'s proportional controller, clipped to ±20% per horizon
            kl_coef *= (
                1
                + max(-0.2, min(0.2, stats["kl"] / args.target_kl - 1)) * len(scores) / args.horizon
            )
        last = dict(
            update=update,
            generations=generations,
            score=scores.mean().item(),
            toxicity=1 - scores.mean().item(),
            kl_coef=kl_coef,
            **stats,
            empty_share=sum(not t for t in texts) / len(texts),
            unscored=counts["unscored"],
            rollout_s=round(t_roll, 2),
            update_s=round(t_upd, 2),
            tokens_per_s=round(stats["tokens"] / max(t_upd, 1e-9), 1),
        )
        bookkeeping.append_jsonl(log_fh, last)
        print(
            f"[ppo] update {update}/{args.updates}  gens {generations}  score {last['score']:.3f}  "
            f"kl {stats['kl']:.3f}  λ {kl_coef:.4f}  clipfrac {last['clipfrac']:.3f}  ({t_roll:.1f}+{t_upd:.1f} s)",
            flush=True,
        )
        if update % args.save_every == 0 or update == args.updates:
            k = -(-update // args.save_every)
            summary = dict(
                method="ppo",
                tags=None,
                exemplar=None,
                model=args.model,
                ref_model=args.model,
                generations_sampled=generations,
                updates=update,
                kl_coef=kl_coef,
                final=last,
                args=vars(args),
            )
            state = dict(
                update=update,
                generations=generations,
                kl_coef=kl_coef,
                fingerprint=fingerprint,
                optimizer=optimizer.state_dict(),
            )
            save_iter(args.out, k, policy, tok, value_head, summary, state)
            print(
                f"[ppo] checkpoint {args.out}/iter_{k}/model ({generations} generations sampled)",
                flush=True,
            )
            if args.eval:
                evaluate_all(args)
    log_fh.close()
    bookkeeping.write_json(
        done_path,
        dict(
            updates=update,
            generations_sampled=generations,
            final=last,
            seconds=round(time.time() - t_start, 1),
            args=vars(args),
        ),
    )
    print(f"ppo.py: {update} updates, {generations} generations -> {args.out}")


if __name__ == "__main__":
    bookkeeping.cli(main)
