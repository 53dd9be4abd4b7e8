"""bench/bench_baselines.py: tokens/s of a PPO update and a DPO step next to train.py's step, on one toy batch.

The batch: --prompts toy train prompts x 2 samples of <= 20 tokens drawn from the model (sample.generate_batched):
2 x --prompts (x, y) rows (default 32 = train.py's batch), each method timed on exactly these rows.
  train.py step  Equation 1 (train.py's encode_rows / collate / response_logits / alt_loss, β = 0.05, α = 0.06):
                 p_θ forward + backward under condition(x, f), p_0 forward on x, exact KL and entropy, AdamW step
  DPO step       baselines/dpo.py on the rows as pairs (y_w, y_l) per prompt: π_θ forward + backward, π_ref forward
  PPO update     baselines/ppo.learn on the rows as rollouts with ppo.py's defaults: π_old/V_old and p_0 passes, GAE,
                 --ppo-epochs (2) passes of clipped minibatch steps (minibatch 32)
tokens/s = the batch's (x, y) tokens / seconds of one step, the same numerator everywhere, so a ratio is the inverse
cost ratio per token of data learnt from. Steps are interleaved (one untimed warm-up each) and the median of --repeats
is kept, so all three share the machine's noise. The last line holds the ratios (method / train.py).
Run from the repo root:  HF_HUB_OFFLINE=1 python -m bench.bench_baselines     (on a busy machine: OMP_NUM_THREADS=1)
"""

import argparse
import os
import random
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported (by sample)

import torch

import common
import train
from baselines import dpo, ppo
from bench.bench_train import toy_model  # the same toy-or-random model as the train bench
from feedback import TAG_SETS
from sample import generate_batched

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=16, help="prompts; 2 samples each")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    tmp = tempfile.mkdtemp()
    path, what = toy_model(tmp)
    policy, tok = common.load_policy(path, "cpu", "float32")
    ref, _ = common.load_policy(path, "cpu", "float32")
    ref.eval().requires_grad_(False)
    prompts = common.load_prompts(os.path.join(ROOT, "toy", "prompts", "train.jsonl"))[: a.prompts]
    gens = generate_batched(
        policy,
        tok,
        [x["prompt"] for x in prompts],
        num_samples=2,
        max_new_tokens=20,
        seed=0,
        progress=False,
    )
    rng = random.Random(0)
    tags = TAG_SETS["toxicity"]
    rows = [
        {
            "prompt_id": i,
            "prompt": x["prompt"],
            "generation": y["generation"] or ".",
            "truncated": y["truncated"],
            "feedback": rng.choice(tags),
            "reward": rng.random(),
        }
        for i, (x, ys) in enumerate(zip(prompts, gens))
        for y in ys
    ]
    # as dpo.py and ppo.py run (the toy has no dropout: train.py's train() mode costs the same)
    policy.eval()

    # ---- train.py's step (its functions, its loss normalisation)
    ex = train.encode_rows(rows, tok, 128)
    pol = train.collate([(e["prefix"], e["response"]) for e in ex], tok.pad_token_id)
    refb = train.collate([(e["ref_prefix"], e["response"]) for e in ex], tok.pad_token_id)
    opt_t = torch.optim.AdamW(policy.parameters(), lr=1e-6)

    def train_step():
        with torch.inference_mode():
            ref_logits = train.response_logits(ref, refb)
        nll, kl, ent = train.alt_loss(
            train.response_logits(policy, pol), ref_logits.clone(), pol["targets"], pol["resp_mask"]
        )
        ((nll + 0.05 * kl - 0.06 * ent) / pol["resp_mask"].sum()).backward()
        opt_t.step()
        opt_t.zero_grad(set_to_none=True)

    # ---- dpo.py's step on the same rows, paired per prompt (first sample as y_w: speed does not care which)
    pairs = [(rows[2 * i], rows[2 * i + 1]) for i in range(len(prompts))]
    dbatch = dpo.pair_batch(dpo.encode_pairs(pairs, tok, 128), tok.pad_token_id)
    opt_d = torch.optim.AdamW(policy.parameters(), lr=1e-6)

    def dpo_step():
        with torch.inference_mode():
            ref_lp = dpo.sequence_logprobs(ref, dbatch)
        lp, B = dpo.sequence_logprobs(policy, dbatch), len(pairs)
        dpo.dpo_loss(lp[:B], lp[B:], ref_lp[:B].clone(), ref_lp[B:].clone(), 0.1)[0].backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)

    # ---- ppo.learn on the same rows as rollouts (x alone, y's ids and EOS as ppo.rollout packs them)
    pbatch = train.collate(
        [
            (e["prefix"], e["response"])
            for e in train.encode_rows(
                [{**r, "feedback": None} for r in rows], tok, 128, reference=False
            )
        ],
        tok.pad_token_id,
    )
    scores = torch.tensor([r["reward"] for r in rows])
    head = torch.nn.Linear(policy.config.hidden_size, 1)
    opt_p = torch.optim.AdamW([*policy.parameters(), *head.parameters()], lr=1e-6)
    pargs = ppo.parse_args([])
    control = torch.tensor(common.control_token_ids(tok), dtype=torch.long)
    ppo_stats = {}

    def ppo_update():
        ppo_stats.update(
            ppo.learn(policy, ref, head, opt_p, pbatch, scores, control, 0.05, pargs, seed=0)
        )

    # the (x, y) tokens of the batch: one numerator for all
    tokens = int(pbatch["attention_mask"].sum())
    steps = {"train.py step": train_step, "DPO step": dpo_step, "PPO update": ppo_update}
    times = {k: [] for k in steps}
    for rep in range(a.repeats + 1):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            if rep:  # rep 0 warms up (allocator, AdamW state)
                times[name].append(time.perf_counter() - t0)
    print(
        f"model: {what}; batch: {len(rows)} (x, y) rows, {tokens} tokens (x + y); torch threads "
        f"{torch.get_num_threads()}; median of {a.repeats}"
    )
    rate = {k: tokens / statistics.median(v) for k, v in times.items()}
    for name, r in rate.items():
        print(f"  {name:14s} {statistics.median(times[name]):7.3f} s   {r:9.1f} tokens/s")
    n_mb = pargs.ppo_epochs * -(-len(rows) // pargs.minibatch)
    print(
        f"  (PPO update = 2 no-grad passes (π_old+V, p_0) + {n_mb} clipped minibatch steps: "
        f"{ppo_stats['tokens'] / statistics.median(times['PPO update']):.1f} processed tokens/s)"
    )
    base = rate["train.py step"]
    print(
        f"ratios (tokens/s vs train.py step): DPO step {rate['DPO step'] / base:.2f}x, "
        f"PPO update {rate['PPO update'] / base:.2f}x"
    )


if __name__ == "__main__":
    main()
