"""baselines/dpo.py and baselines/ppo.py: the DPO loss and the PPO pieces vs brute force on the tiny GPT-2, pair
selection, bad input, and short end-to-end runs that save loadable checkpoints (and resume bit-identically)."""

import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import bookkeeping
import common
from baselines import dpo, ppo
from bookkeeping import AltError
from conftest import ROOT, WORDS


def load(path):
    model, tok = common.load_policy(path, "cpu", "float32")
    return model.eval(), tok  # the tiny config has dropout 0.1; both scripts run with dropout off


def brute_token_logprobs(model, prefix, resp, control=()):
    """log p(y_t | prefix, y<t) for each t, one unpadded sequence at a time, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prefix) + list(resp)])).logits[0].double()
    out = []
    for t, tok in enumerate(resp):
        row = logits[len(prefix) + t - 1].clone()
        row[list(control)] = -math.inf
        out.append(row.log_softmax(-1)[tok].item())
    return out


def rows_of(batch):
    """A collated batch -> [(prefix ids, response ids)] per row (left-padded prefix, right-padded y)."""
    P = batch["input_ids"].shape[1] - batch["targets"].shape[1]
    return [
        (ids[:P][m[:P].bool()].tolist(), t[r].tolist())
        for ids, m, t, r in zip(
            batch["input_ids"], batch["attention_mask"], batch["targets"], batch["resp_mask"]
        )
    ]


def pool_row(pid, j, reward, gen=None):
    return {
        "prompt_id": pid,
        "sample_idx": j,
        "prompt": f"the {WORDS[pid % len(WORDS)]} sat on",
        "generation": gen if gen is not None else f" {WORDS[(pid + j) % len(WORDS)]} mat.",
        "condition": None,
        "iteration": 1,
        "truncated": False,
        "num_tokens": 3,
        "reward": reward,
        "feedback": "Lowest Toxicity",
    }


# ----------------------------------------------------------------------------- DPO
PAIRS = [
    (
        {"prompt": "the cat sat", "generation": " on the mat."},
        {"prompt": "the cat sat", "generation": " idiot"},
    ),
    (
        {"prompt": "you are so", "generation": " kind and nice people"},
        {"prompt": "you are so", "generation": " bad"},
    ),
    (
        {"prompt": "news report said police", "generation": " went to the city"},
        {"prompt": "news report said police", "generation": " shut up, stupid man"},
    ),
]


def test_dpo_loss_equals_brute_force(tiny_model_dir):
    policy, tok = load(tiny_model_dir)
    ref, _ = load(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # π ≠ π_ref
    batch = dpo.pair_batch(dpo.encode_pairs(PAIRS, tok, 128), tok.pad_token_id)
    pi, rf = dpo.sequence_logprobs(policy, batch), dpo.sequence_logprobs(ref, batch)
    B, beta = len(PAIRS), 0.1
    loss, margin = dpo.dpo_loss(pi[:B], pi[B:], rf[:B], rf[B:], beta)
    y_ids = lambda r: tok(r["generation"], add_special_tokens=False)["input_ids"]  # noqa: E731  (no EOS target)
    seq = lambda m, r: sum(brute_token_logprobs(m, tok(r["prompt"])["input_ids"], y_ids(r)))  # noqa: E731
    want = []
    for w, lo in PAIRS:
        m = beta * (seq(policy, w) - seq(ref, w)) - beta * (seq(policy, lo) - seq(ref, lo))
        want.append(-math.log(1 / (1 + math.exp(-m))))
    assert loss.item() == pytest.approx(sum(want) / B, rel=1e-4, abs=1e-5)
    assert abs(margin).min().item() > 1e-3  # the perturbation really moved the log-ratios


def test_dpo_loss_is_log2_when_policy_is_reference(tiny_model_dir):
    model, tok = load(tiny_model_dir)
    batch = dpo.pair_batch(dpo.encode_pairs(PAIRS, tok, 128), tok.pad_token_id)
    lp = dpo.sequence_logprobs(model, batch)
    loss, margin = dpo.dpo_loss(lp[:3], lp[3:], lp[:3].detach(), lp[3:].detach(), 0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert torch.all(margin == 0)


def test_pairs_are_max_and_min_reward_per_prompt():
    rows = [
        pool_row(0, 0, 0.5),
        pool_row(0, 1, 0.9),
        pool_row(0, 2, 0.1),
        pool_row(0, 3, 0.9),  # tie at max
        pool_row(1, 0, 0.3),
        pool_row(1, 1, 0.3),  # all tied: skipped
        pool_row(2, 0, 0.7),  # single sample: skipped
        pool_row(3, 0, None),
        pool_row(3, 1, 0.2),
        pool_row(3, 2, 0.6),
        pool_row(3, 3, 0.99, gen=""),
    ]
    pairs, counts = dpo.make_pairs(rows, "pool.jsonl")
    assert [(w["prompt_id"], w["sample_idx"], lo["sample_idx"]) for w, lo in pairs] == [
        (0, 1, 2),
        (3, 2, 1),
    ]
    assert counts == dict(
        read=11,
        null_reward=1,
        empty_generation=1,
        single_sample=1,
        all_tied=1,
        small_margin=0,
        pairs=2,
    )
    # prompt 3's gap is 0.6 - 0.2 = 0.4
    pairs, counts = dpo.make_pairs(rows, "pool.jsonl", min_margin=0.5)
    assert [w["prompt_id"] for w, _ in pairs] == [0] and counts["small_margin"] == 1


def run_dpo_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bookkeeping.cli(lambda: dpo.main(argv))
    err = capsys.readouterr().err.strip()
    return e.value.code, err


def test_dpo_bad_input(tmp_path, tiny_model_dir, capsys):
    no_reward = tmp_path / "a.jsonl"
    bookkeeping.write_jsonl(
        no_reward,
        [{k: v for k, v in pool_row(0, j, 0.5).items() if k != "reward"} for j in range(2)],
    )
    code, err = run_dpo_cli(
        ["--data", str(no_reward), "--model", tiny_model_dir, "--out", str(tmp_path / "m")], capsys
    )
    assert code == 2 and len(err.splitlines()) == 1 and "a.jsonl:1: no 'reward'" in err
    single = tmp_path / "b.jsonl"
    bookkeeping.write_jsonl(single, [pool_row(i, 0, 0.1 * i) for i in range(3)])
    code, err = run_dpo_cli(
        ["--data", str(single), "--model", tiny_model_dir, "--out", str(tmp_path / "m")], capsys
    )
    assert (
        code == 2
        and len(err.splitlines()) == 1
        and "no DPO pair" in err
        and "'single_sample': 3" in err
    )
    assert not os.path.exists(tmp_path / "m" / "train_summary.json")


@pytest.mark.slow
def test_dpo_two_steps_save_a_loadable_model(tmp_path, tiny_model_dir, capsys):
    # y_w is always the kind one
    gens = [" stupid idiot, shut up.", " the mat.", " nice and kind people."]
    rows = [pool_row(i, j, 0.1 * j + 0.01 * i, gens[j]) for i in range(8) for j in range(3)] + [
        pool_row(9, 0, 0.4)
    ]
    bookkeeping.write_jsonl(tmp_path / "pool.jsonl", rows)
    out = tmp_path / "model"
    cmd = [
        sys.executable,
        "-m",
        "baselines.dpo",
        "--data",
        str(tmp_path / "pool.jsonl"),
        "--model",
        tiny_model_dir,
        "--ref-model",
        tiny_model_dir,
        "--out",
        str(out),
        "--epochs",
        "1",
        "--lr",
        "1e-3",
        "--batch-size",
        "4",
        "--seed",
        "1",
        "--min-margin",
        "0",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert (
        summary["method"] == "dpo"
        and summary["steps"] == 2
        and summary["counts"]["single_sample"] == 1
    )
    log = bookkeeping.read_jsonl(out / "train_log.jsonl")
    # π_θ = π_ref at step 1
    assert len(log) == 2 and log[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert log[1]["loss"] < log[0]["loss"] and log[1]["chosen"] > log[1]["rejected"]
    assert (out / "model.safetensors").exists() and not (out / "checkpoint").exists()
    model, _ = load(str(out))
    assert model.config.n_layer == 2
    capsys.readouterr()
    dpo.main(cmd[3:])  # a finished --out: the rerun stops at once
    assert capsys.readouterr().out.strip() == "done"


def test_dpo_resumes_bit_identically(tmp_path, tiny_model_dir, monkeypatch):
    gens = [" stupid idiot.", " nice people."]
    bookkeeping.write_jsonl(
        tmp_path / "pool.jsonl",
        [pool_row(i, j, float(j), gens[j]) for i in range(12) for j in range(2)],
    )

    def argv(out):
        return [
            "--data",
            str(tmp_path / "pool.jsonl"),
            "--model",
            tiny_model_dir,
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--save-every",
            "1",
        ]

    dpo.main(argv(tmp_path / "a"))  # 3 steps, uninterrupted
    real, calls = dpo.dpo_loss, []

    def crash_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill after step 2's checkpoint
        return real(*a, **k)

    monkeypatch.setattr(dpo, "dpo_loss", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        dpo.main(argv(tmp_path / "b"))
    assert (tmp_path / "b" / "checkpoint" / "state.pt").exists() and not (
        tmp_path / "b" / "train_summary.json"
    ).exists()
    monkeypatch.setattr(dpo, "dpo_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    dpo.main(argv(tmp_path / "b"))
    assert len(calls) == 4  # the rerun computed step 3 only
    wa, wb = (ppo.load_file(str(tmp_path / d / "model.safetensors")) for d in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["step"] for r in bookkeeping.read_jsonl(tmp_path / "b" / "train_log.jsonl")] == [
        1,
        2,
        3,
    ]


# ----------------------------------------------------------------------------- PPO pieces
def test_gae_hand_computed_and_brute_force():
    # γ = 1, λ = 0.5: δ = (0 + .25 − .5, 0 + .5 − .25, 1 + 0 − .5) = (−.25, .25, .5);
    # A_2 = .5, A_1 = .25 + .5·.5 = .5, A_0 = −.25 + .5·.5 = 0; R = A + V = (.5, .75, 1). Row 2: junk in the padding.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 9.0, 9.0]])
    values = torch.tensor([[0.5, 0.25, 0.5, 0.0, 0.0], [0.5, 0.25, 0.5, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]).bool()
    adv, ret = ppo.gae(rewards, values, mask, 1.0, 0.5)
    for row in range(2):
        assert adv[row].tolist() == [0.0, 0.5, 0.5, 0.0, 0.0]
        assert ret[row].tolist() == [0.5, 0.75, 1.0, 0.0, 0.0]
    torch.manual_seed(0)
    r, v = torch.randn(3, 6), torch.randn(3, 6)
    lens = [6, 4, 1]
    m = torch.tensor([[t < n for t in range(6)] for n in lens])
    gamma, lam = 0.9, 0.8
    adv, ret = ppo.gae(r, v, m, gamma, lam)
    for b, n in enumerate(lens):
        # the definition: A_t = Σ_l (γλ)^l δ_{t+l}, V = 0 past the end of y
        V = lambda t: v[b, t].item() if t < n else 0.0  # noqa: E731
        delta = [r[b, t].item() + gamma * V(t + 1) - V(t) for t in range(n)]
        for t in range(6):
            want = sum((gamma * lam) ** (k - t) * delta[k] for k in range(t, n)) if t < n else 0.0
            assert adv[b, t].item() == pytest.approx(want, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(want + V(t) if t < n else 0.0, abs=1e-5)


def test_clipped_losses_equal_brute_force():
    torch.manual_seed(0)
    old = torch.randn(4, 5)
    logp = (old + 0.4 * torch.randn(4, 5)).requires_grad_()
    adv, returns, old_v = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    values = (old_v + 0.5 * torch.randn(4, 5)).requires_grad_()
    mask = torch.rand(4, 5) > 0.3
    eps, eps_v = 0.2, 0.2
    pg, vf, stats = ppo.ppo_losses(logp, old, adv, values, old_v, returns, mask, eps, eps_v)
    toks = [(b, t) for b in range(4) for t in range(5) if mask[b, t]]
    want_pg = want_vf = clipped = 0.0
    for b, t in toks:  # PPO's own form: −min(ρA, clip(ρ)A); value: ½ max of the two squared errors
        rho, a = math.exp(logp[b, t].item() - old[b, t].item()), adv[b, t].item()
        want_pg += -min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
        v, ov, R = values[b, t].item(), old_v[b, t].item(), returns[b, t].item()
        want_vf += 0.5 * max((v - R) ** 2, (ov + min(max(v - ov, -eps_v), eps_v) - R) ** 2)
        clipped += abs(rho - 1) > eps
    assert pg.item() == pytest.approx(want_pg / len(toks), rel=1e-5)
    assert vf.item() == pytest.approx(want_vf / len(toks), rel=1e-5)
    assert stats["clipfrac"] == pytest.approx(clipped / len(toks))
    pg.backward()
    for b, t in toks:
        # the clip removes the incentive: no gradient once ρ left [1−ε, 1+ε] in A's direction
        rho, a = math.exp(logp[b, t].item() - old[b, t].item()), adv[b, t].item()
        flat = (a > 0 and rho > 1 + eps) or (a < 0 and rho < 1 - eps)
        want = 0.0 if flat else -a * rho / len(toks)
        assert logp.grad[b, t].item() == pytest.approx(want, abs=1e-6)


def test_kl_penalty_direction():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -3.0, 0.0]])
    ref = torch.tensor([[-2.0, -2.0, -1.0], [-0.5, -3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    scores = torch.tensor([0.75, 0.25])
    r = ppo.kl_rewards(logp, ref, scores, mask, 0.1)
    # π above p_0 on a token is penalised (−0.1), below it is paid (+0.05); the score lands on y's last token only
    torch.testing.assert_close(r, torch.tensor([[-0.1, 0.0, -0.05 + 0.75], [0.05, 0.25, 0.0]]))
    assert r.sum(1).tolist() == pytest.approx(
        (scores - 0.1 * ((logp - ref) * mask).sum(1)).tolist()
    )


def test_prompt_batches_walk_fresh_shuffles():
    seen = [ppo.prompt_batch(10, 4, u, seed=3) for u in range(5)]
    flat = [i for b in seen for i in b]
    assert (
        sorted(flat[:10]) == list(range(10))
        and sorted(flat[10:]) == list(range(10))
        and flat[:10] != flat[10:]
    )
    assert seen == [ppo.prompt_batch(10, 4, u, seed=3) for u in range(5)]


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_rollout_logprobs_are_the_sampled_tokens(tiny_model_dir, temperature):
    policy, tok = load(tiny_model_dir)
    prompts = [
        {"prompt": p}
        for p in ("the cat", "you are so stupid and", "news report said that the police man")
    ]
    args = argparse.Namespace(
        num_samples=2,
        max_new_tokens=6,
        min_new_tokens=3,
        top_p=1.0,
        temperature=temperature,
        gen_batch_size=2,
        seed=0,
    )
    score = lambda texts: [None] + [0.25] * (len(texts) - 1)  # noqa: E731  one scorer failure: dropped, counted
    batch, scores, texts, counts = ppo.rollout(policy, tok, prompts, score, args, update=0)
    assert counts == dict(drawn=6, unscored=1) and len(scores) == 5 and torch.all(scores == 0.75)
    control = torch.tensor(common.control_token_ids(tok))
    # the separator: its row copies EOS's, so it would tie with EOS if left unmasked
    assert len(control) == 1
    head = torch.nn.Linear(32, 1)
    logp, values = ppo.forward(policy, batch, control, head)
    for b, ((pre, resp), text) in enumerate(zip(rows_of(batch), texts)):
        body = resp[:-1] if resp[-1] == tok.eos_token_id else resp
        # exact ids
        assert (
            tok.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False) == text
        )
        want = brute_token_logprobs(policy, pre, resp, control.tolist())
        assert logp[b, : len(resp)].tolist() == pytest.approx(want, abs=1e-4)
        if temperature == 0:
            # greedy: every y_t is the argmax of the masked distribution at its position
            with torch.no_grad():
                lg = policy(torch.tensor([pre + resp])).logits[0, len(pre) - 1 : -1]
            lg[:, control] = -math.inf
            assert lg.argmax(-1).tolist() == resp
        with torch.no_grad():
            hidden = policy(torch.tensor([pre + resp]), output_hidden_states=True).hidden_states[
                -1
            ][0]
        assert values[b, : len(resp)].tolist() == pytest.approx(
            head(hidden[len(pre) - 1 : -1]).squeeze(-1).tolist(), abs=1e-5
        )
    assert torch.all(logp[~batch["resp_mask"]] == 0) and torch.all(values[~batch["resp_mask"]] == 0)
    idx = torch.tensor([4, 1])
    sub = ppo.take(batch, idx)
    sub_lp = ppo.forward(policy, sub, control)[0]
    torch.testing.assert_close(sub_lp, logp[idx, : sub_lp.shape[1]], atol=1e-5, rtol=0)
    # all-padding columns trimmed
    assert sub["attention_mask"][:, 0].any() and sub["resp_mask"][:, -1].any()


@pytest.mark.slow
def test_ppo_two_updates_save_loadable_checkpoints_and_resume_exactly(
    tmp_path, tiny_model_dir, capsys
):
    prompts = tmp_path / "prompts.jsonl"
    bookkeeping.write_jsonl(
        prompts, [{"id": i, "prompt": f"the {w} said"} for i, w in enumerate(WORDS[:6])]
    )
    base = [
        "--model",
        tiny_model_dir,
        "--prompts",
        str(prompts),
        "--rollout-prompts",
        "4",
        "--num-samples",
        "2",
        "--minibatch",
        "4",
        "--save-every",
        "1",
        "--max-new-tokens",
        "6",
        "--lr",
        "1e-3",
        "--target-kl",
        "0.5",
    ]
    ppo.main(base + ["--out", str(tmp_path / "a"), "--updates", "2"])
    a = tmp_path / "a"
    for k in (1, 2):
        summary = json.loads((a / f"iter_{k}" / "model" / "train_summary.json").read_text())
        assert summary["method"] == "ppo" and summary["generations_sampled"] == 8 * k
        # only the newest keeps the resume state
        assert (a / f"iter_{k}" / "model" / "state.pt").exists() == (k == 2)
    log = bookkeeping.read_jsonl(a / "ppo_log.jsonl")
    # π_θ = p_0 when the first rollout is drawn
    assert [r["update"] for r in log] == [1, 2] and log[0]["kl"] == 0.0
    # KL 0 < target: the adaptive controller lowered λ
    assert log[0]["kl_coef"] < ppo.parse_args([]).kl_coef
    model, _ = load(str(a / "iter_2" / "model"))
    head = ppo.load_file(str(a / "iter_2" / "model" / "value_head.safetensors"))
    assert head["weight"].shape == (1, model.config.n_embd) and head["weight"].abs().sum() > 0
    # a run stopped after update 1 and rerun to 2 ends bit-identical to the uninterrupted one
    ppo.main(base + ["--out", str(tmp_path / "b"), "--updates", "1"])
    ppo.main(base + ["--out", str(tmp_path / "b"), "--updates", "2"])
    assert "resuming after update 1" in capsys.readouterr().out
    wa, wb = (
        ppo.load_file(str(d / "iter_2" / "model" / "model.safetensors"))
        for d in (a, tmp_path / "b")
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert bookkeeping.read_jsonl(tmp_path / "b" / "ppo_log.jsonl")[1]["score"] == log[1]["score"]
    ppo.main(base + ["--out", str(tmp_path / "b"), "--updates", "2"])
    assert capsys.readouterr().out.strip() == "done"
    with pytest.raises(AltError, match=r"needs >= --rollout-prompts \(7\) prompts.*found 6"):
        ppo.main(base + ["--out", str(tmp_path / "c"), "--rollout-prompts", "7"])
