"""train.py: stage 3 of ALT (Algorithm 1), θ_k ← argmin_θ L_θ on the datapool D, in PyTorch.

Equation 1 (x the prompt, y the generation, f its feedback, p_θ the policy, p_0 the initial model):
    L_θ = E_(x,y,f)~D [ −log p_θ(y | f, x) ]                   # NLL, on y's tokens only
        + β · E [ KL( p_0(· | x, y<t) ‖ p_θ(· | f, x, y<t) ) ]  # p_0 sees NO feedback
        − α · E [ H( p_θ(· | f, x, y<t) ) ]                   # entropy bonus
Every E is a token-level mean over one optimizer step's response tokens (all micro-batches, all
ranks), as in the official toxicity trainer; KL and H: exact sums over the vocabulary, at y only.
Input  --data POOL.jsonl: datapool rows (common.py schema; uses prompt_id, prompt, generation,
       feedback, truncated; feedback=null: skipped, counted); POOL.meta.json if present.
Output --out DIR: save_pretrained (safetensors) + tokenizer (with ALT's added tokens);
       DIR/train_log.jsonl, a row per step {step, epoch, nll, kl, entropy, total, beta, alpha, lr,
       grad_norm, tokens, tokens_per_s}; DIR/train_summary.json (the meta's method, tags, exemplar;
       counts; final row), which makes a rerun print "done"; DIR/checkpoint/: the resume state.
Launch:
    python train.py --data runs/x/iter_2/pool.jsonl --model runs/x/iter_1/model \
        --ref-model toy/model --out runs/x/iter_2/model --beta 0.05 --alpha 0.06
    torchrun --nproc_per_node 2 train.py ...                      # DDP: gloo on CPU, nccl on GPU
    deepspeed --num_gpus 2 train.py --deepspeed configs/ds_zero2.json ...
Token layout: the prefix (condition(x, f) for p_θ, x alone for p_0) and y are tokenised apart, so
y's ids and column P (prefixes left-padded) match in both models' inputs. Read the flags, the data
pieces, Equation 1, then main; launch.py (models, optimizer, DDP, DeepSpeed, checkpoints) can wait.
"""

import argparse
import math
import os
import random
import time

import torch
from tqdm import tqdm

import bookkeeping
import common
import launch
from bookkeeping import AltError, finite
from common import meta_path


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add, pos, count = p.add_argument, finite(0, strict=True), finite(1, kind=int)
    # ---- defaults block: the paper's toxicity setting (ALT, Sec. 4.1 and App. A)
    add("--data", required=True, help="datapool D_k (JSONL from feedback.py)")
    add("--model", required=True, help="start θ: the last iteration's (iteration 1: p_0)")
    add("--ref-model", help="p_0 of the KL (paper: initial model); default --model; read if β>0")
    add("--out", required=True, help="output model folder")
    add("--beta", type=finite(0), default=0.05, help="KL coefficient β (paper, toxicity: 0.05)")
    add("--alpha", type=finite(), default=0.06, help="entropy bonus α (paper, toxicity: 0.06)")
    add("--epochs", type=count, default=1, help="passes over D_k per iteration")
    add("--batch-size", type=count, default=32, help="micro-batch per rank (paper: 32)")
    add("--grad-accum", type=count, default=1, help="global batch = batch × accum × world")
    add("--lr", type=pos, default=1e-5, help="AdamW learning rate (paper: Adam, 1e-5)")
    add("--adam-eps", type=pos, default=1e-8, help="Adam epsilon (paper: 1e-8)")
    add("--weight-decay", type=finite(0), default=0.0, help="AdamW decay (paper: Adam, 0)")
    add("--warmup-ratio", type=finite(0, 1), default=0.05, help="warmup share (paper: linear)")
    add("--max-grad-norm", type=pos, help="clip the gradient norm (paper: none)")
    add("--per-category", type=count, help="n rows per (x, f) (paper: TL;DR/HH balance)")
    add("--drop-truncated", action="store_true", help="drop y cut at max_new_tokens (paper: kept)")
    # official code: never (its collator re-tokenises y's text); on, ALT learns to stop early
    add("--eos-target", action="store_true", help="train EOS after a y that stopped by itself")
    # without it, every non-EOS target lowers EOS, and y grows to the limit
    add("--eos-free", action="store_true", help="no EOS in the NLL's softmax: only the KL moves it")
    add("--max-samples", type=count, help="random subset of N rows after filtering (paper: all)")
    add("--target-kl", type=pos, help="adapt β to keep the per-token KL near this (paper: fixed)")
    add("--target-entropy", type=pos, help="adapt α to keep the entropy near this (paper: fixed)")
    add("--controller-rate", type=pos, default=0.1, help="log-step of the β/α controllers")
    add("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on GPU")
    add("--gradient-checkpointing", action="store_true", help="less activation memory, more time")
    add("--save-every", type=count, default=100, help="write the resume checkpoint every N steps")
    add("--seed", type=int, default=0, help="data order, subsets and dropout")
    add("--deepspeed", metavar="CONFIG", help="deepspeed.initialize (e.g. configs/ds_zero2.json)")
    add("--expect-method", help="error unless the pool meta's method is this (alt_loop.py's)")
    add("--overwrite", action="store_true", help="retrain even if --out is finished")
    add("--trust-remote-code", action="store_true", help="allow custom model code (paper: GPT-2)")
    add("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed's launcher
    a = p.parse_args(argv)
    for target, coef, name in ((a.target_kl, a.beta, "kl"), (a.target_entropy, a.alpha, "entropy")):
        if target is not None and not coef > 0:
            p.error(f"--target-{name} needs its coefficient (β or α) > 0")
    if a.eos_target and a.eos_free:
        p.error("--eos-target trains EOS and --eos-free leaves it out of the NLL: pick one")
    return a


# ------------------------------------------------------------------------- data: D_k -> token ids
def read_meta(pool, expect_method=None):
    """POOL's sidecar meta ({} when absent): method, tags (the feedback vocabulary), exemplar."""
    path = meta_path(pool)
    meta = bookkeeping.read_json(path) if os.path.exists(path) else {}
    tags = meta.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise AltError(f"{path}: 'tags' must be a list of strings")
    if expect_method and meta.get("method") != expect_method:
        raise AltError(f"{path}: pool method {meta.get('method')!r}, expected {expect_method!r}")
    return meta


def read_pool(path, tags=None, per_category=None, drop_truncated=False, max_samples=None, seed=0):
    """D_k -> (rows to train on, counts). Skips are counted; a feedback not in tags: error."""
    required = ("prompt", "generation", "feedback")
    rows = bookkeeping.read_jsonl(path, required, schema=common.POOL_ROW, numbered=True)
    counts = dict(read=len(rows), null_feedback=0, empty_generation=0, truncated=0)
    counts.update(per_category=0, max_samples=0)
    kept, ids = [], {}
    for line, r in rows:
        r["_x"] = bookkeeping.prompt_key(path, line, r, ids)  # x's identity for --per-category
        if r["feedback"] is None:
            counts["null_feedback"] += 1
        elif tags and r["feedback"] not in tags:
            raise AltError(
                f"{path}:{line}: feedback {r['feedback']!r} is not one of the {len(tags)} tags in "
                f"{meta_path(path)} (a pool from another method or K?)"
            )
        elif not r["generation"]:  # only an instant EOS to learn: would reward-hack toward empty y
            counts["empty_generation"] += 1
        elif drop_truncated and r.get("truncated"):
            counts["truncated"] += 1
        else:
            kept.append(r)
    rng = random.Random(seed)
    if per_category:
        groups = {}
        for r in kept:
            groups.setdefault((r["_x"], r["feedback"]), []).append(r)
        kept = []
        for g in groups.values():
            kept += rng.sample(g, per_category) if len(g) > per_category else g
        counts["per_category"] = sum(len(g) for g in groups.values()) - len(kept)
    if max_samples and len(kept) > max_samples:
        counts["max_samples"], kept = len(kept) - max_samples, rng.sample(kept, max_samples)
    counts["used"] = len(kept)
    return kept, counts


def pack(prefix_ids, response_ids, eos_id, bos_id, max_length):
    """(prefix ids, y ids) -> the pair the model sees: eos_id (None: none) closes y; an over-long
    pair keeps y (to max_length - 1) and the prefix's end; an empty prefix becomes BOS."""
    resp = (list(response_ids) + ([] if eos_id is None else [eos_id]))[: max_length - 1]
    pre = list(prefix_ids)[-(max_length - len(resp)) :] or [bos_id]
    return pre, resp


def encode_rows(rows, tokenizer, max_length, reference=True, eos_target=False):
    """Pool rows -> [{"prefix": condition(x, f) ids, "ref_prefix": x ids (p_0's, if reference),
    "response": y ids, "x_len": x's length, "clipped"}]; y is tokenised apart from the prefixes."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pre = tokenizer([common.condition(r["prompt"], r.get("feedback")) for r in rows])["input_ids"]
    ref = tokenizer([r["prompt"] for r in rows])["input_ids"]
    ys = tokenizer([r["generation"] for r in rows], add_special_tokens=False)["input_ids"]
    control = set(common.control_token_ids(tokenizer))
    out = []
    for r, p, q, y in zip(rows, pre, ref, ys):
        if control.intersection(y):  # the loss drops the control columns, so y may never hold one
            raise AltError(
                f"row {r.get('prompt_id', r['prompt'])!r}: generation contains a control token"
            )
        end = eos if eos_target and not r.get("truncated") else None
        p2, y2 = pack(p, y, end, bos, max_length)
        ex = dict(prefix=p2, response=y2, x_len=len(q))
        ex["clipped"] = len(p2) + len(y2) < len(p) + len(y) + (end is not None)
        if reference:
            ex["ref_prefix"] = pack(q, y, end, bos, max_length)[0]
        out.append(ex)
    return out


def collate(pairs, pad_id):
    """[(prefix ids, y ids)] -> prefixes left-padded, y right-padded from column P in every row:
    input_ids/attention_mask/position_ids [B, P+R]; targets (y), resp_mask (y tokens) [B, R]."""
    P, R = max(len(p) for p, _ in pairs), max(len(y) for _, y in pairs)
    ids = torch.full((len(pairs), P + R), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, y) in enumerate(pairs):
        ids[i, P - len(p) : P + len(y)] = torch.tensor(list(p) + list(y))
        mask[i, P - len(p) : P + len(y)] = 1
    batch = dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    return batch | dict(targets=ids[:, P:], resp_mask=mask[:, P:].bool())


def plan_epoch(examples, global_batch, epoch, seed, window=4):
    """Length-bucketed global batches for one epoch, alike on every rank: drop a random remainder,
    sort by x's length, re-sort each window of `window` batches by y's, cut, shuffle the batches.
    By x, not condition(x, f): f's length differs by tag, a step would see one tag, no contrast."""
    rng = random.Random(f"{seed}-{epoch}")
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    idx = sorted(idx[: len(idx) - len(idx) % global_batch], key=lambda i: examples[i]["x_len"])
    W = global_batch * window
    for s in range(0, len(idx), W):
        idx[s : s + W] = sorted(idx[s : s + W], key=lambda i: len(examples[i]["response"]))
    batches = [idx[i : i + global_batch] for i in range(0, len(idx), global_batch)]
    rng.shuffle(batches)
    return batches


def micro_batches(examples, batch, rank, B, A, pad_id):
    """This rank's share of a global batch -> A micro-batches of B rows, each a pair (p_θ's batch:
    condition(x, f) + y, p_0's: x + y); without p_0 (β = 0: no "ref_prefix"), p_θ's twice."""
    mine = [examples[i] for i in batch[rank * B * A : (rank + 1) * B * A]]
    micro = [mine[j * B : (j + 1) * B] for j in range(A)]
    pol = [collate([(e["prefix"], e["response"]) for e in m], pad_id) for m in micro]
    if "ref_prefix" not in mine[0]:
        return list(zip(pol, pol))
    refs = [collate([(e["ref_prefix"], e["response"]) for e in m], pad_id) for m in micro]
    return list(zip(pol, refs))


def token_counts(micro):
    """One rank's micro-batches -> (response tokens, input tokens, all slots, padding included)."""
    masks = [p["attention_mask"] for p, _ in micro]
    n_y = sum(p["resp_mask"].sum().item() for p, _ in micro)
    return n_y, sum(m.sum().item() for m in masks), sum(m.numel() for m in masks)


# ----------------------------------------------------------------------------- Equation 1
def response_logits(model, batch, vocab=None):
    """Logits predicting each y_t from (prefix, y<t): [B, R, V]. vocab: keep only the first `vocab`
    columns (train.py drops ALT's control tokens, which sampling never draws)."""
    keep = batch["targets"].shape[1] + 1  # R + 1: from column P-1, the one that predicts y_1
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    return model(**inputs, logits_to_keep=keep, use_cache=False).logits[:, :-1, :vocab]


def response_logprobs(model, batch):
    """log p(y_t | prefix, y<t) per response token [B, R], 0 at padding (dim-1 sum: log p(y))."""
    logp = torch.log_softmax(response_logits(model, batch).float(), -1)
    return logp.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1) * batch["resp_mask"]


def alt_loss(logits, ref_logits, targets, resp_mask, eos=None):
    """Equation 1's three sums over a micro-batch's N response tokens -> 0-d (nll, kl, entropy).
    eos: an id left out of the NLL's softmax (−log p_θ(y_t | f, x, y<t, no stop)); None: all."""
    logp = torch.log_softmax(logits[resp_mask].float(), -1)  # [N, V]: real response positions only
    nll = -logp.gather(-1, targets[resp_mask].unsqueeze(-1)).sum()
    if eos is not None:  # renormalise over the non-EOS tokens: log(1 − p_θ(EOS)) per position
        nll = nll + torch.log1p(-logp[:, eos].exp().clamp(max=1 - 1e-6)).sum()
    entropy = -(logp.exp() * logp).sum()  # H(p_θ(· | f, x, y<t)) = −Σ_v p_θ log p_θ
    # KL(p_0(· | x, y<t) ‖ p_θ(· | f, x, y<t)) = Σ_v p_0 (log p_0 − log p_θ)
    kl = logp.new_zeros(())
    if ref_logits is not None:
        logq = torch.log_softmax(ref_logits[resp_mask].float(), -1)  # [N, V], p_0 without feedback
        kl = (logq.exp() * (logq - logp)).sum()
    return nll, kl, entropy


def adapt(args, beta, alpha, kl, ent):
    """Optional adaptive β, α for the next step (paper: fixed): clipped multiplicative steps
    toward --target-kl, --target-entropy (Ziegler et al.'s rule) from the step's per-token KL, H."""
    if args.target_kl:
        beta *= math.exp(args.controller_rate * max(-0.2, min(0.2, kl / args.target_kl - 1)))
    if args.target_entropy:
        alpha *= math.exp(args.controller_rate * max(-0.2, min(0.2, 1 - ent / args.target_entropy)))
    return beta, alpha


# -------------------------------------------------------------------- main: θ_k ← argmin_θ L_θ
def main(argv=None):
    args = parse_args(argv)
    if launch.prepare_out(args):  # --out is finished (its summary exists) and no --overwrite
        return
    rank, world, device = launch.setup_distributed(args)  # python, torchrun (DDP) or deepspeed
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device != "cpu")

    # ---- data and models: D_k -> token ids; p_θ from --model (or the resume state), p_0 if β > 0
    meta = read_meta(args.data, args.expect_method)
    tags = meta.get("tags") or []
    rows, counts = read_pool(
        args.data, tags, args.per_category, args.drop_truncated, args.max_samples, args.seed
    )
    ck = None if args.overwrite else bookkeeping.find_checkpoint(args.out)
    extra = list(tags) if meta.get("method") == "quark" else []  # Quark's quantiles: 1 token each
    model, ref, tok = launch.load_models(args, ck, extra, device, bf16)
    n_ctx = bookkeeping.context_length(model.config)
    examples = encode_rows(rows, tok, n_ctx, reference=ref is not None, eos_target=args.eos_target)
    vocab = launch.sampled_vocab(model, tok, args.model)  # Equation 1's V: what sampling can draw
    eos = tok.eos_token_id if args.eos_free else None
    counts["clipped_to_context"] = sum(e["clipped"] for e in examples)
    B, A = args.batch_size, args.grad_accum
    G = B * A * world  # the global batch of one optimizer step
    if len(examples) < G:
        raise launch.too_few_rows(args, len(examples), world)
    steps_per_epoch = len(examples) // G
    total_steps = steps_per_epoch * args.epochs

    # ---- optimisation: AdamW + linear warmup/decay, the resume state, DDP or DeepSpeed around it
    optimizer, scheduler = launch.adamw(args, model, total_steps)
    fingerprint = launch.run_fingerprint(args, len(examples), G, world, total_steps)
    step, beta, alpha, zero = launch.resume(args, ck, fingerprint, optimizer, scheduler, rank)
    fwd, optimizer, ctx, backward, update = launch.wrap_model(
        args, model, optimizer, scheduler, zero, world, device, bf16
    )

    # ---- the loop: an optimizer step per global batch; rank 0 alone writes log, checkpoints, model
    log = None if rank else bookkeeping.open_log(os.path.join(args.out, "train_log.jsonl"), step)
    launch.barrier()
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=rank != 0, dynamic_ncols=True)
    plan, row, pad, slots, t_start = {}, {}, 0, 0, time.time()
    while step < total_steps:
        t0 = time.time()
        epoch, b = divmod(step, steps_per_epoch)
        plan = plan if epoch in plan else {epoch: plan_epoch(examples, G, epoch, args.seed)}
        micro = micro_batches(examples, plan[epoch][b], rank, B, A, tok.pad_token_id)
        n_y, n_in, n_slots = token_counts(micro)
        n_resp = launch.all_sum([n_y], device).item()  # Equation 1's N: all micro-batches, ranks
        sums = torch.tensor([0, 0, 0, n_in], dtype=torch.float64)  # rank's Σ nll, kl, H; tokens
        pad, slots = pad + n_slots - n_in, slots + n_slots
        for j, (pb, rb) in enumerate(micro):
            pb, rb = ({k: v.to(device) for k, v in x.items()} for x in (pb, rb))
            launch.sync_grads(fwd, last=j == A - 1)  # DDP: all-reduce on the last micro-batch only
            with ctx:
                with torch.no_grad():  # p_0 fixed; not inference_mode: backward needs its logits
                    ref_logits = None if ref is None else response_logits(ref, rb, vocab)
                logits = response_logits(fwd, pb, vocab)
                nll, kl, entropy = alt_loss(logits, ref_logits, pb["targets"], pb["resp_mask"], eos)
            # Equation 1 as Σ over y's tokens / N; × world as DDP averages the ranks' gradients
            L = (nll + beta * kl - alpha * entropy) * (world / n_resp)
            backward(L)
            sums[:3] += torch.stack([nll.detach(), kl.detach(), entropy.detach()]).double().cpu()
        tot = launch.all_sum(sums, device)
        nll_m, kl_m, ent_m = (tot[:3] / n_resp).tolist()
        tokens = int(tot[3])
        total = nll_m + beta * kl_m - alpha * ent_m  # L of the step
        if not math.isfinite(total):  # stop before the update: the last checkpoint stays good
            raise launch.nonfinite_loss(total, step, args.out, bar)
        grad_norm = update()
        step += 1
        row = dict(step=step, epoch=epoch, nll=nll_m, kl=kl_m, entropy=ent_m, total=total)
        row.update(beta=beta, alpha=alpha, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm)
        row.update(tokens=tokens, tokens_per_s=round(tokens / max(time.time() - t0, 1e-9), 1))
        beta, alpha = adapt(args, beta, alpha, kl_m, ent_m)
        bookkeeping.log_row(log, bar, row, loss=f"{total:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if step % args.save_every == 0 and step < total_steps:
            state = dict(step=step, beta=beta, alpha=alpha, fingerprint=fingerprint)
            launch.save_checkpoint(args, model, tok, optimizer, scheduler, state, rank)
    bar.close()

    # ---- outputs: the model, then the summary (its presence marks --out finished)
    if rank == 0:
        log.close()
        launch.save_outputs(args, model, tok, meta, counts, fingerprint, row, pad, slots, t_start)
    launch.close()


if __name__ == "__main__":
    bookkeeping.cli(main)
