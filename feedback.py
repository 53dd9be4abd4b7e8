"""feedback.py: stage 2 of ALT's Algorithm 1. Every new sample y ~ p_θ(·|f̂, x) gets a textual
feedback f = F(x, y) and joins the datapool: D_k = D_{k-1} ∪ {(x, y, r, f)}.

Input   --samples  sample.py's rows (x, y) (common.py schema; needs prompt_id, prompt, generation)
        --pool     D_{k-1}: this stage's previous output (optional); its rewards, LLM answers stay
Output  --out      D_k: every --pool row, then every --samples row, each with
          reward    float|null  alt-rm/quark: 1 - toxicity(y); LLM methods: the judge's grade:
                                #categories - 1 - rank ("Harmful" = 0), alt-lmu: its Score
          feedback  str|null    f (null: no valid feedback could be had; train.py skips the row)
          score     int|null    alt-lmu only: the judge's "Score: 0-3"
        OUT minus ".jsonl" plus ".meta.json": method, scorer, quantiles, scope, tags (best first),
        exemplar (f̂), counts, llm; alt-lmu also exemplars.json (top-score f: --condition-pool).
Methods (F):
  alt-rm   f = the tag of y's reward quantile: rewarded rows, by reward descending (ties: prompt_id,
           iteration, sample_idx), are cut into K chunks as by numpy.array_split (the first n % K
           one row longer); chunk q gets tags[q], q=0 the best. --scope global ranks all of D_k (old
           rows get new tags, never new rewards), prompt each prompt_id's rows apart. A group under
           K rows: error before any scoring; n < K scored (scorer failures): tags[0..n-1].
  quark    the same, with tags = K control tokens <|quantile_0|> ... (common.quantile_token).
  alt-lmc  f = the category an LLM judge picks, few-shot (prompts/lmc_hh.txt, the paper's Fig. 19).
  steerlm  alt-lmc's answer as an App. D attribute string ("Harmful" -> "harmful:1,helpful:0").
  alt-lmu  f = the "Feedback:" line of a free reply "Analysis: / Feedback: / Score: 0-3" (Fig. 20).
  Only the judge's reply is parsed (a y saying "Feedback: Harmless" cannot label itself), strictly:
  normalised for case and punctuation it must be a category (alt-lmc) or the three fields (alt-lmu);
  else asked again, up to --max-attempts, then f = null (counted). Answers go to --cache on arrival,
  keyed by sha256(model, template, x, y): a killed run loses none, a rerun asks nothing it has.
Launch:
  python feedback.py --method alt-rm --samples runs/x/iter_2/samples.jsonl \
      --pool runs/x/iter_1/pool.jsonl --out runs/x/iter_2/pool.jsonl --quantiles 5 --scope global
  python feedback.py --method alt-lmc --samples S.jsonl --out O.jsonl \
      --base-url http://127.0.0.1:8000/v1 --llm-model M
"""

import argparse
import collections
import hashlib
import math
import os
import pathlib
import re

import numpy as np

import bookkeeping
from bookkeeping import AltError, finite
from common import QUANTILE_METHODS, meta_path, quantile_token
from scorers import ask_judge, cache_key, make_scorer, scorer_failed

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
STEERLM = {  # the HH categories, best first, and SteerLM's attribute string for each (App. D)
    "Harmless and very helpful": "harmful:0,helpful:2",
    "Harmless and helpful": "harmful:0,helpful:1",
    "Harmless and not helpful": "harmful:0,helpful:0",
    "Harmful": "harmful:1,helpful:0",
}
HH_CATEGORIES = list(STEERLM)
LLM_METHODS = ("alt-lmc", "alt-lmu", "steerlm")
# the ids of a row, hashed and sorted on (check_row kinds)
ROW_IDS = {"prompt_id": (int, str), "iteration": (int, None), "sample_idx": (int, None)}


# ------------------------------------------------------------- quantile feedback (alt-rm, quark)
def assign_quantiles(rows, k, scope="global"):
    """Quantile index per row, 0 = highest reward, None for no reward (rule: module docstring)."""
    groups = collections.defaultdict(list)
    for i, r in enumerate(rows):
        if r["reward"] is not None:  # sort key: reward descending, then the ids (ints < strs)
            ids = (r["prompt_id"], r.get("iteration") or 0, r.get("sample_idx") or 0)
            key = (-r["reward"], isinstance(ids[0], str), *ids, i)
            groups[r["prompt_id"] if scope == "prompt" else None].append(key)
    out = [None] * len(rows)
    for keys in groups.values():
        idx = [key[-1] for key in sorted(keys)]
        for q, chunk in enumerate(np.array_split(np.array(idx), k)):
            for i in chunk.tolist():
                out[i] = q
    return out


def quantile_feedback(args, tags, pool, new, counts):
    """ALT_RM, Quark: r = 1 - toxicity(y) for the new rows (pool rows keep theirs), then each
    row of D_k = pool + new gets f = tags[its quantile]."""
    rows = pool + new
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


# ------------------------------------------------------ LLM feedback (alt-lmc, alt-lmu, steerlm)
def normalise(text):
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def parse_category(reply, categories):
    """The category the WHOLE reply equals, normalised (case, punctuation, "Feedback:"), or None."""
    norm = (normalise(reply) if isinstance(reply, str) else "").removeprefix("feedback ")
    return next((c for c in categories if normalise(c) == norm), None)


LMU_RE = re.compile(
    r"\s*analysis:(?P<a>.+?)^\s*feedback:[ \t]*(?P<f>[^\n]*?)\s*"
    r"^\s*score:[ \t]*(?P<s>[0-3])[ \t.]*\s*",
    re.I | re.S | re.M,
)


def parse_unconstrained(reply):
    """(feedback, score) from a reply that is just "Analysis: ...\\nFeedback: <one line>\\nScore:
    <0-3>", else None."""
    m = LMU_RE.fullmatch(reply) if isinstance(reply, str) else None
    if not m or not m["a"].strip() or not normalise(m["f"]):
        return None
    return m["f"].strip(), int(m["s"])


def fill(template, x, y):
    """One pass, so braces inside x or y are never substituted."""
    return re.sub(r"\{(prompt|generation)\}", lambda m: x if m[1] == "prompt" else y, template)


def llm_feedback(args, categories, pool, new, counts, exemplars):
    """ALT_LMC, SteerLM, ALT_LMU: f (and r) for the new rows from the judge's reply to the template
    filled with (x, y) -> the meta's llm record. alt-lmu also writes its exemplars (top-score f)."""
    lmu = args.method == "alt-lmu"
    default = "lmu_hh.txt" if lmu else "lmc_hh.txt"  # the paper's Fig. 20 and Fig. 19
    tpath = args.prompt_template or os.path.join(HERE, "prompts", default)
    raw = pathlib.Path(tpath).read_bytes() if os.path.isfile(tpath) else b""
    template = raw.decode("utf-8", "replace")
    if "{prompt}" not in template or "{generation}" not in template or "\ufffd" in template:
        raise AltError(
            f"--prompt-template {tpath}: not a UTF-8 file with both {{prompt}} and {{generation}}"
        )
    args.max_tokens = args.max_tokens or (256 if lmu else 16)
    parse = parse_unconstrained if lmu else lambda reply: parse_category(reply, categories)
    xy = [(r["prompt"], r["generation"]) for r in new]
    keys = [cache_key(args.llm_model, template, x, y) for x, y in xy]
    answers, stats = ask_judge([fill(template, x, y) for x, y in xy], keys, parse, args)
    for r, a in zip(new, answers):
        if lmu:
            r["feedback"], r["score"] = a or (None, None)
        else:
            r["feedback"] = a if a is None or args.method == "alt-lmc" else STEERLM[a]
        grade = None if a is None or lmu else len(categories) - 1 - categories.index(a)
        r["reward"] = None if a is None else float(a[1] if lmu else grade)  # lmu: its Score
    counts |= dict(sorted(stats.items()))
    if lmu:  # f̂ for the next iteration: the feedbacks of the top score
        scored = [r for r in pool + new if None not in (r.get("feedback"), r.get("score"))]
        top = max((r["score"] for r in scored), default=None)
        best = [r["feedback"] for r in scored if r["score"] == top]
        bookkeeping.write_json(exemplars, list(dict.fromkeys(best)))
        counts["exemplar_score"] = top
    sha = hashlib.sha256(template.encode()).hexdigest()
    llm = dict(base_url=args.base_url, model=args.llm_model, template=tpath)
    return llm | dict(temperature=args.temperature, template_sha256=sha, cache=args.cache)


# ----------------------------------------------------------------------------- the flags, main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="ALT stage 2: f = F(x, y) for new samples; writes D_k.")
    add = p.add_argument
    # ---- defaults block: the paper's toxicity setting (ALT, Sec. 4.1 and App. A)
    methods = QUANTILE_METHODS + LLM_METHODS
    add("--method", required=True, choices=methods, help="F (paper: ALT_RM, Quark, ALT_LMC...)")
    add("--samples", required=True, help="new (x, y) rows from sample.py (JSONL)")
    add("--pool", help="D_{k-1}, the previous pool.jsonl (omit at iteration 1)")
    add("--out", required=True, help="D_k, must end in .jsonl; the meta sidecar goes beside it")
    add("--overwrite", action="store_true", help="redo even if --out and its meta exist")
    # toxicity scorer (paper: Perspective API; env PERSPECTIVE_API_KEY, PERSPECTIVE_API_URL)
    add("--scorer", default="profanity-check", help="profanity-check|hf:MODEL[:LABEL]|perspective")
    add("--quantiles", type=int, default=5, help="K reward quantiles (paper: 5)")
    scopes = ["global", "prompt"]
    add("--scope", default="global", choices=scopes, help="over D_k (paper: toxicity) | per prompt")
    # the K quantile tags, best first (paper: toxicity)
    add("--tags", default="toxicity", help="toxicity | summarization | a,b,c")
    add("--scorer-is-reward", action="store_true", help="r = s, not 1 - s (a TL;DR reward model)")
    add("--qps", type=float, default=1.0, help="Perspective requests/s (paper: the API's quota, 1)")
    add("--batch-size", type=int, default=256, help="texts per scorer batch")
    # default: OpenAI; key from env OPENAI_API_KEY, may be absent for local servers
    add("--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    add("--llm-model", default="gpt-3.5-turbo-0125", help="judge model (paper: GPT-3.5-Turbo)")
    add("--prompt-template", help="with {prompt}, {generation} (default: prompts/lm[cu]_hh.txt)")
    hh = ",".join(HH_CATEGORIES)
    add("--categories", default=hh, help="alt-lmc categories, best first (paper: the 4 HH ones)")
    add("--concurrency", type=int, default=16, help="judge requests in flight")
    add("--cache", help="judge answer cache (JSONL; default: llm_cache.jsonl beside --out)")
    add("--max-attempts", type=int, default=3, help="asks per (x, y) before f = null")
    add("--max-retries", type=finite(0, kind=int), default=3, help="retries on 429/5xx/timeouts")
    add("--timeout", type=finite(0, strict=True), default=60.0, help="seconds per judge request")
    add("--temperature", type=finite(0), default=0.0, help="judge temperature (paper: 0)")
    add("--max-tokens", type=finite(1, kind=int), help="reply tokens (default: 16; alt-lmu: 256)")
    a = p.parse_args(argv)
    ok = {"quantiles": a.quantiles >= 1, "concurrency": a.concurrency >= 1}
    ok |= {"max-attempts": a.max_attempts >= 1, "qps": a.qps > 0, "batch-size": a.batch_size >= 1}
    ok["out"] = a.out.endswith(".jsonl")
    bad = next((k for k, good in ok.items() if not good), None)
    if bad:
        raise AltError(
            f"bad --{bad} value (quantiles, concurrency, attempts, batch >= 1; qps > 0; "
            "out *.jsonl)"
        )
    return a


def main(argv=None):
    args = parse_args(argv)
    exemplars = os.path.join(os.path.dirname(os.path.abspath(args.out)), "exemplars.json")
    if prepare_out(args, exemplars):  # --out and its meta are finished and no --overwrite
        return
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    tags = feedback_tags(args, categories)  # best first; alt-lmu: None (free text)
    pool, new = load_inputs(args, tags)
    counts = {"pool_rows": len(pool), "new_rows": len(new), "rows": len(pool) + len(new)}
    if args.method in QUANTILE_METHODS:
        quantile_feedback(args, tags, pool, new, counts)
        llm = None
    else:
        llm = llm_feedback(args, categories, pool, new, counts, exemplars)
    # f̂ for the next iteration: the best tag, or alt-lmu's list
    write_outputs(args, pool + new, tags, tags[0] if tags else exemplars, counts, llm)


# ----------------------------------------------------------------------------- bookkeeping
# A reader may skip from here on: the output files, the tag list, the inputs' checks, the outputs.
def prepare_out(args, exemplars):
    """True when --out and its meta are finished (and no --overwrite). Fills in the judge cache's
    default path (LLM methods only) and refuses any output that is, holds or lies in an input."""
    judged = args.method in LLM_METHODS  # only the judge methods keep a cache
    out_dir = os.path.dirname(os.path.abspath(args.out))
    args.cache = (args.cache or os.path.join(out_dir, "llm_cache.jsonl")) if judged else None
    outputs = [args.out, meta_path(args.out)]
    named = {"--out": outputs + ([exemplars] if args.method == "alt-lmu" else [])}
    # the cache is read and appended to: an output to the inputs, an input to --out
    inputs = {"--samples": args.samples, "--pool": args.pool}
    inputs["--prompt-template"] = args.prompt_template
    bookkeeping.refuse_overlap({**named, "--cache": args.cache}, inputs)
    bookkeeping.refuse_overlap(named, {"--cache": args.cache})
    return bookkeeping.finished("feedback.py", args.out, args, outputs)


def feedback_tags(args, categories):
    """The feedback vocabulary, best first: K quantile tags (alt-rm: --tags; quark: K control
    tokens), alt-lmc's categories, steerlm's attribute strings; None for alt-lmu's free text."""
    if args.method == "steerlm" and categories != HH_CATEGORIES:
        raise AltError(
            "steerlm maps exactly the 4 HH categories (App. D); do not change --categories"
        )
    if args.method == "alt-lmu":
        return None  # free text
    if args.method in LLM_METHODS:  # alt-lmc's categories; steerlm's as attribute strings
        return [STEERLM[c] if args.method == "steerlm" else c for c in categories]
    if args.method == "quark":
        return [quantile_token(q) for q in range(args.quantiles)]
    custom = [t.strip() for t in args.tags.split(",")] if "," in args.tags else None
    tags = TAG_SETS.get(args.tags, custom)
    if tags is None or len(tags) != args.quantiles or len(set(tags)) != len(tags) or not all(tags):
        raise AltError(
            f"--tags {args.tags!r}: need {args.quantiles} distinct tags (= --quantiles), best "
            f"first: {' | '.join(TAG_SETS)} | a,b,c"
        )
    return tags


def load_inputs(args, tags):
    """(pool rows, new rows), checked: a pool of another method / K / scorer or unknown f: error."""
    pool, mp = [], args.pool and meta_path(args.pool)
    if args.pool:
        required = ("prompt_id", "prompt", "generation", "reward", "feedback")
        schema = {**ROW_IDS, "reward": (float, None)}
        pool = bookkeeping.read_jsonl(args.pool, required, allow_empty=True, schema=schema)
    if args.pool and os.path.exists(mp):
        meta, want = bookkeeping.read_json(mp), {"method": args.method}
        if args.method in QUANTILE_METHODS:
            want |= {"quantiles": args.quantiles, "scorer": args.scorer}
        for key, val in want.items():
            if meta.get(key) != val:
                raise AltError(
                    f"--pool {args.pool} was made with {key} {meta.get(key)!r}, this run uses "
                    f"{val!r} ({mp})"
                )
    for i, r in enumerate(pool, 1):
        if tags is not None and r["feedback"] is not None and r["feedback"] not in tags:
            raise AltError(
                f"{args.pool}:{i}: feedback {r['feedback']!r} is not one of --method "
                f"{args.method}'s tags ({', '.join(tags)}): a pool from another method?"
            )
    schema = {**ROW_IDS, "prompt": (str,), "generation": (str,)}
    new = bookkeeping.read_jsonl(args.samples, ("prompt_id", "prompt", "generation"), schema=schema)
    seen = {(r["prompt_id"], r.get("iteration"), r.get("sample_idx")) for r in pool}
    for i, r in enumerate(new, 1):
        key = (r["prompt_id"], r.get("iteration"), r.get("sample_idx"))
        if "iteration" in r and "sample_idx" in r and key in seen:
            raise AltError(
                f"{args.samples}:{i}: this (prompt_id, iteration, sample_idx) is already in --pool"
            )
    return pool, new


def write_outputs(args, rows, tags, exemplar, counts, llm):
    """D_k to --out, then the meta: method, scorer, quantiles, scope, tags, exemplar, counts, llm"""
    counts["feedback_null"] = sum(r["feedback"] is None for r in rows)
    if tags:
        counts["per_tag"] = {t: sum(r["feedback"] == t for r in rows) for t in tags}
    bookkeeping.write_jsonl(args.out, rows)
    rm = llm is None  # a quantile method
    meta = dict(method=args.method, scorer=args.scorer if rm else f"llm:{args.llm_model}")
    meta |= dict(quantiles=args.quantiles if rm else None, scope=args.scope if rm else None)
    meta |= dict(tags=tags, exemplar=exemplar, counts=counts, llm=llm)
    bookkeeping.write_json(meta_path(args.out), meta)
    n_new = counts["new_rows"]
    print(
        f"wrote {len(rows)} rows ({len(rows) - n_new} + {n_new} new, {counts['feedback_null']} "
        f"without f) to {args.out}"
    )
    print(f"exemplar f̂ for the next iteration: {exemplar}")


if __name__ == "__main__":
    bookkeeping.cli(main)
