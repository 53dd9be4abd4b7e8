"""sample.py: stage 1 of ALT's Algorithm 1: draw y ~ p_θ(· | f̂, x) for every prompt x into D.

Input  --prompts  JSONL of x: {"prompt": "text"} or {"prompt": {"text": "..."}}, optional "id";
                  or `datasets` via --prompt-field (allenai/real-toxicity-prompts: prompt.text)
Output --out      JSONL datapool rows (schema in common.py) in prompt order, x's samples together:
                  {"prompt_id", "sample_idx", "prompt": x (raw, no feedback), "generation": y,
                   "condition": f̂ or null, "iteration": k, "truncated": no EOS, "num_tokens"}

Launch:
    python sample.py --model toy/model --prompts toy/prompts/train.jsonl \
        --out runs/x/iter_1/samples.jsonl --num-samples 4 --max-new-tokens 20 --top-p 1.0 \
        --temperature 1.0 [--condition "Lowest Toxicity"]

Rule (Algorithm 1, sampling step): for x and j < num_samples, y_j ~ p_θ(· | condition(x, f̂)),
condition(x, f̂) = f̂ + <|separator|> + x; x alone at iteration 1 (no --condition: p_θ = p_0).
Nucleus sampling (top_p) at temperature T, no top-k, by HF's do_sample (--exact-sampler: the same
distribution by inverse CDF, faster on CPU); EOS blocked for the first --min-new-tokens tokens as in
the official sampler; control tokens (separator, Quark's quantiles) are never sampled (-inf logits).

Sharding: --shard i/n samples the prompts with index % n == i into OUT.shard-i-of-n; --merge OUT
joins them in prompt order. Resume: a finished OUT prints "done"; a killed run leaves no OUT, only
OUT.partial (finished batches); a rerun resumes from it, giving an uninterrupted run's rows.
"""

import argparse
import hashlib
import json
import os
import random
import re
import sys

import torch
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

# ---------------------------------------------------------- defaults (paper: toxicity, after Quark)
NUM_SAMPLES = 4  # samples per prompt per iteration
MAX_NEW_TOKENS = 20  # paper/Quark toxicity: 20 new tokens
MIN_NEW_TOKENS = 3  # official toxicity sampler: EOS is forbidden for the first 3 tokens
TOP_P = 1.0  # paper: 1.0 when sampling for training, 0.9 for evaluation
TEMPERATURE = 1.0  # paper: 1.0
BATCH_SIZE = 64  # prompts per model.generate call (each expands to num_samples sequences)
SEED = 0
ITERATION = 1
# generate_batched's settings, each set by its flag: with the model and the inputs they fix the rows
SAMPLING = (
    "num_samples max_new_tokens min_new_tokens top_p temperature exact_sampler batch_size seed"
)


def add_sampling_flags(p, num_samples=NUM_SAMPLES, top_p=TOP_P, split="train"):
    """The flags of y ~ p_θ(· | f̂, x); evaluate.py adds them with the paper's eval defaults."""
    a, count, prob = p.add_argument, finite(1, kind=int), finite(0, 1, strict=True)
    a("--split", default=split, help="dataset split when --prompts goes through `datasets`")
    a("--prompt-field", help="dotted field of x (e.g. prompt.text): read --prompts with `datasets`")
    a("--num-samples", type=count, default=num_samples, help="y per x (paper, evaluation: 25)")
    a("--max-new-tokens", type=count, default=MAX_NEW_TOKENS, help="max tokens of y (paper: 20)")
    a(
        "--min-new-tokens",
        type=finite(0, kind=int),
        default=MIN_NEW_TOKENS,
        help="EOS is blocked before this many tokens (official toxicity code: 3)",
    )
    a("--top-p", type=prob, default=top_p, help="nucleus p (paper: 1.0 to train, 0.9 to evaluate)")
    a("--temperature", type=finite(0), default=TEMPERATURE, help="T (paper: 1.0; 0 = greedy)")
    a("--batch-size", type=count, default=BATCH_SIZE, help="prompts per generate call (default 64)")
    a("--seed", type=int, default=SEED, help="seed of y and of ALT_LMU's f̂: same seed, same rows")
    a("--condition-pool", help="JSON list of exemplar feedbacks, one drawn per x (ALT_LMU)")
    a("--device", help="default: cuda when a GPU is present, else cpu")
    a("--trust-remote-code", action="store_true", help="run the model's own code (default: off)")


def check_sampling_flags(p, args):
    args.min_new_tokens = min(args.min_new_tokens, args.max_new_tokens)  # --max-new-tokens 2: 2
    if args.condition is not None and args.condition_pool is not None:
        p.error("--condition and --condition-pool are exclusive")
    return args


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="sample.py", description="ALT stage 1: sample y ~ p_θ(·|f̂, x) into a datapool."
    )
    a = p.add_argument
    a("--model", help="policy p_θ: local folder or HF name (iteration 1: the reference p_0)")
    a("--prompts", help="prompt JSONL, or an HF dataset name (with --prompt-field)")
    a("--out", help="output datapool JSONL (with --shard: OUT.shard-i-of-n)")
    add_sampling_flags(p)
    a(
        "--exact-sampler",
        action="store_true",
        help="draw by inverse CDF over greedy decoding: the same distribution as HF's do_sample, "
        "about 2x faster on CPU (bench/bench_sample.py)",
    )
    a(
        "--condition",
        help="exemplar feedback f̂ prepended as condition(x, f̂) (paper: the best feedback, e.g. "
        "'Lowest Toxicity'; Quark: its best quantile token). Omit at iteration 1",
    )
    a("--iteration", type=int, default=ITERATION, help="ALT iteration k stored in each row")
    a("--shard", type=bookkeeping.parse_shard, help="i/n: only prompts with index %% n == i")
    a("--merge", metavar="OUT", help="join OUT.shard-*-of-n into OUT and exit")
    dtypes = ("float32", "bfloat16", "float16")
    a("--dtype", choices=dtypes, help="default: bfloat16 on GPU, float32 on CPU")
    a("--overwrite", action="store_true", help="redo even when OUT exists")
    a("--no-progress", action="store_true", help="hide the tqdm bar")
    args = p.parse_args(argv)
    if args.merge is None and not (args.model and args.prompts and args.out):
        p.error("--model, --prompts and --out are required (or --merge OUT)")
    return check_sampling_flags(p, args)


def sampling_settings(args):
    """generate_batched's settings from a stage's flags (evaluate.py has no --exact-sampler)."""
    return {k: getattr(args, k) for k in SAMPLING.split() if hasattr(args, k)}


def feedback_per_prompt(n, feedback, pool, seed):
    """Each of n prompts' f̂: `feedback` (None: x alone) or a seeded draw from `pool` (ALT_LMU)."""
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(n)] if pool else [feedback] * n


# ----------------------------------------------------------------------------- batched sampling
class InverseCdfSampler(LogitsProcessor):
    """An exact draw y_t ~ softmax(scores) by inverse CDF, one uniform per row: scores become -inf
    except at the draw, so greedy decoding emits it. Not do_sample=True: torch.multinomial draws one
    exponential per vocab entry (27% of CPU time at 256 rows x 8k vocab); this is one cumsum."""

    def __call__(self, input_ids, scores):
        probs = scores.float().softmax(-1)  # (rows, V), after suppression, temperature and top-p
        # float32 rounding moves a token's share by ~1e-7 x sqrt(V): far below sampling noise
        cdf = probs.cumsum(-1)
        total = cdf[:, -1:]
        u = torch.rand(len(cdf), 1, device=cdf.device, dtype=cdf.dtype) * total
        u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))  # < total, even rounded up
        pick = torch.searchsorted(cdf, u, right=True)  # first cdf > u: it rose there, so p > 0
        return torch.full_like(scores, -float("inf")).scatter_(1, pick, 0.0)


def sampler(top_p, temperature):
    """Logits processors: HF's temperature and top-p warpers, then the exact sampler."""
    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    return LogitsProcessorList([*warpers, InverseCdfSampler()])


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
    """One model.generate call on left-padded inputs -> per input, num_samples result dicts."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos = sorted({*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id} - {None})
    greedy = temperature == 0
    k = 1 if greedy else num_samples
    rows = [t for t in batch_ids for _ in range(k)]  # row r*k + j is sample j of input r
    input_ids, mask = bookkeeping.pad_batch(rows, pad, left=True)  # (B * k, width)
    width = input_ids.shape[1]
    # the textbook path: y_t ~ p_θ(· | f̂, x, y<t), HF's nucleus sampling (top_k 0: no top-k cut)
    draw = dict(do_sample=True, top_p=top_p, temperature=temperature, top_k=0)
    if greedy or exact_sampler:  # greedy decoding, or greedy over InverseCdfSampler's one-hot draw
        processors = None if greedy else sampler(top_p, temperature)
        draw = dict(do_sample=False, logits_processor=processors)
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
    gen = out[:, width:].cpu()  # (B * k, <= max_new_tokens)
    is_eos = torch.isin(gen, torch.tensor(eos))
    ended = is_eos.any(1)
    n = torch.where(ended, is_eos.int().argmax(1), gen.shape[1]).tolist()  # tokens before EOS
    toks = [g[:m] for g, m in zip(gen.tolist(), n)]
    texts = tokenizer.batch_decode(
        toks, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    ys = [
        {"generation": t, "truncated": not e, "num_tokens": m, **({"ids": i} if return_ids else {})}
        for t, e, m, i in zip(texts, ended.tolist(), n, toks)
    ]
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
    """num_samples continuations of each already-conditioned input string, by batched generate.
    Returns, aligned with `inputs`, lists of num_samples {"generation", "truncated", "num_tokens"};
    return_ids adds "ids": y's token ids before EOS (exact, for RL log-probs; re-encoding can
    differ). done {batch index: its results} skips those batches (resume); on_batch(b, results)
    runs after each new batch; stats (a dict) gets counts (generations, prompts_truncated, ...)."""
    ids = tokenizer(list(inputs), add_special_tokens=True)["input_ids"] if inputs else []
    ctx, sep = bookkeeping.context_length(model.config), tokenizer.get_vocab().get(SEPARATOR)
    # inputs past the context lose their start, never f̂ + separator; batches of similar lengths
    ids, batches = bookkeeping.plan_batches(ids, batch_size, ctx, max_new_tokens, sep, stats)
    model.eval()

    def step(b, idx):
        torch.manual_seed(bookkeeping.batch_seed(seed, b))  # a resumed run redraws what it skipped
        xs = [ids[i] for i in idx]
        draw = (top_p, temperature, return_ids, min_new_tokens, exact_sampler)
        return sample_batch(model, tokenizer, xs, num_samples, max_new_tokens, *draw)

    return bookkeeping.run_batches(
        batches, step, len(ids), done, on_batch, num_samples, stats, desc=desc, disable=not progress
    )


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.merge is not None:
        return bookkeeping.merge_shards(args.merge, args.overwrite)
    out = bookkeeping.shard_path(args.out, args.shard)
    side = out + ".partial"  # finished batches of a run in progress, for resume
    bookkeeping.refuse_overlap(
        {"--out": [out, side]},
        {"--prompts": args.prompts, "--model": args.model, "--condition-pool": args.condition_pool},
    )
    if bookkeeping.finished("sample.py", out, args):
        return
    pool = bookkeeping.load_condition_pool(args.condition_pool) if args.condition_pool else None
    for f in pool or [args.condition]:
        if f is not None and (not f.strip() or SEPARATOR in f):
            raise AltError(
                f"feedback {f!r} is empty or contains {SEPARATOR}; "
                "omit --condition for unconditioned x"
            )
    local = args.prompts.endswith((".jsonl", ".json")) or args.prompts.startswith((".", os.sep))
    if args.prompt_field is None and local and not os.path.exists(args.prompts):
        raise AltError(f"{args.prompts}: no such prompt file")  # else: an HF dataset name
    prompts = common.load_prompts(args.prompts, args.split, args.prompt_field)
    # f̂ per prompt, drawn over the whole file so that every shard agrees with an unsharded run
    conds = feedback_per_prompt(len(prompts), args.condition, pool, args.seed)
    shard_i, shard_n = args.shard or (0, 1)
    nonempty = bookkeeping.check_prompts(
        prompts, args.prompts, SEPARATOR, allow_none=args.shard is not None
    )
    keep = [i for i in nonempty if i % shard_n == shard_i]
    n_mine = len(range(shard_i, len(prompts), shard_n))

    stats, rows = {}, []
    if keep:
        device, dtype = bookkeeping.default_device_dtype()
        device, dtype = args.device or device, args.dtype or dtype
        quark = {t for f in set(conds) - {None} for t in re.findall(r"<\|quantile_\d+\|>", f)}
        model, tok = common.load_policy(
            args.model, device, dtype, sorted(quark), trust_remote_code=args.trust_remote_code
        )
        inputs = [common.condition(prompts[i]["prompt"], conds[i]) for i in keep]
        settings = sampling_settings(args)
        digest = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()
        config = dict(model=args.model, inputs=digest, **settings, device=device, dtype=dtype)
        done, fh = bookkeeping.open_journal(side, config, fresh=args.overwrite)
        done = bookkeeping.batches_done(done)
        if done:
            print(f"resuming: {len(done)} finished batches in {side}", file=sys.stderr)
        with fh:
            on_batch = bookkeeping.journal_batch(fh)
            kw = dict(progress=not args.no_progress, done=done, stats=stats, on_batch=on_batch)
            results = generate_batched(model, tok, inputs, **kw, **settings)
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
        f"sample.py: {len(rows)} rows ({len(keep)} prompts x {args.num_samples}) -> {out}; skipped "
        f"{n_mine - len(keep)} empty prompts; left-truncated {stats.get('prompts_truncated', 0)} "
        f"over-long prompts; {sum(r['truncated'] for r in rows)} generations hit --max-new-tokens; "
        f"{stats.get('batches_resumed', 0)} batches resumed; {rate:.1f} generations/s"
    )


if __name__ == "__main__":
    bookkeeping.cli(main)
