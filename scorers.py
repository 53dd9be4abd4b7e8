"""scorers.py: the one place a toxicity scorer is built (as CleanRL's make_env builds an environment).

make_scorer(spec) -> score(texts) -> [toxicity in [0, 1] (higher = more toxic) or None (could not score)], for
    profanity-check      the profanity-check package's linear model (offline, the toy default)
    hf:MODEL[:LABEL]     a Hub or local sequence classifier; LABEL (name or column) picks the toxic class, else the
                         label named toxic/toxicity, else the only or the positive one
    perspective          Google's Perspective API (key: env PERSPECTIVE_API_KEY; URL: env PERSPECTIVE_API_URL),
                         at --qps, retrying 429 / 5xx with backoff and Retry-After; score.errors counts failure kinds
Used by feedback.py (rewards), evaluate.py (metrics) and baselines/ppo.py (the reward model).

ask_judge(prompts, keys, parse, args) -> ([parse(reply) or None], stats): feedback.py's LLM judge, any
    OpenAI-compatible server (--base-url; key: env OPENAI_API_KEY), --concurrency requests in flight, the client's
    retries, --max-attempts asks per prompt, and the answer cache (cache_key) that makes a killed run lose nothing.
"""

import collections
import concurrent.futures
import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request

from bookkeeping import (
    AltError,
    append_jsonl,
    context_length,
    hub_unreachable,
    load_error,
    open_journal,
)

# override with env PERSPECTIVE_API_URL (tests: a stub)
PERSPECTIVE_URL = "https://commentanalyzer.googleapis.com"
PERSPECTIVE_ATTEMPTS = 4


def make_scorer(spec, qps=1.0, batch_size=256):
    """spec -> score(texts) -> [toxicity in [0, 1] (higher = more toxic) or None (could not score)]."""
    if spec == "profanity-check":
        from profanity_check import predict_prob

        # a linear model: per-call overhead, not memory, limits the chunk size
        chunk = max(batch_size, 8192)
        return lambda texts: [
            float(v)
            for i in range(0, len(texts), chunk)
            for v in predict_prob(texts[i : i + chunk])
        ]
    if spec == "perspective":
        return _perspective_scorer(qps)
    if not spec.startswith("hf:"):
        raise AltError(
            f"unknown --scorer '{spec}' (profanity-check, hf:MODEL[:LABEL] or perspective)"
        )
    import torch  # hf:MODEL[:LABEL], a sequence classifier
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    name, _, label = spec[3:].partition(":")
    local = hub_unreachable([name])  # cached, Hub unreachable: load without retries
    try:
        # None would prompt "run custom code?"
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=False, local_files_only=local)
        model = AutoModelForSequenceClassification.from_pretrained(
            name, trust_remote_code=False, local_files_only=local
        )
    except Exception as e:  # OSError, ValueError, SafetensorError (a truncated file)
        raise load_error("classifier", name, e) from None
    cfg = model.config
    names = [str(cfg.id2label.get(i, i)).lower() for i in range(cfg.num_labels)]
    if label:
        col = (
            int(label)
            if label.isdigit()
            else names.index(label.lower())
            if label.lower() in names
            else None
        )
    else:  # a label named toxic(ity), else the only / the positive one
        col = next(
            (names.index(n) for n in ("toxic", "toxicity") if n in names),
            {1: 0, 2: 1}.get(cfg.num_labels),
        )
    if col is None or not 0 <= col < cfg.num_labels:
        raise AltError(
            f"scorer hf:{name}: pick the toxic label with hf:{name}:LABEL (labels: {', '.join(names)})"
        )
    sigmoid = cfg.problem_type == "multi_label_classification" or cfg.num_labels == 1
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cfg.pad_token_id = tok.pad_token_id
    max_len = min(tok.model_max_length, context_length(cfg))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()

    @torch.no_grad()
    def score(texts):
        # less padding
        out, order = [None] * len(texts), sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            enc = tok(
                [texts[i] or " " for i in idx],
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            ).to(device)  # an empty y is scored as " ": zero tokens cannot be classified
            logits = model(**enc).logits.float()  # (batch, num_labels)
            probs = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, -1)
            for i, v in zip(idx, probs[:, col].tolist()):
                out[i] = v
        return out

    return score


def scorer_failed(spec, n, errors):
    """The error when `spec` scored none of n texts, counting its failure kinds (score.errors, e.g. 8 http_500)."""
    kinds = ", ".join(f"{v} {k}" for k, v in sorted(errors.items())) or "no failure recorded"
    return AltError(f"scorer {spec} could not score any of the {n} rows ({kinds})")


def _perspective_scorer(qps):
    key = os.environ.get("PERSPECTIVE_API_KEY")
    if not key:
        raise AltError("--scorer perspective needs PERSPECTIVE_API_KEY in the environment")
    url = (
        os.environ.get("PERSPECTIVE_API_URL", PERSPECTIVE_URL).rstrip("/")
        + "/v1alpha1/comments:analyze"
    )
    timeout, gap, last = float(os.environ.get("PERSPECTIVE_TIMEOUT", "30")), 1.0 / qps, [0.0]
    # a header: never in a URL an error may echo
    head = {"Content-Type": "application/json", "X-Goog-Api-Key": key}
    errors = collections.Counter()

    def one(text):
        if not text.strip():
            return 0.0  # the API rejects empty comments; an empty y says nothing toxic
        body = json.dumps(
            {
                "comment": {"text": text},
                "languages": ["en"],
                "requestedAttributes": {"TOXICITY": {}},
            }
        )
        for attempt in range(PERSPECTIVE_ATTEMPTS):
            time.sleep(max(0.0, last[0] + gap - time.monotonic()))  # --qps rate limit
            # backoff in units of the rate-limit interval
            last[0], wait = time.monotonic(), gap * 2**attempt
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(url, body.encode(), head), timeout=timeout
                ) as r:
                    v = float(
                        json.loads(r.read())["attributeScores"]["TOXICITY"]["summaryScore"]["value"]
                    )
                if 0.0 <= v <= 1.0:
                    return v
                errors["value_out_of_range"] += 1
            except urllib.error.HTTPError as e:
                errors[f"http_{e.code}"] += 1
                if e.code != 429 and e.code < 500:
                    return None  # 4xx: asking again will not help
                after = e.headers.get("Retry-After") or ""
                wait = (
                    max(wait, min(60.0, float(after)))
                    if re.fullmatch(r"\d+(\.\d+)?", after)
                    else wait
                )
            except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as e:
                # reset, timeout, junk
                errors[type(e).__name__] += 1
            if attempt + 1 < PERSPECTIVE_ATTEMPTS:
                time.sleep(wait)
        return None

    score = lambda texts: [one(t) for t in texts]  # noqa: E731
    score.errors = errors  # failure kinds, for the meta counts
    return score


# ------------------------------------------------------------------------- the LLM judge (feedback.py)
def cache_key(model, template, x, y):
    """An answer's key in the judge cache: sha256 of (judge model, template, x, y)."""
    return hashlib.sha256(
        json.dumps([model, template, x, y], ensure_ascii=False).encode()
    ).hexdigest()


def ask_judge(prompts, keys, parse, args):
    """prompts [str] with their cache keys -> ([parse(reply) or None], stats). Replies cached in
    --cache are reused; new ones are appended as they come (one ask per distinct key). A reply
    parse() rejects is asked again, up to --max-attempts. Prints the request and token counts; no
    valid answer at all is an error."""
    if not args.base_url and not os.environ.get("OPENAI_API_KEY"):
        raise AltError("set OPENAI_API_KEY in the environment, or --base-url for a local server")
    import openai
    from tqdm import tqdm

    # replies as they arrived: a killed run loses none, a rerun asks nothing it has
    rows, fh = open_journal(args.cache)
    cache = {r.get("key"): r["reply"] for r in rows if parse(r.get("reply")) is not None}
    todo = sorted({k: i for i, k in enumerate(keys) if k not in cache}.values())
    stats = collections.Counter(cached=len(keys) - len(todo))
    key = os.environ.get("OPENAI_API_KEY") or "unused"
    client = openai.OpenAI(
        base_url=args.base_url, api_key=key, timeout=args.timeout, max_retries=args.max_retries
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
                    messages=[{"role": "user", "content": prompts[i]}],
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

    with fh, concurrent.futures.ThreadPoolExecutor(args.concurrency) as ex:
        futures = [ex.submit(ask, i) for i in todo]
        done = concurrent.futures.as_completed(futures)
        for fut in tqdm(done, total=len(futures), desc="judge", mininterval=1):
            i, reply, got = fut.result()
            stats.update(got)
            if reply is not None:
                cache[keys[i]] = reply
                # durable before we go on
                append_jsonl(fh, {"key": keys[i], "model": args.llm_model, "reply": reply})
    print(
        f"judge {args.llm_model}: {stats['requests']} requests, {stats['cached']} cached, "
        f"{stats['failed']} failed; tokens: {stats['prompt_tokens']} prompt + "
        f"{stats['completion_tokens']} completion"
    )
    if keys and stats["failed"] == len(keys):
        raise AltError(
            f"the judge gave no valid answer for any of the {len(keys)} new rows "
            f"({', '.join(k for k in stats if k.startswith('error_'))}); is --base-url right?"
        )
    return [parse(cache[k]) if k in cache else None for k in keys], stats
