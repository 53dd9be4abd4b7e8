"""Benchmark feedback.py: offline scorer throughput, LLM judge concurrency against a 100 ms stub, cached rerun.

    python -m bench.bench_feedback        (from the repo root; about 15 s on 2 CPU cores; no network, no GPU)
Targets: profanity-check >= 10k texts/s; judge requests/s at --concurrency 16 >= 10x that at 1; cached rerun sends 0.
"""

import contextlib
import io
import json
import os
import random
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"
import feedback
import scorers
from tests.stub_servers import openai_stub

WORDS = "the a cat dog sat on mat you are so stupid idiot nice kind people went to market today hate love".split()
rng = random.Random(0)


def text(n, r=rng):
    return " ".join(r.choice(WORDS) for _ in range(n))


# ----------------------------------------------------------------------------- offline scorer
score = scorers.make_scorer("profanity-check")
texts = [text(rng.randint(5, 30)) for _ in range(50_000)]
score(texts[:100])  # warm up
t0 = time.perf_counter()
tox = score(texts)
scorer_tps = len(texts) / (time.perf_counter() - t0)
assert len(tox) == len(texts) and all(0 <= v <= 1 for v in tox)
print(f"scorer profanity-check: {scorer_tps:,.0f} texts/s over {len(texts):,} texts")


# ----------------------------------------------------------------------------- LLM judge
def run(stub, n, concurrency, folder, cache):
    # distinct (x, y): one request each
    rows = [
        {
            "prompt_id": i,
            "sample_idx": 0,
            "iteration": 1,
            "prompt": f"Human: question {i}?\n\nAssistant:",
            "generation": f"reply {i}: {text(12, random.Random(i))}",
        }
        for i in range(n)
    ]
    samples = os.path.join(folder, f"s{n}.jsonl")
    with open(samples, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    before, t0 = stub.requests, time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        feedback.main(
            [
                "--method",
                "alt-lmc",
                "--samples",
                samples,
                "--out",
                os.path.join(folder, f"p{n}.jsonl"),
                "--base-url",
                stub.url,
                "--llm-model",
                "stub",
                "--concurrency",
                str(concurrency),
                "--cache",
                cache,
                "--overwrite",
            ]
        )
    return stub.requests - before, time.perf_counter() - t0


with (
    tempfile.TemporaryDirectory() as tmp,
    openai_stub(lambda t, n: "Harmless and helpful", latency=0.1) as stub,
):
    os.environ.pop("OPENAI_API_KEY", None)
    # first-call imports and client setup, untimed
    run(stub, 2, 2, tmp, os.path.join(tmp, "warmup.jsonl"))
    n1, s1 = run(stub, 20, 1, tmp, os.path.join(tmp, "c1.jsonl"))
    n16, s16 = run(stub, 320, 16, tmp, os.path.join(tmp, "c16.jsonl"))
    cached, s_cached = run(stub, 320, 16, tmp, os.path.join(tmp, "c16.jsonl"))
rps1, rps16 = n1 / s1, n16 / s16
print(
    f"judge vs stub (100 ms latency): concurrency 1: {rps1:.1f} req/s ({n1} in {s1:.2f} s); "
    f"concurrency 16: {rps16:.1f} req/s ({n16} in {s16:.2f} s)"
)
print(f"cached rerun of the 320 rows: {cached} requests in {s_cached:.2f} s")
print(
    f"ratios: scorer {scorer_tps / 10_000:.1f}x the 10k texts/s target | judge concurrency 16 vs 1: "
    f"{rps16 / rps1:.1f}x (target >= 10x) | cached rerun requests: {cached} (target 0)"
)
