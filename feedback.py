"""feedback.py: stage 2 of ALT's Algorithm 1. Every new sample y ~ p_θ(·|f̂, x) gets a textual feedback f = F(x, y)
and joins the datapool: D_k = D_{k-1} ∪ {(x, y, r, f)}.

Input   --samples  sample.py's JSONL, one row per (x, y) (see common.py; prompt_id, prompt, generation required).
        --pool     D_{k-1}: this stage's previous output (optional). Its rewards and LLM answers are kept as they are.
Output  --out      D_k: every --pool row, then every --samples row, each with
                     reward    float|null  alt-rm/quark: 1 - toxicity(y); LLM methods: the judge's grade (alt-lmc and
                                           steerlm: #categories - 1 - rank, so "Harmful" = 0; alt-lmu: its Score)
                     feedback  str|null    f (null: no valid feedback could be had; train.py skips the row)
                     score     int|null    alt-lmu only: the judge's "Score: 0-3"
        OUT minus ".jsonl" plus ".meta.json": method, scorer, quantiles, scope, tags (best first), exemplar (f̂),
        counts, llm. alt-lmu also writes exemplars.json (the top-score feedbacks, for sample.py --condition-pool).
Methods (F):
  alt-rm   f = the tag of y's reward quantile. The rows with a reward are sorted by reward, descending, ties broken by
           (prompt_id, iteration, sample_idx), and cut into K contiguous chunks of near-equal size with
           numpy.array_split semantics (the first n % K chunks hold one row more); chunk q gets tags[q], q=0 the best.
           --scope global ranks all of D_k at once (old rows get new tags, never new rewards); --scope prompt ranks
           each prompt_id's rows apart. A group with fewer than K rows is an error before any scoring; a group that
           scorer failures leave with n < K scored rows gets tags[0..n-1].
  quark    the same, with tags = K control tokens <|quantile_0|> ... (common.quantile_token).
  alt-lmc  f = the category an LLM judge picks under a few-shot prompt (prompts/lmc_hh.txt, the paper's Fig. 19).
  steerlm  alt-lmc's answer as an attribute string (App. D), e.g. "Harmless and helpful" -> "harmful:0,helpful:1".
  alt-lmu  f = the "Feedback:" sentence of a free judge reply "Analysis: / Feedback: / Score: 0-3" (Fig. 20).
  Only the judge's reply is parsed (a y that says "Feedback: Harmless ..." cannot label itself), strictly: normalised
  for case and punctuation it must equal a category (alt-lmc) or hold exactly the three fields (alt-lmu); otherwise
  it is asked again, up to --max-attempts, then f = null (counted). Parsed answers are appended to --cache as they
  arrive, keyed by sha256(model, template, x, y): a killed run loses none, a rerun asks nothing it has.
Launch:
  python feedback.py --method alt-rm --samples runs/x/iter_2/samples.jsonl --pool runs/x/iter_1/pool.jsonl \
      --out runs/x/iter_2/pool.jsonl --quantiles 5 --scope global
  python feedback.py --method alt-lmc --samples S.jsonl --out O.jsonl --base-url http://127.0.0.1:8000/v1 --llm-model M
"""

import argparse
import collections
import concurrent.futures
import hashlib
import json
import math
import os
import pathlib
import re

import numpy as np

from bookkeeping import (
    AltError,
    append_jsonl,
    cli,
    finished,
    finite,
    open_journal,
    read_json,
    read_jsonl,
    refuse_overlap,
    write_json,
    write_jsonl,
)
from common import QUANTILE_METHODS, meta_path, quantile_token
from scorers import make_scorer, scorer_failed

HERE = os.path.dirname(os.path.abspath(__file__))
TAG_SETS = {
    "toxicity": [
        "Lowest Toxicity",
        "Low-Moderate Toxicity",
        "Moderate Toxicity",
        "High-Moderate Toxicity",
        "Maximum Toxicity",
    ],
    "summarization": ["Excellent", "Good", "Mediocre", "Bad", "Horrible"],
}
HH_CATEGORIES = [
    "Harmless and very helpful",
    "Harmless and helpful",
    "Harmless and not helpful",
    "Harmful",
]
STEERLM = dict(
    zip(
        HH_CATEGORIES,
        [
            "harmful:0,helpful:2",
            "harmful:0,helpful:1",
            "harmful:0,helpful:0",
            "harmful:1,helpful:0",
        ],
    )
)
LLM_METHODS = ("alt-lmc", "alt-lmu", "steerlm")
# the ids of a row, hashed and sorted on (check_row kinds)
ROW_IDS = {"prompt_id": (int, str), "iteration": (int, None), "sample_idx": (int, None)}

parser = argparse.ArgumentParser(
    description="ALT stage 2: feedback f = F(x, y) for new samples; writes D_k."
)
p = parser.add_argument
p(
    "--method",
    required=True,
    choices=QUANTILE_METHODS + LLM_METHODS,
    help="F (paper: ALT_RM, Quark, ALT_LMC...)",
)
p("--samples", required=True, help="new (x, y) rows from sample.py (JSONL)")
p("--pool", default=None, help="D_{k-1}, the previous pool.jsonl (omit at iteration 1)")
p("--out", required=True, help="D_k, must end in .jsonl; the meta sidecar goes beside it")
p("--overwrite", action="store_true", help="redo even if --out and its meta exist")
p(
    "--scorer",
    default="profanity-check",
    help="toxicity scorer: profanity-check | hf:MODEL[:LABEL] | perspective "
    "(paper: Perspective API; key from env PERSPECTIVE_API_KEY, URL from env PERSPECTIVE_API_URL)",
)
p("--quantiles", type=int, default=5, help="K reward quantiles (paper: 5)")
p(
    "--scope",
    default="global",
    choices=["global", "prompt"],
    help="quantiles over D_k (paper: toxicity) | per prompt",
)
p(
    "--tags",
    default="toxicity",
    help="quantile tags, best first: toxicity | summarization | a,b,c (paper: toxicity)",
)
p(
    "--scorer-is-reward",
    action="store_true",
    help="the scorer gives a reward, higher = better (e.g. a TL;DR reward model): r = s, not 1 - s",
)
p(
    "--qps",
    type=float,
    default=1.0,
    help="Perspective requests per second (paper: the API's default quota, 1)",
)
p("--batch-size", type=int, default=256, help="texts per scorer batch")
p(
    "--base-url",
    default=None,
    help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (default: OpenAI; key "
    "from env OPENAI_API_KEY, may be absent for local servers)",
)
p("--llm-model", default="gpt-3.5-turbo-0125", help="judge model (paper: GPT-3.5-Turbo)")
p(
    "--prompt-template",
    default=None,
    help="judge template with {prompt}, {generation} (default: prompts/lm[cu]_hh.txt)",
)
p(
    "--categories",
    default=",".join(HH_CATEGORIES),
    help="alt-lmc categories, best first (paper: the 4 HH ones)",
)
p("--concurrency", type=int, default=16, help="judge requests in flight")
p("--cache", default=None, help="judge answer cache (JSONL; default: llm_cache.jsonl beside --out)")
p(
    "--max-attempts",
    type=int,
    default=3,
    help="asks per (x, y) before f = null (on top of the client's retries)",
)
p(
    "--max-retries",
    type=finite(0, kind=int),
    default=3,
    help="openai client retries on 429 / 5xx / timeouts, with backoff",
)
p("--timeout", type=finite(0, strict=True), default=60.0, help="seconds per judge request")
p("--temperature", type=finite(0), default=0.0, help="judge temperature (paper: 0)")
p(
    "--max-tokens",
    type=finite(1, kind=int),
    default=None,
    help="judge reply tokens (default: 16 for categories, 256 for alt-lmu)",
)


# ----------------------------------------------------------------------------- quantile feedback (alt-rm, quark)
def assign_quantiles(rows, k, scope="global"):
    """Quantile index per row, 0 = highest reward, None where reward is None (the rule: module docstring)."""
    groups = collections.defaultdict(list)
    for i, r in enumerate(rows):
        if r["reward"] is not None:
            groups[r["prompt_id"] if scope == "prompt" else None].append(i)
    out = [None] * len(rows)
    for idx in groups.values():
        idx.sort(
            key=lambda i: (
                -rows[i]["reward"],
                isinstance(rows[i]["prompt_id"], str),  # ints < strs
                rows[i]["prompt_id"],
                rows[i].get("iteration") or 0,
                rows[i].get("sample_idx") or 0,
                i,
            )
        )
        for q, chunk in enumerate(np.array_split(np.array(idx), k)):
            for i in chunk.tolist():
                out[i] = q
    return out


# ----------------------------------------------------------------------------- LLM feedback (alt-lmc, alt-lmu, steerlm)
def normalise(text):
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def parse_category(reply, categories):
    """The category the WHOLE reply equals once normalised (case, punctuation, an optional "Feedback:"), else None."""
    norm = (normalise(reply) if isinstance(reply, str) else "").removeprefix("feedback ")
    return next((c for c in categories if normalise(c) == norm), None)


LMU_RE = re.compile(
    r"\s*analysis:(?P<a>.+?)^\s*feedback:[ \t]*(?P<f>[^\n]*?)\s*^\s*score:[ \t]*(?P<s>[0-3])[ \t.]*\s*",
    re.I | re.S | re.M,
)


def parse_unconstrained(reply):
    """(feedback, score) from a reply "Analysis: ...\\nFeedback: <one line>\\nScore: <0-3>" and no more, else None."""
    m = LMU_RE.fullmatch(reply) if isinstance(reply, str) else None
    if not m or not m["a"].strip() or not normalise(m["f"]):
        return None
    return m["f"].strip(), int(m["s"])


def fill(template, x, y):
    """One pass, so braces inside x or y are never substituted."""
    return re.sub(
        r"\{(prompt|generation)\}", lambda m: {"prompt": x, "generation": y}[m[1]], template
    )


def cache_key(model, template, x, y):
    return hashlib.sha256(
        json.dumps([model, template, x, y], ensure_ascii=False).encode()
    ).hexdigest()


def ask_judge(items, args, template, parse):
    """items [(x, y)] -> ([parse(reply) or None], stats). Cached replies are reused; new ones appended as they come."""
    import openai
    from tqdm import tqdm

    keys = [cache_key(args.llm_model, template, x, y) for x, y in items]
    # replies as they arrived: a killed run loses none, a rerun asks nothing it has
    rows, fh = open_journal(args.cache)
    cache = {r.get("key"): r["reply"] for r in rows if parse(r.get("reply")) is not None}
    # one ask per distinct (x, y)
    todo = sorted({k: i for i, k in enumerate(keys) if k not in cache}.values())
    stats = collections.Counter(cached=len(items) - len(todo))
    client = openai.OpenAI(
        base_url=args.base_url,
        api_key=os.environ.get("OPENAI_API_KEY") or "unused",
        timeout=args.timeout,
        max_retries=args.max_retries,
    )

    def ask(i):
        got = collections.Counter()
        for _ in range(args.max_attempts):
            got["requests"] += 1
            try:
                r = client.chat.completions.create(
                    model=args.llm_model,
                    temperature=args.temperature,
                    max_tokens=args.max_tokens,
                    messages=[{"role": "user", "content": fill(template, *items[i])}],
                )
                reply = r.choices[0].message.content
                got["prompt_tokens"] += getattr(r.usage, "prompt_tokens", 0) or 0
                got["completion_tokens"] += getattr(r.usage, "completion_tokens", 0) or 0
            except Exception as e:
                # timeouts, 429/5xx after the client's retries, garbage bodies: never fatal
                # the class name only: messages may quote the request
                got[f"error_{type(e).__name__}"] += 1
                continue
            if parse(reply) is not None:
                return i, reply, got
            got["error_unparseable"] += 1
        got["failed"] = 1
        return i, None, got

    with (
        fh,
        concurrent.futures.ThreadPoolExecutor(args.concurrency) as ex,
    ):
        futures = [ex.submit(ask, i) for i in todo]
        for fut in tqdm(
            concurrent.futures.as_completed(futures),
            total=len(futures),
            desc="judge",
            mininterval=1,
        ):
            i, reply, got = fut.result()
            stats.update(got)
            if reply is not None:
                cache[keys[i]] = reply
                # durable before we go on
                append_jsonl(fh, {"key": keys[i], "model": args.llm_model, "reply": reply})
    return [parse(cache[k]) if k in cache else None for k in keys], stats


# ----------------------------------------------------------------------------- main
def load_inputs(args, tags):
    """(pool rows, new rows), validated: a pool from another method / K / scorer or with unknown labels is an error."""
    pool = []
    if args.pool:
        pool = read_jsonl(
            args.pool,
            required=("prompt_id", "prompt", "generation", "reward", "feedback"),
            allow_empty=True,
            schema={**ROW_IDS, "reward": (float, None)},
        )
        mp = meta_path(args.pool)
        if os.path.exists(mp):
            meta = read_json(mp)
            want = {"method": args.method} | (
                {"quantiles": args.quantiles, "scorer": args.scorer}
                if args.method in QUANTILE_METHODS
                else {}
            )
            for key, val in want.items():
                if meta.get(key) != val:
                    raise AltError(
                        f"--pool {args.pool} was made with {key} {meta.get(key)!r}, this run uses {val!r} "
                        f"({mp})"
                    )
        for i, r in enumerate(pool, 1):
            if tags is not None and r["feedback"] is not None and r["feedback"] not in tags:
                raise AltError(
                    f"{args.pool}:{i}: feedback {r['feedback']!r} is not one of --method {args.method}'s "
                    f"tags ({', '.join(tags)}): a pool from another method?"
                )
    new = read_jsonl(
        args.samples,
        required=("prompt_id", "prompt", "generation"),
        schema={**ROW_IDS, "prompt": (str,), "generation": (str,)},
    )
    seen = {(r["prompt_id"], r.get("iteration"), r.get("sample_idx")) for r in pool}
    for i, r in enumerate(new, 1):
        if (
            "iteration" in r
            and "sample_idx" in r
            and (r["prompt_id"], r["iteration"], r["sample_idx"]) in seen
        ):
            raise AltError(
                f"{args.samples}:{i}: this (prompt_id, iteration, sample_idx) is already in --pool"
            )
    return pool, new


def main(argv=None):
    args = parser.parse_args(argv)
    for flag, ok in (
        ("--quantiles", args.quantiles >= 1),
        ("--concurrency", args.concurrency >= 1),
        ("--max-attempts", args.max_attempts >= 1),
        ("--qps", args.qps > 0),
        ("--batch-size", args.batch_size >= 1),
        ("--out", args.out.endswith(".jsonl")),
    ):
        if not ok:
            raise AltError(
                f"bad {flag} value (quantiles, concurrency, attempts, batch >= 1; qps > 0; out *.jsonl)"
            )
    meta_out = meta_path(args.out)
    lmu, out_dir = args.method == "alt-lmu", os.path.dirname(os.path.abspath(args.out))
    exemplars = os.path.join(out_dir, "exemplars.json")  # alt-lmu's f̂ list
    judged = args.method in LLM_METHODS  # only the judge methods keep a cache
    args.cache = (args.cache or os.path.join(out_dir, "llm_cache.jsonl")) if judged else None
    outputs = {"--out": [args.out, meta_out] + ([exemplars] if lmu else [])}
    # the cache is read and appended to: an output to the inputs, an input to --out
    refuse_overlap(
        {**outputs, "--cache": args.cache},
        {"--samples": args.samples, "--pool": args.pool, "--prompt-template": args.prompt_template},
    )
    refuse_overlap(outputs, {"--cache": args.cache})
    if finished("feedback.py", args.out, args, [args.out, meta_out]):
        return
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    if args.method == "steerlm" and categories != HH_CATEGORIES:
        raise AltError(
            "steerlm maps exactly the 4 HH categories (App. D); do not change --categories"
        )
    if args.method in QUANTILE_METHODS:
        custom = [t.strip() for t in args.tags.split(",")] if "," in args.tags else None
        tags = (
            [quantile_token(q) for q in range(args.quantiles)]
            if args.method == "quark"
            else TAG_SETS.get(args.tags, custom)
        )
        if (
            tags is None
            or len(tags) != args.quantiles
            or len(set(tags)) != len(tags)
            or not all(tags)
        ):
            raise AltError(
                f"--tags {args.tags!r}: need {args.quantiles} distinct tags (= --quantiles), best first: "
                f"{' | '.join(TAG_SETS)} | a,b,c"
            )
    else:
        tags = (
            None
            if lmu
            else [STEERLM.get(c, c) if args.method == "steerlm" else c for c in categories]
        )
    pool, new = load_inputs(args, tags)
    rows = pool + new
    counts = {"pool_rows": len(pool), "new_rows": len(new), "rows": len(rows)}
    # f̂: the best tag, or alt-lmu's list
    exemplar = tags[0] if tags else exemplars
    llm = None

    if args.method in QUANTILE_METHODS:
        sizes = collections.Counter(
            f"prompt_id {r['prompt_id']}" if args.scope == "prompt" else "D_k" for r in rows
        )
        small = next(((g, n) for g, n in sizes.items() if n < args.quantiles), None)
        if small:
            raise AltError(
                f"--quantiles {args.quantiles} > {small[1]} rows in {small[0]} (use a smaller K"
                f"{' or --scope global' if args.scope == 'prompt' else ''})"
            )
        score = make_scorer(args.scorer, qps=args.qps, batch_size=args.batch_size)
        print(
            f"scoring {len(new)} new rows with {args.scorer} ({len(pool)} pool rows keep their reward)"
        )
        for r, t in zip(new, score([r["generation"] for r in new])):
            ok = t is not None and math.isfinite(t)
            r["reward"] = (t if args.scorer_is_reward else 1.0 - t) if ok else None  # 1 - toxicity
        counts["reward_null"] = sum(r["reward"] is None for r in new)
        counts |= {f"scorer_{k}": v for k, v in getattr(score, "errors", {}).items()}
        if new and counts["reward_null"] == len(new):
            raise scorer_failed(args.scorer, len(new), getattr(score, "errors", {}))
        for r, q in zip(rows, assign_quantiles(rows, args.quantiles, args.scope)):
            r["feedback"] = None if q is None else tags[q]
    else:
        tpath = args.prompt_template or os.path.join(
            HERE, "prompts", "lmu_hh.txt" if lmu else "lmc_hh.txt"
        )
        template = (
            pathlib.Path(tpath).read_bytes().decode("utf-8", "replace")
            if os.path.isfile(tpath)
            else ""
        )
        if "{prompt}" not in template or "{generation}" not in template or "\ufffd" in template:
            raise AltError(
                f"--prompt-template {tpath}: not a UTF-8 file with both {{prompt}} and {{generation}}"
            )
        if not args.base_url and not os.environ.get("OPENAI_API_KEY"):
            raise AltError(
                "set OPENAI_API_KEY in the environment, or --base-url for a local server"
            )
        args.max_tokens = args.max_tokens or (256 if lmu else 16)
        parse = parse_unconstrained if lmu else lambda reply: parse_category(reply, categories)
        answers, stats = ask_judge(
            [(r["prompt"], r["generation"]) for r in new], args, template, parse
        )
        for r, a in zip(new, answers):
            if lmu:
                r["feedback"], r["score"] = a or (None, None)
            else:
                r["feedback"] = a if a is None or args.method == "alt-lmc" else STEERLM[a]
            r["reward"] = (
                None
                if a is None
                else float(a[1] if lmu else len(categories) - 1 - categories.index(a))
            )
        counts |= dict(sorted(stats.items()))
        print(
            f"judge {args.llm_model}: {stats['requests']} requests, {stats['cached']} cached, {stats['failed']} "
            f"failed; tokens: {stats['prompt_tokens']} prompt + {stats['completion_tokens']} completion"
        )
        if new and stats["failed"] == len(new):
            raise AltError(
                f"the judge gave no valid answer for any of the {len(new)} new rows "
                f"({', '.join(k for k in stats if k.startswith('error_'))}); is --base-url right?"
            )
        llm = {
            "base_url": args.base_url,
            "model": args.llm_model,
            "template": tpath,
            "temperature": args.temperature,
            "template_sha256": hashlib.sha256(template.encode()).hexdigest(),
            "cache": args.cache,
        }
        if lmu:
            scored = [
                r for r in rows if r.get("feedback") is not None and r.get("score") is not None
            ]
            top = max((r["score"] for r in scored), default=None)
            write_json(
                exemplar, list(dict.fromkeys(r["feedback"] for r in scored if r["score"] == top))
            )
            counts["exemplar_score"] = top

    counts["feedback_null"] = sum(r["feedback"] is None for r in rows)
    if tags:
        counts["per_tag"] = {t: sum(r["feedback"] == t for r in rows) for t in tags}
    write_jsonl(args.out, rows)
    write_json(
        meta_out,
        {
            "method": args.method,
            "scorer": args.scorer if llm is None else f"llm:{args.llm_model}",
            "quantiles": args.quantiles if llm is None else None,
            "scope": args.scope if llm is None else None,
            "tags": tags,
            "exemplar": exemplar,
            "counts": counts,
            "llm": llm,
        },
    )
    print(
        f"wrote {len(rows)} rows ({len(pool)} + {len(new)} new, {counts['feedback_null']} without f) to {args.out}"
    )
    print(f"exemplar f̂ for the next iteration: {exemplar}")


if __name__ == "__main__":
    cli(main)
