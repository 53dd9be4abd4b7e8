"""sample.py: stage 1 of ALT's Algorithm 1. Draw y ~ p_θ(· | f̂, x) for every prompt x and write them to D.

Input  --prompts  JSONL, one prompt x per line: {"prompt": "text"} or {"prompt": {"text": "..."}}, optional "id"
                  (or any `datasets` source with --prompt-field, e.g. allenai/real-toxicity-prompts + prompt.text)
Output --out      JSONL datapool rows (schema in common.py), prompts in file order, the samples of x together:
                  {"prompt_id", "sample_idx", "prompt": x (raw, never with feedback), "generation": y,
                   "condition": f̂ or null, "iteration": k, "truncated": no EOS within max_new_tokens, "num_tokens"}

Launch:
    python sample.py --model toy/model --prompts toy/prompts/train.jsonl --out runs/x/iter_1/samples.jsonl \
        --num-samples 4 --max-new-tokens 20 --top-p 1.0 --temperature 1.0 [--condition "Lowest Toxicity"]

Rule (Algorithm 1, sampling step): for each x and j < num_samples,  y_j ~ p_θ(· | condition(x, f̂))  with
    condition(x, f̂) = f̂ + <|separator|> + x,   and x alone at iteration 1 (no --condition: p_θ = p_0).
Nucleus sampling (top_p) at temperature T, no top-k, with HF's do_sample (--exact-sampler: the same distribution
drawn by inverse CDF, faster on CPU). EOS is blocked for the first --min-new-tokens tokens, as the official sampler.
The separator and Quark's quantile tokens are control tokens: their logits are -inf, so y never contains them.
--condition-pool (ALT_LMU) draws one f̂ per prompt.

Sharding: --shard i/n samples the prompts with index % n == i into OUT.shard-i-of-n; --merge OUT joins them in
prompt order. Resume: a finished OUT prints "done"; a killed run leaves no OUT, only OUT.partial (finished batches)
from which the rerun goes on, giving the same rows as an uninterrupted run.
"""

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time

import torch
from tqdm.auto import tqdm
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

import bookkeeping
import common
from bookkeeping import AltError, finite
from common import SEPARATOR

# ----------------------------------------------------------------------------- defaults (paper: toxicity, after Quark)
NUM_SAMPLES = 4  # samples per prompt per iteration
MAX_NEW_TOKENS = 20  # paper/Quark toxicity: 20 new tokens
MIN_NEW_TOKENS = 3  # official toxicity sampler: EOS is forbidden for the first 3 tokens
TOP_P = 1.0  # paper: 1.0 when sampling for training, 0.9 for evaluation
TEMPERATURE = 1.0  # paper: 1.0
BATCH_SIZE = 64  # prompts per model.generate call (each expands to num_samples sequences)
SEED = 0
ITERATION = 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="sample.py", description="ALT stage 1: sample y ~ p_θ(·|f̂, x) into a datapool."
    )
    p.add_argument(
        "--model", help="policy p_θ: local folder or HF name (iteration 1: the reference p_0)"
    )
    p.add_argument("--prompts", help="prompt JSONL, or an HF dataset name (with --prompt-field)")
    p.add_argument("--out", help="output datapool JSONL (with --shard: OUT.shard-i-of-n)")
    p.add_argument(
        "--split", default="train", help="dataset split when --prompts goes through `datasets`"
    )
    p.add_argument(
        "--prompt-field",
        default=None,
        help="dotted field holding x (e.g. prompt.text); when given, --prompts is read with `datasets`",
    )
    p.add_argument(
        "--num-samples",
        type=finite(1, kind=int),
        default=NUM_SAMPLES,
        help="samples y per prompt x (default 4)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=finite(1, kind=int),
        default=MAX_NEW_TOKENS,
        help="max generated tokens (paper, toxicity: 20)",
    )
    p.add_argument(
        "--min-new-tokens",
        type=finite(0, kind=int),
        default=MIN_NEW_TOKENS,
        help="EOS is blocked before this many tokens (official toxicity code: 3)",
    )
    p.add_argument(
        "--top-p",
        type=finite(0, 1, strict=True),
        default=TOP_P,
        help="nucleus sampling p (paper: 1.0 for training samples, 0.9 for evaluation)",
    )
    p.add_argument(
        "--temperature",
        type=finite(0),
        default=TEMPERATURE,
        help="sampling temperature (paper: 1.0; 0 = greedy, every sample identical)",
    )
    p.add_argument(
        "--exact-sampler",
        action="store_true",
        help="draw by inverse CDF over greedy decoding: the same "
        "distribution as HF's do_sample, about 2x faster on CPU (bench/bench_sample.py)",
    )
    p.add_argument(
        "--condition",
        default=None,
        help="exemplar feedback f̂ prepended as condition(x, f̂) (paper: the best feedback, e.g. "
        "'Lowest Toxicity'; Quark: its best quantile token). Omit at iteration 1",
    )
    p.add_argument(
        "--condition-pool",
        default=None,
        help="JSON list of exemplar feedbacks (ALT_LMU): one drawn per prompt, deterministic in --seed",
    )
    p.add_argument(
        "--iteration",
        type=int,
        default=ITERATION,
        help="ALT iteration k stored in each row (default 1)",
    )
    p.add_argument(
        "--batch-size",
        type=finite(1, kind=int),
        default=BATCH_SIZE,
        help="prompts per generate call; each expands to --num-samples sequences (default 64)",
    )
    p.add_argument(
        "--seed", type=int, default=SEED, help="seed: same seed and shard give identical rows"
    )
    p.add_argument(
        "--shard", type=parse_shard, default=None, help="i/n: only prompts with index %% n == i"
    )
    p.add_argument(
        "--merge", metavar="OUT", default=None, help="join OUT.shard-*-of-n into OUT and exit"
    )
    p.add_argument("--device", default=None, help="default: cuda when a GPU is present, else cpu")
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="default: bfloat16 on GPU, float32 on CPU",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model's own code (off by default)",
    )
    p.add_argument("--overwrite", action="store_true", help="redo even when OUT exists")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    args = p.parse_args(argv)
    if args.merge is None and not (args.model and args.prompts and args.out):
        p.error("--model, --prompts and --out are required (or --merge OUT)")
    # --max-new-tokens 2: EOS blocked for 2
    args.min_new_tokens = min(args.min_new_tokens, args.max_new_tokens)
    if args.condition is not None and args.condition_pool is not None:
        p.error("--condition and --condition-pool are exclusive")
    return args


def parse_shard(text):
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"expected i/n with 0 <= i < n (e.g. 0/4), got '{text}'")
    return int(m.group(1)), int(m.group(2))


# ----------------------------------------------------------------------------- batched sampling
def plan_batches(tokenizer, inputs, batch_size, max_len):
    """Token ids per input, left-truncated to max_len, and batches of input indices sorted by length (little padding).
    Truncation cuts the start of x but keeps f̂ + separator, so a long prompt never loses its conditioning."""
    ids = tokenizer(list(inputs), add_special_tokens=True)["input_ids"] if inputs else []
    sep = tokenizer.get_vocab().get(SEPARATOR)
    n_cut = 0
    for i, t in enumerate(ids):
        if not t:
            raise AltError(f"input {i} tokenizes to nothing (empty prompt without feedback)")
        if max_len is not None and len(t) > max_len:
            head = t[: t.index(sep) + 1] if sep in t else []
            if len(head) >= max_len:
                raise AltError(
                    f"input {i}: the feedback alone ({len(head)} tokens) fills the {max_len}-token budget"
                )
            ids[i] = head + t[len(t) - (max_len - len(head)) :]
            n_cut += 1
    # longest first: an OOM shows in the first batch
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    return ids, [order[s : s + batch_size] for s in range(0, len(order), batch_size)], n_cut


def batch_seed(seed, b):
    """Seed of batch b: fixed by (seed, b) alone, so a resumed run redraws exactly what it skipped."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{b}".encode()).digest()[:8], "little") % 2**63


class InverseCdfSampler(LogitsProcessor):
    """An exact draw y_t ~ softmax(scores) by inverse CDF, one uniform per row; returns scores that are -inf except at
    the draw, so greedy decoding emits it. Why not do_sample=True: torch.multinomial draws one exponential per vocab
    entry, which was 27% of CPU time at 256 rows x 8k vocab; this needs one cumsum and 256 uniforms."""

    def __call__(self, input_ids, scores):
        # scores: (rows, V), after suppression, temperature and top-p
        probs = scores.float().softmax(-1)
        # float32 rounding moves a token's share by ~1e-7 x sqrt(V): far below sampling noise
        cdf = probs.cumsum(-1)
        total = cdf[:, -1:]
        u = torch.rand(len(cdf), 1, device=cdf.device, dtype=cdf.dtype) * total
        # u < total, even when rand * total rounds up
        u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))
        # first index with cdf > u: its cdf rose there, so p > 0
        pick = torch.searchsorted(cdf, u, right=True)
        return torch.full_like(scores, -float("inf")).scatter_(1, pick, 0.0)


def sampler(top_p, temperature):
    """Logits processors for nucleus sampling at temperature T with the exact sampler last (HF's public warpers)."""
    return LogitsProcessorList(
        [
            *([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []),
            *([TopPLogitsWarper(top_p)] if top_p < 1.0 else []),
            InverseCdfSampler(),
        ]
    )


@torch.inference_mode()
def sample_batch(
    model,
    tokenizer,
    batch_ids,
    num_samples,
    max_new_tokens,
    top_p,
    temperature,
    return_ids=False,
    min_new_tokens=MIN_NEW_TOKENS,
    exact_sampler=False,
):
    """One model.generate call on left-padded inputs -> per input, num_samples {generation, truncated, num_tokens}."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos = sorted(
        {
            *(eos if isinstance(eos, list) else [eos] if eos is not None else []),
            tokenizer.eos_token_id,
        }
        - {None}
    )
    width = max(map(len, batch_ids))
    # (B, width), padding on the left
    input_ids = torch.full((len(batch_ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for r, t in enumerate(batch_ids):
        input_ids[r, width - len(t) :] = torch.tensor(t)
        mask[r, width - len(t) :] = 1
    greedy = temperature == 0
    if not greedy:  # row r*K + j is sample j of input r
        input_ids, mask = (
            input_ids.repeat_interleave(num_samples, 0),
            mask.repeat_interleave(num_samples, 0),
        )
    if greedy or exact_sampler:  # greedy decoding, or greedy over InverseCdfSampler's one-hot draw
        draw = dict(
            do_sample=False, logits_processor=None if greedy else sampler(top_p, temperature)
        )
    else:
        # the textbook path: y_t ~ p_θ(· | f̂, x, y<t) with HF's own nucleus sampling (top_k 0: no top-k cut)
        draw = dict(do_sample=True, top_p=top_p, temperature=temperature, top_k=0)
    out = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=mask.to(model.device),
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos,
        suppress_tokens=common.control_token_ids(tokenizer) or None,
        **draw,
    )
    gen = out[:, width:].cpu()  # (B * K, <= max_new_tokens); row r*K + j is sample j of input r
    is_eos = torch.isin(gen, torch.tensor(eos))
    ended = is_eos.any(1)
    # tokens before the first EOS
    n = torch.where(ended, is_eos.int().argmax(1), gen.shape[1]).tolist()
    toks = [g[:k] for g, k in zip(gen.tolist(), n)]
    texts = tokenizer.batch_decode(
        toks, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    ys = [
        {"generation": t, "truncated": not e, "num_tokens": k, **({"ids": i} if return_ids else {})}
        for t, e, k, i in zip(texts, ended.tolist(), n, toks)
    ]
    k = 1 if greedy else num_samples
    return [
        [dict(ys[r * k + (0 if greedy else j)]) for j in range(num_samples)]
        for r in range(len(batch_ids))
    ]


def generate_batched(
    model,
    tokenizer,
    inputs,
    num_samples=1,
    max_new_tokens=20,
    top_p=1.0,
    temperature=1.0,
    batch_size=64,
    seed=0,
    progress=True,
    desc="sampling",
    *,
    done=None,
    on_batch=None,
    stats=None,
    return_ids=False,
    min_new_tokens=MIN_NEW_TOKENS,
    exact_sampler=False,
):
    """Sample num_samples continuations of each already-conditioned input string with batched model.generate.

    Returns a list aligned with `inputs` of lists (num_samples) of {"generation", "truncated", "num_tokens"}.
    return_ids adds "ids": y's token ids before EOS (exact, for RL log-probs; decode + re-encode can differ).
    Optional: done {batch index: that batch's results} skips those batches (resume); on_batch(b, results) is
    called after each new batch; stats (a dict) receives counts (prompts_truncated, pad_share, generations, ...).
    """
    ctx = bookkeeping.context_length(model.config)
    max_len = ctx - max_new_tokens
    if max_len < 1:
        raise AltError(
            f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the {ctx}-token context"
        )
    ids, batches, n_cut = plan_batches(tokenizer, inputs, batch_size, max_len)
    if n_cut:
        print(
            f"warning: {n_cut} of {len(ids)} inputs exceed {max_len} tokens (context {ctx} - {max_new_tokens} new);"
            " their start was cut (left truncation, feedback kept)",
            file=sys.stderr,
        )
    done = done or {}
    real = sum(map(len, ids))
    # each batch is as wide as its first (longest) input
    padded = sum(len(b) * len(ids[b[0]]) for b in batches)
    results = [None] * len(ids)
    model.eval()
    t0 = time.time()
    initial = sum(len(b) for i, b in enumerate(batches) if i in done) * num_samples
    with tqdm(
        total=len(ids) * num_samples,
        initial=initial,
        unit="gen",
        desc=desc,
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for b, idx in enumerate(batches):
            res = done.get(b)
            if res is None:
                torch.manual_seed(batch_seed(seed, b))
                res = sample_batch(
                    model,
                    tokenizer,
                    [ids[i] for i in idx],
                    num_samples,
                    max_new_tokens,
                    top_p,
                    temperature,
                    return_ids,
                    min_new_tokens,
                    exact_sampler,
                )
                if on_batch is not None:
                    on_batch(b, res)
                bar.update(len(idx) * num_samples)
            for i, r in zip(idx, res):
                results[i] = r
    if stats is not None:
        stats.update(
            prompts_truncated=n_cut,
            prompt_tokens=real,
            pad_tokens=padded - real,
            batches=len(batches),
            pad_share=(padded - real) / max(padded, 1),
            generations=len(ids) * num_samples - initial,
            seconds=time.time() - t0,
            batches_resumed=sum(1 for b in range(len(batches)) if b in done),
        )
    return results


# ----------------------------------------------------------------------------- merge shards
def merge(out, overwrite=False):
    """Join OUT.shard-i-of-n (i = 0..n-1) into OUT, ordered by prompt index then sample index."""
    if bookkeeping.finished("sample.py --merge", out, {"overwrite": overwrite}):
        return
    folder, base = os.path.split(os.path.abspath(out))
    pat = re.compile(re.escape(base) + r"\.shard-(\d+)-of-(\d+)")
    found = {
        (int(m.group(1)), int(m.group(2)))
        for m in map(pat.fullmatch, os.listdir(folder) if os.path.isdir(folder) else [])
        if m
    }
    if not found:
        raise AltError(f"{out}: no shard files {base}.shard-I-of-N to merge")
    ns = sorted({n for _, n in found})
    if len(ns) > 1:
        raise AltError(
            f"{out}: shards of different splits ({', '.join(f'of-{n}' for n in ns)}); delete the stale ones"
        )
    n = ns[0]
    missing = [i for i in range(n) if (i, n) not in found]
    if missing:
        raise AltError(
            f"{out}: missing shard(s) {', '.join(map(str, missing))} of {n} "
            f"(run sample.py --shard i/{n} for each)"
        )
    rows = []
    for i in range(n):
        path = f"{out}.shard-{i}-of-{n}"
        part = bookkeeping.read_jsonl(
            path, required=("prompt_index", "sample_idx"), allow_empty=True
        )
        for line, r in enumerate(part, 1):
            if r["prompt_index"] % n != i:
                raise AltError(
                    f"{path}:{line}: prompt_index {r['prompt_index']} does not belong to shard {i}/{n}"
                )
        rows += part
    rows.sort(key=lambda r: (r["prompt_index"], r["sample_idx"]))
    keys = [(r["prompt_index"], r["sample_idx"]) for r in rows]
    if len(set(keys)) != len(keys):
        raise AltError(
            f"{out}: shards overlap (a (prompt, sample) pair appears twice); were they made from one file?"
        )
    for r in rows:
        del r["prompt_index"]  # only shards need it: the merged file is exactly an unsharded run's
    bookkeeping.write_jsonl(out, rows)
    print(f"sample.py: merged {n} shards -> {len(rows)} rows in {out}")


# ----------------------------------------------------------------------------- main
def load_condition_pool(path):
    # the shape is checked below, with its own message
    pool = bookkeeping.read_json(path, kind=object)
    if (
        not isinstance(pool, list)
        or not pool
        or not all(isinstance(f, str) and f.strip() for f in pool)
    ):
        raise AltError(f"{path}: expected a non-empty JSON list of non-empty strings")
    return pool


def main(argv=None):
    args = parse_args(argv)
    if args.merge is not None:
        return merge(args.merge, args.overwrite)
    out = args.out if args.shard is None else f"{args.out}.shard-{args.shard[0]}-of-{args.shard[1]}"
    side = out + ".partial"  # finished batches of a run in progress, for resume
    bookkeeping.refuse_overlap(
        {"--out": [out, side]},
        {"--prompts": args.prompts, "--model": args.model, "--condition-pool": args.condition_pool},
    )
    if bookkeeping.finished("sample.py", out, args):
        return
    pool = load_condition_pool(args.condition_pool) if args.condition_pool else None
    for f in pool or [args.condition]:
        if f is not None and (not f.strip() or SEPARATOR in f):
            raise AltError(
                f"feedback {f!r} is empty or contains {SEPARATOR}; omit --condition for unconditioned x"
            )
    looks_local = args.prompts.endswith((".jsonl", ".json")) or args.prompts.startswith(
        (".", os.sep)
    )
    if args.prompt_field is None and looks_local and not os.path.exists(args.prompts):
        # else: an HF dataset name
        raise AltError(f"{args.prompts}: no such prompt file")
    prompts = common.load_prompts(args.prompts, args.split, args.prompt_field)

    # f̂ per prompt, drawn over the whole file so that every shard agrees with an unsharded run
    rng = random.Random(args.seed)
    conds = [rng.choice(pool) for _ in prompts] if pool else [args.condition] * len(prompts)
    for i, p in enumerate(prompts):
        if SEPARATOR in p["prompt"]:
            raise AltError(
                f"{args.prompts}: row {i + 1}: prompt contains the control token {SEPARATOR}"
            )
    shard_i, shard_n = args.shard or (0, 1)
    mine = [i for i in range(len(prompts)) if i % shard_n == shard_i]
    # documented skip: empty x has nothing to continue
    keep = [i for i in mine if prompts[i]["prompt"].strip()]
    if not keep and args.shard is None:
        raise AltError(f"{args.prompts}: all {len(prompts)} prompts are empty")

    stats, rows = {}, []
    if keep:
        device, dtype = bookkeeping.default_device_dtype()
        device, dtype = args.device or device, args.dtype or dtype
        quark = sorted(
            {t for f in set(conds) - {None} for t in re.findall(r"<\|quantile_\d+\|>", f)}
        )
        model, tok = common.load_policy(
            args.model, device, dtype, extra_tokens=quark, trust_remote_code=args.trust_remote_code
        )
        inputs = [common.condition(prompts[i]["prompt"], conds[i]) for i in keep]
        config = dict(
            model=args.model,
            inputs=hashlib.sha256(json.dumps(inputs).encode()).hexdigest(),
            **{
                k: getattr(args, k)
                for k in (
                    "num_samples",
                    "max_new_tokens",
                    "min_new_tokens",
                    "top_p",
                    "temperature",
                    "exact_sampler",
                    "batch_size",
                    "seed",
                )
            },
            device=device,
            dtype=dtype,
        )
        done, fh = bookkeeping.open_journal(side, config, fresh=args.overwrite)
        done = {r["batch"]: r["results"] for r in done}
        if done:
            print(f"resuming: {len(done)} finished batches in {side}", file=sys.stderr)
        with fh:
            results = generate_batched(
                model,
                tok,
                inputs,
                args.num_samples,
                args.max_new_tokens,
                args.top_p,
                args.temperature,
                args.batch_size,
                args.seed,
                not args.no_progress,
                done=done,
                stats=stats,
                min_new_tokens=args.min_new_tokens,
                exact_sampler=args.exact_sampler,
                on_batch=lambda b, r: bookkeeping.append_jsonl(fh, {"batch": b, "results": r}),
            )
        for i, ys in zip(keep, results):
            for j, y in enumerate(ys):
                rows.append(
                    {
                        "prompt_id": prompts[i]["id"],
                        "sample_idx": j,
                        "prompt": prompts[i]["prompt"],
                        "generation": y["generation"],
                        "condition": conds[i],
                        "iteration": args.iteration,
                        "truncated": y["truncated"],
                        "num_tokens": y["num_tokens"],
                        **({"prompt_index": i} if args.shard else {}),
                    }
                )
    bookkeeping.write_jsonl(out, rows)
    if os.path.exists(side):
        os.remove(side)
    rate = stats.get("generations", 0) / max(stats.get("seconds", 0), 1e-9)
    print(
        f"sample.py: {len(rows)} rows ({len(keep)} prompts x {args.num_samples}) -> {out}; "
        f"skipped {len(mine) - len(keep)} empty prompts; left-truncated {stats.get('prompts_truncated', 0)} "
        f"over-long prompts; {sum(r['truncated'] for r in rows)} generations hit --max-new-tokens; "
        f"{stats.get('batches_resumed', 0)} batches resumed; {rate:.1f} generations/s"
    )


if __name__ == "__main__":
    bookkeeping.cli(main)
