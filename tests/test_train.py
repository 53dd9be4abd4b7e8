"""train.py: Equation 1's terms vs brute force, the data path, resume, NaN, DDP and DeepSpeed on the tiny GPT-2."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import bookkeeping
import common
import launch
import train
from bookkeeping import AltError
from conftest import ROOT, inject_nan_at_step, tiny_texts

TAGS = ["Nontoxic", "Slightly toxic", "Very toxic"]


def make_pool(path, n=24, meta=None, **override):
    """A tiny datapool: y continues x; tags cycle; every third y is truncated."""
    rows = []
    texts = tiny_texts(n)
    for i, text in enumerate(texts):
        words = text.split()
        x = " ".join(texts[i - i % 2].split()[:3])  # the two y of prompt_id i // 2 share their x
        rows.append(
            {
                "prompt_id": i // 2,
                "sample_idx": i % 2,
                "prompt": x,
                "generation": " " + " ".join(words[3:]),
                "condition": None,
                "iteration": 1,
                "truncated": i % 3 == 0,
                "num_tokens": len(words) - 3,
                "reward": 0.5,
                "feedback": TAGS[i % 3],
                **override,
            }
        )
    bookkeeping.write_jsonl(path, rows)
    if meta is not None:
        bookkeeping.write_json(str(path)[: -len(".jsonl")] + ".meta.json", meta)
    return str(path)


def load(path):
    from transformers import AutoModelForCausalLM

    return common.load_policy(path, "cpu", "float32")[0].eval() if path else AutoModelForCausalLM


def no_dropout_copy(src, dst):
    """The fixture model with dropout off, so runs with different batch splits see identical forward passes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(src)
    m.config.resid_pdrop = m.config.embd_pdrop = m.config.attn_pdrop = 0.0
    m.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return str(dst)


def batch_of(tok, rows, reference=True, eos_target=False):
    ex = train.encode_rows(rows, tok, 128, reference=reference, eos_target=eos_target)
    pol = train.collate([(e["prefix"], e["response"]) for e in ex], tok.pad_token_id)
    ref = (
        train.collate([(e["ref_prefix"], e["response"]) for e in ex], tok.pad_token_id)
        if reference
        else None
    )
    return ex, pol, ref


ROWS = [
    {
        "prompt": "the cat sat",
        "generation": " on the mat and you",
        "feedback": "Nontoxic",
        "truncated": True,
    },
    {
        "prompt": "i think that he was very",
        "generation": " bad.",
        "feedback": "Very toxic",
        "truncated": False,
    },
    {
        "prompt": "news",
        "generation": " report said police",
        "feedback": "Slightly toxic",
        "truncated": False,
    },
]


@pytest.mark.parametrize("eos_target", [False, True])
def test_layout_prefix_left_padded_response_right_padded(tiny_model_dir, eos_target):
    _, tok = common.load_policy(tiny_model_dir, "cpu", "float32")
    ex, pol, ref = batch_of(tok, ROWS, eos_target=eos_target)
    for i, (e, r) in enumerate(zip(ex, ROWS)):
        end = [tok.eos_token_id] if eos_target and not r["truncated"] else []
        y = tok(r["generation"], add_special_tokens=False)["input_ids"] + end
        # the same y ids under both prefixes; EOS only if asked and y stopped by itself
        assert e["response"] == y
        assert e["x_len"] == len(tok(r["prompt"])["input_ids"])
        assert (
            pol["targets"][i][pol["resp_mask"][i]].tolist()
            == y
            == ref["targets"][i][ref["resp_mask"][i]].tolist()
        )
        assert tok.decode(e["prefix"]) == common.condition(r["prompt"], r["feedback"])
        assert tok.decode(e["ref_prefix"]) == r["prompt"]  # p_0 never sees f
        first = pol["attention_mask"][i].tolist().index(1)
        assert pol["position_ids"][i, first] == 0 and not pol["attention_mask"][i, :first].any()
    assert torch.equal(pol["resp_mask"], ref["resp_mask"])
    pre, resp = train.pack(list(range(50)), list(range(100, 200)), 0, 0, 40)
    # y kept, prefix cut left
    assert len(pre) + len(resp) == 40 and resp == list(range(100, 139)) and pre == [49]


def test_masked_nll_equals_hf_labels_loss_per_row(tiny_model_dir):
    model, tok = common.load_policy(tiny_model_dir, "cpu", "float32")
    model.eval()
    ex, pol, _ = batch_of(tok, ROWS, reference=False)
    with torch.no_grad():
        nll, _, _ = train.alt_loss(
            train.response_logits(model, pol), None, pol["targets"], pol["resp_mask"]
        )
        hf_sum = 0.0
        for e in ex:
            # unpadded, one row at a time, HF's own shifted cross-entropy with prefix labels = -100
            ids = torch.tensor([e["prefix"] + e["response"]])
            labels = torch.tensor([[-100] * len(e["prefix"]) + e["response"]])
            hf_sum += model(ids, labels=labels).loss.item() * len(e["response"])
        lp = train.response_logprobs(model, pol)
    n = int(pol["resp_mask"].sum())
    assert nll.item() / n == pytest.approx(hf_sum / n, abs=1e-5)
    assert -lp.sum().item() == pytest.approx(nll.item(), rel=1e-5)
    assert (lp[~pol["resp_mask"]] == 0).all()


def brute_force(policy, ref, ex, vocab):
    """Per-token loop, one unpadded forward per (row, t), plain-Python sums over the first `vocab` ids:
    returns Σ_t KL(p_0 ‖ p_θ), Σ_t KL(p_θ ‖ p_0) and Σ_t H(p_θ), p_θ on (f, x, y<t) and p_0 on (x, y<t)."""
    kl, kl_swapped, ent = 0.0, 0.0, 0.0
    for e in ex:
        for t in range(len(e["response"])):
            with torch.no_grad():
                lp = policy(torch.tensor([e["prefix"] + e["response"][:t]])).logits[0, -1, :vocab]
                lq = ref(torch.tensor([e["ref_prefix"] + e["response"][:t]])).logits[0, -1, :vocab]
                lp, lq = torch.log_softmax(lp, -1), torch.log_softmax(lq, -1)
            for a, b in zip(lp.tolist(), lq.tolist()):
                kl += math.exp(b) * (b - a)
                kl_swapped += math.exp(a) * (a - b)
                ent -= math.exp(a) * a
    return kl, kl_swapped, ent


def test_kl_and_entropy_match_brute_force_and_kl_direction(tiny_model_dir):
    policy, tok = common.load_policy(tiny_model_dir, "cpu", "float32")
    ref, _ = common.load_policy(tiny_model_dir, "cpu", "float32")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # p_0 ≠ p_θ
    policy.eval(), ref.eval()
    ex, pol, rb = batch_of(tok, ROWS)
    vocab = len(tok) - 1  # the separator, added last, is a control token: the loss drops its column
    assert common.control_token_ids(tok) == [vocab]
    with torch.no_grad():
        _, kl, ent = train.alt_loss(
            train.response_logits(policy, pol, vocab),
            train.response_logits(ref, rb, vocab),
            pol["targets"],
            pol["resp_mask"],
        )
        _, kl_all, ent_all = train.alt_loss(
            train.response_logits(policy, pol),
            train.response_logits(ref, rb),
            pol["targets"],
            pol["resp_mask"],
        )
    kl_p0_pt, kl_pt_p0, ent_bf = brute_force(policy, ref, ex, vocab)
    assert kl.item() == pytest.approx(kl_p0_pt, rel=1e-4)
    assert abs(kl_pt_p0 - kl_p0_pt) > 0.05 * kl_p0_pt  # swapping the arguments is caught
    assert ent.item() == pytest.approx(ent_bf, rel=1e-4)
    assert brute_force(policy, ref, ex, None)[2] == pytest.approx(ent_all.item(), rel=1e-4)
    # the separator column (a copy of EOS) has mass
    assert abs(ent_all.item() - ent.item()) > 1e-4 * ent.item()


def test_eos_free_nll_is_the_nll_given_no_stop_and_leaves_eos_to_the_kl(tiny_model_dir):
    policy, tok = common.load_policy(tiny_model_dir, "cpu", "float32")
    ex, pol, _ = batch_of(tok, ROWS, reference=False)
    eos, vocab = tok.eos_token_id, len(tok) - 1
    logits = train.response_logits(policy, pol, vocab).detach().requires_grad_()
    nll, _, _ = train.alt_loss(logits, None, pol["targets"], pol["resp_mask"], eos)
    full, _, _ = train.alt_loss(logits, None, pol["targets"], pol["resp_mask"])
    # brute force, token by token: −log p(y_t) / (1 − p(EOS)) with the EOS logit removed
    want = 0.0
    for b, t in pol["resp_mask"].nonzero().tolist():
        row = logits[b, t].detach().double()
        row[eos] = -math.inf
        want -= torch.log_softmax(row, -1)[pol["targets"][b, t]].item()
    assert nll.item() == pytest.approx(want, rel=1e-5)
    assert full.item() > nll.item()  # the full softmax also pays for the EOS mass
    (g,) = torch.autograd.grad(nll, logits)
    assert g[..., eos].abs().max().item() < 1e-6  # NLL no longer pushes EOS down
    (g_full,) = torch.autograd.grad(full, logits)
    # the full softmax lowers EOS everywhere
    assert g_full[pol["resp_mask"]][:, eos].min().item() > 0
    with pytest.raises(SystemExit):
        train.parse_args(
            ["--data", "d", "--model", "m", "--out", "o", "--eos-target", "--eos-free"]
        )


def test_read_pool_skips_counts_and_rejects_unknown_tags(tmp_path):
    pool = make_pool(tmp_path / "pool.jsonl", n=24)
    rows = bookkeeping.read_jsonl(pool)
    rows[1]["feedback"], rows[4]["generation"] = None, ""
    rows[7]["feedback"] = "Purple"
    bookkeeping.write_jsonl(pool, rows)
    with pytest.raises(
        AltError, match=r"pool\.jsonl:8: feedback 'Purple' is not one of the 3 tags in .*pool\.meta"
    ):
        train.read_pool(pool, TAGS)
    kept, c = train.read_pool(pool, None, drop_truncated=True)
    assert (c["null_feedback"], c["empty_generation"], c["truncated"]) == (1, 1, 8) and c[
        "used"
    ] == len(kept) == 14
    kept, c = train.read_pool(pool, None, per_category=1, max_samples=5, seed=3)
    groups = [(r["prompt_id"], r["feedback"]) for r in kept]
    assert len(kept) == 5 and len(set(groups)) == 5 and c["max_samples"] > 0
    # prompt_id i//2 and a tag cycle of 3 never repeat a (prompt, tag) pair here
    assert c["per_category"] == 0


def test_bucketing_keeps_padding_low_and_plans_match_across_ranks():
    import random

    rng = random.Random(0)
    ex = [
        {
            "prefix": [1] * rng.randint(5, 40),
            "response": [2] * rng.choice([20] * 3 + list(range(3, 20))),
        }
        for _ in range(640)
    ]
    for e in ex:
        e["x_len"] = len(e["prefix"])
    plan = train.plan_epoch(ex, 32, 0, 0)
    assert plan == train.plan_epoch(ex, 32, 0, 0) and plan != train.plan_epoch(ex, 32, 1, 0)
    pad = slots = 0
    for b in plan:
        m = train.collate([(ex[i]["prefix"], ex[i]["response"]) for i in b], 0)["attention_mask"]
        pad, slots = pad + int((m == 0).sum()), slots + m.numel()
    assert pad / slots <= 0.15 and sorted(i for b in plan for i in b) == list(range(640))


def test_batches_are_not_grouped_by_feedback_tag(tiny_model_dir):
    """condition(x, f) is longer for some tags; bucketing by it would give batches of one tag. Bucketing by x alone
    must leave every batch's tag mix as random as unbucketed batches (the review measured sd 0.257 vs 0.087)."""
    import random
    import statistics

    _, tok = common.load_policy(tiny_model_dir, "cpu", "float32")
    rng = random.Random(0)
    # very different lengths
    tags = ["Lowest Toxicity", "Maximum Toxicity plus several extra words of feedback"]
    rows = [
        {
            "prompt": " ".join(
                rng.choice(["the", "a", "big", "cat", "dog"]) for _ in range(rng.randint(2, 12))
            ),
            "generation": " sat down",
            "feedback": tags[i % 2],
            "truncated": True,
        }
        for i in range(640)
    ]
    ex = train.encode_rows(rows, tok, 128, reference=False)
    assert len({len(e["prefix"]) - e["x_len"] for e in ex}) == 2  # the tags do differ in length
    long_share = [
        sum(rows[i]["feedback"] == tags[1] for i in b) / 32 for b in train.plan_epoch(ex, 32, 0, 0)
    ]
    # grouped by tag: sd near 0.5; random batches of 32: about 0.09
    assert statistics.pstdev(long_share) < 0.15


def run_train(tmp, model, pool, *extra, out="out"):
    out = str(tmp / out)
    train.main(
        [
            "--data",
            pool,
            "--model",
            model,
            "--out",
            out,
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--warmup-ratio",
            "0",
            *extra,
        ]
    )
    return out


def read_log(out):
    return bookkeeping.read_jsonl(os.path.join(out, "train_log.jsonl"))


def test_training_lowers_nll_and_writes_outputs(tiny_model_dir, tmp_path, monkeypatch, capsys):
    meta = {"method": "alt-rm", "tags": TAGS, "exemplar": TAGS[0], "scorer": "profanity-check"}
    pool = make_pool(tmp_path / "pool.jsonl", n=24, meta=meta)
    loads = []
    real = common.load_policy
    monkeypatch.setattr(
        common, "load_policy", lambda path, *a, **k: loads.append(path) or real(path, *a, **k)
    )
    flags = ["--beta", "0", "--ref-model", str(tmp_path / "no_such_model"), "--epochs", "3"]
    out = run_train(tmp_path, tiny_model_dir, pool, *flags, "--lr", "3e-3")
    assert loads == [tiny_model_dir]  # β = 0: p_0 never loaded (its path does not even exist)
    summary = json.load(open(os.path.join(out, "train_summary.json")))
    assert (summary["method"], summary["tags"], summary["exemplar"]) == ("alt-rm", TAGS, TAGS[0])
    assert summary["steps"] == 18 and [r["step"] for r in read_log(out)] == list(range(1, 19))
    assert all(r["kl"] == 0 for r in read_log(out))
    rows = train.read_pool(pool)[0]
    nlls = []
    for path in (tiny_model_dir, out):
        model, tok = common.load_policy(path, "cpu", "float32")
        _, pol, _ = batch_of(tok, rows, reference=False)
        with torch.no_grad():
            nlls.append(
                train.alt_loss(
                    train.response_logits(model.eval(), pol), None, pol["targets"], pol["resp_mask"]
                )[0].item()
            )
    assert nlls[1] < nlls[0] * 0.95
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    assert not os.path.exists(os.path.join(out, "checkpoint"))  # resume state removed once finished
    before = os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns
    capsys.readouterr()
    run_train(tmp_path, tiny_model_dir, pool, *flags, "--lr", "3e-3")  # the same command: done
    assert (
        capsys.readouterr().out == "done\n"
        and os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns == before
    )
    with pytest.raises(AltError, match=r"made with other settings \(--lr 0.1 \(was 0.003\)\)"):
        run_train(tmp_path, tiny_model_dir, pool, *flags, "--lr", "0.1")


def test_grad_accum_and_checkpointing_match_one_big_batch_and_controllers_move(
    tiny_model_dir, tmp_path
):
    model = no_dropout_copy(tiny_model_dir, tmp_path / "nodrop")
    pool = make_pool(tmp_path / "pool.jsonl", n=16)
    one = read_log(run_train(tmp_path, model, pool, out="one"))
    acc = read_log(
        run_train(
            tmp_path,
            model,
            pool,
            "--batch-size",
            "2",
            "--grad-accum",
            "2",
            "--gradient-checkpointing",
            out="acc",
        )
    )
    for x, y in zip(one, acc):
        # the step's token mean spans its micro-batches: same gradients, same losses
        assert [y[k] for k in ("nll", "kl", "entropy")] == pytest.approx(
            [x[k] for k in ("nll", "kl", "entropy")], rel=1e-5
        )
    ctl = read_log(
        run_train(
            tmp_path,
            model,
            pool,
            "--target-kl",
            "1e-4",
            "--target-entropy",
            "100",
            "--max-grad-norm",
            "0.5",
            "--precision",
            "bf16",
            out="ctl",
        )
    )
    # bf16 autocast on CPU, asked for
    assert ctl[0]["nll"] == pytest.approx(one[0]["nll"], rel=2e-2)
    assert ctl[-1]["beta"] > ctl[0]["beta"] == 0.05 and ctl[-1]["alpha"] > ctl[0]["alpha"] == 0.06
    assert all(r["grad_norm"] is not None for r in ctl)


def test_quark_tags_become_single_tokens_and_other_k_is_rejected(tiny_model_dir, tmp_path):
    tags = [common.quantile_token(k) for k in range(3)]
    pool = make_pool(
        tmp_path / "pool.jsonl", n=8, meta={"method": "quark", "tags": tags, "exemplar": tags[0]}
    )
    rows = bookkeeping.read_jsonl(pool)
    bookkeeping.write_jsonl(pool, [dict(r, feedback=tags[i % 3]) for i, r in enumerate(rows)])
    out = run_train(tmp_path, tiny_model_dir, pool, "--beta", "0.05")
    tok = common.load_policy(out, "cpu", "float32")[1]
    assert all(len(tok.tokenize(t)) == 1 for t in tags)
    bookkeeping.write_json(str(tmp_path / "pool2.meta.json"), {"method": "quark", "tags": tags[:2]})
    bookkeeping.write_jsonl(
        str(tmp_path / "pool2.jsonl"), [dict(r, feedback=tags[i % 2]) for i, r in enumerate(rows)]
    )
    with pytest.raises(AltError, match="3 quantile tokens but .*pool2.meta.json lists 2 tags"):
        run_train(tmp_path, out, str(tmp_path / "pool2.jsonl"), out="out2")


def test_nan_loss_stops_naming_the_step_and_keeps_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    pool = make_pool(tmp_path / "pool.jsonl", n=24)
    inject_nan_at_step(monkeypatch, 3)
    with pytest.raises(AltError, match=r"non-finite loss .* at step 3; .*checkpoint kept"):
        run_train(tmp_path, tiny_model_dir, pool, "--save-every", "2")
    out = tmp_path / "out"
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 2
    assert not (out / "train_summary.json").exists() and [
        r["step"] for r in read_log(str(out))
    ] == [1, 2]


def test_deepspeed_flag_without_deepspeed_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(AltError, match="--deepspeed needs the deepspeed package"):
        train.main(
            [
                "--data",
                "x.jsonl",
                "--model",
                "m",
                "--out",
                str(tmp_path / "o"),
                "--deepspeed",
                "c.json",
            ]
        )


def script(*args, env=None, **kw):
    full = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


@pytest.mark.slow
def test_kill_and_resume_reaches_the_same_final_state(tiny_model_dir, tmp_path):
    pool = make_pool(tmp_path / "pool.jsonl", n=24)
    args = [
        "--data",
        pool,
        "--model",
        tiny_model_dir,
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--save-every",
        "2",
    ]
    r = script("tests/kill_at_step.py", "3", "train.py", *args, "--out", str(tmp_path / "killed"))
    # SIGKILL after step 3 was logged, before its checkpoint
    assert r.returncode == -9, r.stderr[-2000:]
    assert [x["step"] for x in read_log(str(tmp_path / "killed"))] == [1, 2, 3]
    # Every half runs alike (a subprocess on 1 thread): float sums depend on the thread count and the CPU's kernels,
    # so an in-process half could differ in the last bits on another machine even though the resume is exact.
    for out in ("killed", "clean"):  # "killed" again: the same command resumes at step 2
        r = script("train.py", *args, "--out", str(tmp_path / out))
        assert r.returncode == 0, r.stderr[-2000:]
    killed, clean = read_log(str(tmp_path / "killed")), read_log(str(tmp_path / "clean"))
    assert [x["step"] for x in killed] == list(range(1, 7))
    for x, y in zip(killed, clean):  # model, optimizer, scheduler and dropout RNG all restored
        assert (x["lr"], x["tokens"]) == (y["lr"], y["tokens"])
        keys = ("nll", "kl", "entropy", "total")
        assert [x[k] for k in keys] == pytest.approx([y[k] for k in keys], abs=1e-6)
    a, b = load(str(tmp_path / "killed")), load(str(tmp_path / "clean"))
    assert all(
        torch.allclose(x, y, atol=1e-6)
        for x, y in zip(a.state_dict().values(), b.state_dict().values())
    )


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tiny_model_dir, tmp_path):
    model = no_dropout_copy(tiny_model_dir, tmp_path / "nodrop")
    pool = make_pool(tmp_path / "pool.jsonl", n=16)
    common_args = [
        "--data",
        pool,
        "--model",
        model,
        "--lr",
        "1e-3",
        "--warmup-ratio",
        "0",
        "--beta",
        "0.05",
    ]
    r = script(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29731",
        "train.py",
        *common_args,
        "--batch-size",
        "2",
        "--out",
        str(tmp_path / "ddp"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    train.main([*common_args, "--batch-size", "4", "--out", str(tmp_path / "one")])
    ddp, one = read_log(str(tmp_path / "ddp")), read_log(str(tmp_path / "one"))
    assert len(ddp) == len(one) == 4  # only rank 0 writes: no duplicated rows
    for key in ("nll", "kl", "entropy", "total"):
        assert ddp[0][key] == pytest.approx(one[0][key], rel=1e-5)
        # same global batch => same updates
        assert ddp[-1][key] == pytest.approx(one[-1][key], rel=1e-3)
    assert json.load(open(tmp_path / "ddp" / "train_summary.json"))["world_size"] == 2


def test_deepspeed_zero3_config_is_one_clear_error(tmp_path):
    pytest.importorskip("deepspeed")
    cfg = tmp_path / "z3.json"
    cfg.write_text('{"zero_optimization": {"stage": 3}}')
    with pytest.raises(AltError, match="ZeRO stage 3 is not supported"):
        launch.deepspeed_engine(str(cfg), None, None, None, {}, False)


@pytest.mark.slow
def test_deepspeed_zero2_cpu_matches_plain_training_through_a_kill_and_resume(
    tiny_model_dir, tmp_path
):
    pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM

    model = no_dropout_copy(tiny_model_dir, tmp_path / "nodrop")
    pool = make_pool(tmp_path / "pool.jsonl", n=24)
    common_args = [
        "--data",
        pool,
        "--model",
        model,
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--warmup-ratio",
        "0",
        "--save-every",
        "2",
    ]
    ds_args = [
        *common_args,
        "--deepspeed",
        os.path.join(ROOT, "configs", "ds_zero2.json"),
        "--out",
        str(tmp_path / "ds"),
    ]
    r = script("tests/kill_at_step.py", "3", "train.py", *ds_args, env={"MASTER_PORT": "29733"})
    assert r.returncode == -9, r.stderr[-3000:]  # killed after step 3; the checkpoint holds step 2
    r = script("train.py", *ds_args, env={"MASTER_PORT": "29734"})  # the same command again resumes
    assert r.returncode == 0, r.stderr[-3000:]
    train.main([*common_args, "--out", str(tmp_path / "plain")])
    ds, plain = read_log(str(tmp_path / "ds")), read_log(str(tmp_path / "plain"))
    assert [x["step"] for x in ds] == list(range(1, 7))
    # DeepSpeed drives the same loss
    assert ds[0]["total"] == pytest.approx(plain[0]["total"], rel=1e-5)
    for x, y in zip(ds, plain):
        # Adam's moments survive the resume: restarted moments move step 3 by ~lr per weight
        assert x["total"] == pytest.approx(y["total"], rel=1e-4)
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ds"))
    assert m.get_input_embeddings().weight.shape[0] == len(
        common.load_policy(model, "cpu", "float32")[1]
    )
    p = AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain"))
    assert all(
        torch.allclose(a, b, atol=1e-5)
        for a, b in zip(m.state_dict().values(), p.state_dict().values())
    )


def test_checkpoint_save_survives_a_leftover_old_checkpoint(tiny_model_dir, tmp_path):
    """A kill after the swap but before checkpoint.old was removed leaves both folders; the next save must not fail."""
    model, tok = common.load_policy(tiny_model_dir, "cpu", "float32")
    for d in ("checkpoint", "checkpoint.old"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "state.pt").write_bytes(b"stale")
    bookkeeping.save_checkpoint(str(tmp_path), model, tok, {"step": 7}, 0, lambda: None)
    assert torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=True) == {"step": 7}
    assert not (tmp_path / "checkpoint.old").exists()
