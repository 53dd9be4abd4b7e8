"""baselines/dpo.py: iterative DPO (Rafailov et al. 2023) on ALT's datapool, the paper's offline preference baseline.

Objective, per prompt x of D_k (y_w its highest-reward sample, y_l its lowest; π_ref = p_0, β = --beta):
    L_DPO(π_θ) = −E_(x, y_w, y_l)~D_k [ log σ( β·[log π_θ(y_w|x) − log π_ref(y_w|x)]
                                            − β·[log π_θ(y_l|x) − log π_ref(y_l|x)] ) ]
log π(y|x) = Σ_t log π(y_t | x, y<t) is the exact sequence log-prob over y's tokens only (no EOS target, as
train.py). The policy and π_ref see x alone, never feedback: DPO uses the rewards, not the tags.

Input  --data POOL.jsonl: datapool rows (common.py schema; uses prompt_id, prompt, generation, reward, truncated), e.g.
       feedback.py --method alt-rm's D_k (all iterations so far). Pairs: rows grouped by prompt_id; y_w = max reward,
       y_l = min reward (the first in file order on ties). Skipped and counted: reward=null rows, empty generations
       (as train.py: an instant EOS would be rewarded as non-toxic), prompts left with one sample, prompts whose
       rewards are all tied, and pairs whose rewards differ by less than --min-margin (the judge's noise). A pool without rewards, or with no pair at all, is a one-line error (exit 2).
Output --out DIR, as train.py: save_pretrained (safetensors) + tokenizer; DIR/train_log.jsonl, a row per step {step,
       epoch, loss, reward_acc, margin, chosen, rejected, lr, grad_norm, tokens, tokens_per_s}; DIR/train_summary.json
       (method "dpo", counts, final row, args). DIR/checkpoint/ holds the resume state while running; a finished DIR
       makes a rerun print "done".
Launch, from the repo root (elsewhere: PYTHONPATH=REPO); alt_loop.py --method dpo runs exactly this after sample.py
and feedback.py --method alt-rm:
    python -m baselines.dpo --data runs/toy-dpo/iter_2/pool.jsonl --model runs/toy-dpo/iter_1/model \
        --ref-model toy/model --out runs/toy-dpo/iter_2/model --beta 0.1 --lr 1e-4 --batch-size 32
"""

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

import bookkeeping
import common
import launch
import train
from bookkeeping import AltError


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="dpo.py",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # ---- defaults block (DPO paper, Rafailov et al. 2023, and train.py's for the rest)
    p.add_argument(
        "--data", required=True, help="datapool D_k with rewards (JSONL from feedback.py)"
    )
    p.add_argument(
        "--model",
        required=True,
        help="start checkpoint: the previous iteration's θ (iteration 1: p_0)",
    )
    p.add_argument(
        "--ref-model", help="π_ref (ALT's comparison: p_0, the initial model); default --model"
    )
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--beta", type=float, default=0.1, help="DPO temperature β (DPO paper: 0.1)")
    p.add_argument(
        "--min-margin",
        type=float,
        default=0.25,
        help="skip a pair whose rewards differ by less (ours: "
        "below it a near-binary judge's gap is mostly noise, and DPO would learn the noise)",
    )
    p.add_argument("--epochs", type=int, default=1, help="passes over the pairs per iteration")
    p.add_argument(
        "--batch-size", type=int, default=32, help="pairs per step (ALT paper's batch: 32)"
    )
    p.add_argument(
        "--lr",
        type=float,
        default=1e-5,
        help="AdamW learning rate (as train.py; alt_loop passes 1e-4)",
    )
    p.add_argument(
        "--warmup-ratio",
        type=float,
        default=0.05,
        help="linear-warmup share of steps, then linear decay",
    )
    p.add_argument(
        "--max-grad-norm", type=float, help="clip the gradient norm (DPO reference code: 10; off)"
    )
    p.add_argument(
        "--save-every", type=int, default=100, help="write the resume checkpoint every N steps"
    )
    p.add_argument("--seed", type=int, default=0, help="batch order")
    p.add_argument("--overwrite", action="store_true", help="retrain even if --out is finished")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom model code (off: GPT-2)"
    )
    a = p.parse_args(argv)
    if min(a.epochs, a.batch_size, a.save_every) < 1:
        p.error("--epochs, --batch-size and --save-every must be >= 1")
    if not (a.lr > 0 and a.beta > 0 and 0 <= a.warmup_ratio <= 1 and a.min_margin >= 0):
        p.error("need --lr > 0, --beta > 0, 0 <= --warmup-ratio <= 1 and --min-margin >= 0")
    return a


# ----------------------------------------------------------------------------- D_k -> preference pairs
def make_pairs(rows, path, lines=None, min_margin=0.0):
    """Pool rows -> ([(y_w row, y_l row)], counts): per prompt_id, the max- and min-reward samples, if their rewards
    differ by at least min_margin."""
    lines = lines or list(range(1, len(rows) + 1))
    counts = dict(
        read=len(rows),
        null_reward=0,
        empty_generation=0,
        single_sample=0,
        all_tied=0,
        small_margin=0,
    )
    groups, ids = {}, {}
    for line, r in zip(lines, rows):
        if "reward" not in r:
            raise AltError(
                f"{path}:{line}: no 'reward' (DPO ranks samples by reward: make the pool with "
                "feedback.py --method alt-rm)"
            )
        bookkeeping.check_row(f"{path}:{line}", r, common.POOL_ROW)
        x = bookkeeping.prompt_key(path, line, r, ids)
        rew = r["reward"]
        if rew is None:
            counts["null_reward"] += 1
        elif not r["generation"]:
            counts["empty_generation"] += 1
        else:
            groups.setdefault(x, []).append(r)
    pairs = []
    for g in groups.values():
        # first one wins a tie
        w, l = max(g, key=lambda r: r["reward"]), min(g, key=lambda r: r["reward"])  # noqa: E741
        if len(g) < 2:
            counts["single_sample"] += 1
        elif w["reward"] == l["reward"]:
            counts["all_tied"] += 1
        elif w["reward"] - l["reward"] < min_margin:
            counts["small_margin"] += 1
        else:
            pairs.append((w, l))
    counts["pairs"] = len(pairs)
    if not pairs:
        raise AltError(
            f"{path}: no prompt has two scored samples with different rewards, so no DPO pair ({counts})"
        )
    return pairs, counts


def encode_pairs(pairs, tokenizer, max_length):
    """Pairs -> [{"w": (x ids, y_w ids), "l": (x ids, y_l ids), "x_len", "response"}], with train.py's encoding
    (x and y tokenised apart, no EOS target). x_len/response feed train.plan_epoch's length buckets."""

    def strip(r):
        return {
            "prompt": r["prompt"],
            "generation": r["generation"],
            "truncated": r.get("truncated"),
        }

    ew, el = (
        train.encode_rows([strip(p[i]) for p in pairs], tokenizer, max_length, reference=False)
        for i in (0, 1)
    )
    return [
        {
            "w": (a["prefix"], a["response"]),
            "l": (b["prefix"], b["response"]),
            "x_len": a["x_len"],
            "response": max(a["response"], b["response"], key=len),
        }
        for a, b in zip(ew, el)
    ]


# ----------------------------------------------------------------------------- the DPO loss
def sequence_logprobs(model, batch):
    """log π(y | x) = Σ_t log π(y_t | x, y<t) over response tokens only: [B]."""
    return train.response_logprobs(model, batch).sum(1)


def dpo_loss(pi_w, pi_l, ref_w, ref_l, beta):
    """Sequence log-probs [B] each -> (mean loss, margins [B]):
    −log σ(β·[log π(y_w|x) − log π_ref(y_w|x)] − β·[log π(y_l|x) − log π_ref(y_l|x)])."""
    margin = beta * (pi_w - ref_w) - beta * (pi_l - ref_l)
    return -F.logsigmoid(margin).mean(), margin


def pair_batch(examples, pad_id):
    """B pairs -> one collated batch of 2B rows: y_w's in rows 0..B-1, y_l's in rows B..2B-1."""
    return train.collate([e["w"] for e in examples] + [e["l"] for e in examples], pad_id)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun would start N copies racing on one --out
        raise AltError("dpo.py runs in one process: use alt_loop.py --launcher python")
    # --overwrite deletes parts of --out: no input may be, hold or lie inside it
    bookkeeping.refuse_overlap(
        {"--out": args.out},
        {"--data": args.data, "--model": args.model, "--ref-model": args.ref_model},
    )
    summary_path, log_path = (
        os.path.join(args.out, n) for n in ("train_summary.json", "train_log.jsonl")
    )
    done = [summary_path]
    if bookkeeping.finished("dpo.py", args.out, args, done, done, "done"):
        return
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    rows = bookkeeping.read_jsonl(args.data, required=("prompt", "generation"), numbered=True)
    lines, rows = [line for line, _ in rows], [r for _, r in rows]
    pairs, counts = make_pairs(rows, args.data, lines, args.min_margin)
    device = bookkeeping.default_device_dtype()[0]
    ck = None if args.overwrite else bookkeeping.find_checkpoint(args.out)
    model, tok = common.load_policy(
        ck or args.model, device, "float32", trust_remote_code=args.trust_remote_code
    )
    ref_path = args.ref_model or args.model
    ref, ref_tok = common.load_policy(
        ref_path, device, "float32", trust_remote_code=args.trust_remote_code
    )
    if ref_tok.get_vocab() != tok.get_vocab():
        raise AltError(f"{ref_path}: π_ref's vocabulary differs from {args.model}'s")
    ref.eval().requires_grad_(False)
    # dropout off: π_θ = π_ref exactly at step 0 (loss log 2), and log-ratios are not noise (the toy has none anyway)
    model.eval()
    examples = encode_pairs(pairs, tok, bookkeeping.context_length(model.config))
    B = args.batch_size
    if len(examples) < B:
        raise AltError(
            f"{args.data}: {len(examples)} pairs, fewer than one batch of {B} (lower --batch-size)"
        )
    steps_per_epoch = len(examples) // B
    total_steps = steps_per_epoch * args.epochs

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, round(args.warmup_ratio * total_steps), total_steps
    )
    fingerprint = dict(
        data=os.path.abspath(args.data),
        pairs=len(examples),
        batch=B,
        steps=total_steps,
        lr=args.lr,
        beta=args.beta,
        seed=args.seed,
    )
    step = 0
    if ck:
        step = bookkeeping.load_checkpoint(ck, fingerprint, optimizer, scheduler)["step"]
    log_fh = bookkeeping.open_log(log_path, step)

    bar = tqdm(total=total_steps, initial=step, desc="dpo", dynamic_ncols=True)
    plan, last, t_start = {}, {}, time.time()
    while step < total_steps:
        t0 = time.time()
        epoch, b = divmod(step, steps_per_epoch)
        plan = plan if epoch in plan else {epoch: train.plan_epoch(examples, B, epoch, args.seed)}
        batch = pair_batch([examples[i] for i in plan[epoch][b]], tok.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.inference_mode():
            ref_lp = sequence_logprobs(ref, batch)  # [2B]
        pi_lp = sequence_logprobs(model, batch)
        loss, margin = dpo_loss(
            pi_lp[:B], pi_lp[B:], ref_lp[:B].clone(), ref_lp[B:].clone(), args.beta
        )
        if not math.isfinite(loss.item()):
            raise AltError(f"non-finite DPO loss at step {step + 1}; stopped before the update")
        loss.backward()
        grad_norm = launch.optimizer_step(model, optimizer, scheduler, args.max_grad_norm)
        step += 1
        chosen, rejected = (
            args.beta * (pi_lp[s] - ref_lp[s]).detach() for s in (slice(0, B), slice(B, None))
        )
        tokens = int(batch["attention_mask"].sum())
        last = dict(
            step=step,
            epoch=epoch,
            loss=loss.item(),
            reward_acc=(margin > 0).float().mean().item(),
            margin=margin.mean().item(),
            chosen=chosen.mean().item(),
            rejected=rejected.mean().item(),
            lr=scheduler.get_last_lr()[0],
            grad_norm=grad_norm,
            tokens=tokens,
            tokens_per_s=round(tokens / max(time.time() - t0, 1e-9), 1),
        )
        bookkeeping.log_row(
            log_fh, bar, last, loss=f"{last['loss']:.4f}", acc=f"{last['reward_acc']:.2f}"
        )
        if step % args.save_every == 0 and step < total_steps:
            state = dict(
                step=step,
                fingerprint=fingerprint,
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
            )
            bookkeeping.save_checkpoint(args.out, model, tok, state)
    bar.close()
    log_fh.close()

    # ---- outputs: the model, then the summary (its presence marks --out finished)
    summary = dict(
        method="dpo",
        tags=None,
        exemplar=None,
        data=args.data,
        model=args.model,
        ref_model=ref_path,
        counts=counts,
        pairs=len(examples),
        steps=total_steps,
        epochs=args.epochs,
        final=last,
    )
    bookkeeping.save_trained(args.out, model, tok, summary_path, summary, t_start, args)
    print(
        f"dpo.py: {total_steps} steps on {len(examples)} pairs -> {args.out} (final loss {last.get('loss', 0):.4f}); "
        f"skipped: {counts['single_sample']} single-sample and {counts['all_tied']} all-tied prompts, "
        f"{counts['null_reward']} null rewards, {counts['empty_generation']} empty generations"
    )


if __name__ == "__main__":
    bookkeeping.cli(main)
