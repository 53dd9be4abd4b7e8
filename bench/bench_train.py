"""bench/bench_train.py: train.py's speed and memory, every figure measured in this one run.

Prints
  1. tokens/s of train.py's loop with β=0.05 (p_0 forward + exact KL over the vocabulary) vs β=0, on the toy model,
     batch 32 (the paper's), runs interleaved to share the machine's noise; target: the KL step costs <= 1.4x the step without it.
  2. the padding share of train.py's length-bucketed batches (policy and p_0 encodings) on a pool sampled from the toy
     model with sample.generate_batched; target <= 15%.
  3. training FLOP/s on a GPT-2-small-shaped random model (124M, 6 * params * tokens/s, train.py's collate /
     response_logits / alt_loss / AdamW step, the toxicity batch of 32 x (20 + 20) tokens on CPU) as a fraction of
     this machine's torch.mm FLOP/s in the same dtype, measured here: bf16 autocast (train.py --precision bf16) vs
     bf16 torch.mm, the target's ratio; on CPU also fp32 training vs fp32 torch.mm.
  4. peak RSS of this process.
The last line holds the ratios.   Run from the repo root:  HF_HUB_OFFLINE=1 python -m bench.bench_train [--quick]
"""

import argparse
import os
import random
import resource
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported (by sample)

import torch

import bookkeeping
import common
import train
from feedback import TAG_SETS
from sample import generate_batched

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAGS = TAG_SETS["toxicity"]
SLOW_BF16 = 4  # bf16 this many times slower than fp32 means emulated: skip the bf16 part


def toy_model(tmp):
    """toy/model when it has been built, else a random model of the same shape (4 x 256, own 8k BPE)."""
    path = os.path.join(ROOT, "toy", "model")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, "toy/model"
    from transformers import GPT2Config, GPT2LMHeadModel

    from toy.build_toy_model import train_tokenizer

    texts = [
        r["prompt"]
        for r in common.load_prompts(os.path.join(ROOT, "toy", "prompts", "train.jsonl"))
    ]
    tok = train_tokenizer(texts * 4, vocab_size=8192)
    tok.save_pretrained(tmp)
    GPT2LMHeadModel(
        GPT2Config(
            n_layer=4,
            n_embd=256,
            n_head=4,
            n_positions=128,
            vocab_size=len(tok),
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).save_pretrained(tmp)
    return tmp, "random toy-shaped model (toy/model not built)"


def make_pool(model_dir, path, n_sampled, n_rows, seed=0):
    """A real-shaped D_1: every toy train prompt x, a random tag f, and a y drawn from n_sampled real generations
    (sample.generate_batched, <= 20 tokens, from the first n_sampled prompts), so the y lengths are the model's."""
    model, tok = common.load_policy(model_dir, "cpu", "float32")
    prompts = common.load_prompts(os.path.join(ROOT, "toy", "prompts", "train.jsonl"))
    gens = [
        g[0]
        for g in generate_batched(
            model,
            tok,
            [p["prompt"] for p in prompts[:n_sampled]],
            max_new_tokens=20,
            batch_size=64,
            seed=seed,
            progress=False,
        )
    ]
    rng = random.Random(seed)
    rows = []
    for i in range(n_rows):
        p, g = prompts[i % len(prompts)], rng.choice(gens)
        rows.append(
            {
                "prompt_id": p["id"],
                "sample_idx": i // len(prompts),
                "prompt": p["prompt"],
                "generation": g["generation"],
                "condition": None,
                "iteration": 1,
                "truncated": g["truncated"],
                "num_tokens": g["num_tokens"],
                "reward": rng.random(),
                "feedback": rng.choice(TAGS),
            }
        )
    bookkeeping.write_jsonl(path, rows)
    return rows, tok


def padding_share(rows, tok, batch=32):
    ex = train.encode_rows(rows, tok, 128)
    pad = slots = 0
    for key in ("prefix", "ref_prefix"):
        for b in train.plan_epoch(ex, batch, 0, 0):
            m = train.collate([(ex[i][key], ex[i]["response"]) for i in b], tok.pad_token_id)[
                "attention_mask"
            ]
            pad, slots = pad + int((m == 0).sum()), slots + m.numel()
    return pad / slots


def step_seconds(out):
    """{step: seconds} from train_log.jsonl, skipping step 1 (lazy initialisation)."""
    return {
        r["step"]: r["tokens"] / r["tokens_per_s"]
        for r in bookkeeping.read_jsonl(os.path.join(out, "train_log.jsonl"))
        if r["step"] > 1
    }


def matmul_flops(dtype, device, n=2048, windows=5, seconds=0.4):
    """The machine's torch.mm FLOP/s: the best of several short windows (the peak, as the training step's best)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = 0.0
    for _ in range(windows):
        sync()
        k, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, b)
            k += 1
        sync()
        best = max(best, 2 * n**3 * k / (time.perf_counter() - t0))
    return best


def bf16_slowdown(n=256, reps=5):
    """CPU torch.mm time in bf16 / in fp32 (best of reps): >> 1 where the CPU lacks native bf16 and emulates it."""
    best = {}
    for dt in (torch.float32, torch.bfloat16):
        a, b = (torch.randn(n, n, dtype=dt) for _ in range(2))
        torch.mm(a, b)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        best[dt] = min(times)
    return best[torch.bfloat16] / best[torch.float32]


def gpt2_small_flops(device, bf16, batch, prefix, resp, steps):
    """6 * params * tokens/s of train.py's step pieces on a random GPT-2-small shape (β=0: the policy's own step)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_positions=max(1024, prefix + resp))).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, eps=1e-8)
    V = model.config.vocab_size
    pairs = [
        (torch.randint(V, (prefix,)).tolist(), torch.randint(V, (resp,)).tolist())
        for _ in range(batch)
    ]
    b = {k: v.to(device) for k, v in train.collate(pairs, 0).items()}
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels
        t0 = time.perf_counter()
        with torch.autocast(device, torch.bfloat16, enabled=bf16):
            nll, _, ent = train.alt_loss(
                train.response_logits(model, b), None, b["targets"], b["resp_mask"]
            )
            loss = (nll - 0.06 * ent) / b["resp_mask"].sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tokens = batch * (prefix + resp)
    return 6 * params * tokens / min(times[1:]), params, tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="fewer steps (a smoke run, noisier figures)"
    )
    args = p.parse_args()
    t_start = time.time()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    # B: train.py's default, the paper's batch
    steps, reps, B = (3, 1, 32) if args.quick else (6, 5, 32)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, model_name = toy_model(os.path.join(tmp, "toy"))
        pool = os.path.join(tmp, "pool.jsonl")
        t0 = time.time()
        rows, tok = make_pool(model_dir, pool, n_sampled=64, n_rows=2400)
        t_sample = time.time() - t0
        share = padding_share(rows, tok)
        trunc = sum(r["truncated"] for r in rows) / len(rows)
        print(
            f"[1] model: {model_name}; pool: {len(rows)} rows, y from 64 samples drawn in {t_sample:.0f} s, "
            f"{trunc:.0%} truncated at 20 tokens; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        secs, pairs = {0.0: [], 0.05: []}, []
        for rep in range(reps):
            run = {}
            for beta in (0.0, 0.05):  # interleaved: both settings see the same machine load
                out = os.path.join(tmp, f"run_{beta}_{rep}")
                train.main(
                    [
                        "--data",
                        pool,
                        "--model",
                        model_dir,
                        "--ref-model",
                        model_dir,
                        "--out",
                        out,
                        "--beta",
                        str(beta),
                        "--batch-size",
                        str(B),
                        "--max-samples",
                        str(B * (steps + 1)),
                        "--warmup-ratio",
                        "0",
                        "--lr",
                        "1e-5",
                        "--save-every",
                        "100000",
                        "--seed",
                        str(rep),
                    ]
                )
                run[beta] = step_seconds(out)
                secs[beta] += run[beta].values()
            # same seed: step k is the same batch in both
            pairs += [run[0.05][k] / run[0.0][k] for k in run[0.0]]
        # the median of per-batch ratios: one noisy step cannot decide it
        kl_cost = statistics.median(pairs)
        print(
            f"[1] step time (median)  beta=0: {statistics.median(secs[0.0]) * 1e3:.0f} ms   beta=0.05: "
            f"{statistics.median(secs[0.05]) * 1e3:.0f} ms   KL step cost: {kl_cost:.2f}x, median of {len(pairs)} "
            "same-batch ratios (target <= 1.4x)"
        )
        print(
            f"[2] padding share, length-bucketed batches of 32 (policy + p_0 encodings): {share:.1%} (target <= 15%)"
        )

    # [3] the toxicity batch shape (paper: batch 32, ~20-token x and y) on GPT-2-small; CPU also trains in fp32
    dtypes = ("bfloat16",) if cuda else ("float32", "bfloat16")
    slow = 1.0 if cuda else bf16_slowdown()
    # emulated bf16 (e.g. AVX2 only): the bf16 part alone would take many minutes
    if slow > SLOW_BF16:
        dtypes = ("float32",)
        print(
            f"[3] bf16 skipped: a 256x256 torch.mm is {slow:.1f}x slower in bf16 than in fp32 on this CPU "
            f"(no native bf16; skipped above {SLOW_BF16}x)"
        )
    mm = {dt: matmul_flops(getattr(torch, dt), device) for dt in dtypes}
    batch, prefix, resp, n = (32, 64, 64, 10) if cuda else (32, 20, 20, 1 if args.quick else 2)
    print("[3] torch.mm " + ", ".join(f"{k}: {v / 1e9:,.1f} GFLOP/s" for k, v in mm.items()))
    mfu = {}
    for dt in mm:
        flops, params, tokens = gpt2_small_flops(device, dt == "bfloat16", batch, prefix, resp, n)
        mfu[dt] = flops / mm[dt]
        how = "bf16 autocast" if dt == "bfloat16" else "fp32"
        print(
            f"[3] GPT-2-small shape ({params / 1e6:.0f}M params, {batch} x ({prefix} + {resp}) tokens/step, {how}): "
            f"{flops / 1e9:,.1f} GFLOP/s = {mfu[dt]:.1%} of {dt} torch.mm (target >= 30% of bf16)"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"[4] peak RSS: {rss:,.0f} MiB;  bench time {time.time() - t_start:.0f} s wall, "
        f"{use.ru_utime + use.ru_stime:.0f} s CPU, on {device}"
    )
    print(
        f"RATIOS kl_step_cost={kl_cost:.2f}x (<=1.4) padding_share={share:.3f} (<=0.15) "
        + " ".join(f"mfu_{dt}={v:.3f}" for dt, v in mfu.items())
        + f" (bf16 >=0.30) peak_rss_mib={rss:.0f}"
    )


if __name__ == "__main__":
    main()
