"""sample.py: rows and schema, conditioning kept out of `prompt`, control tokens never sampled, EOS bookkeeping,
batching keeps input order, seeds reproduce, shard + merge == unsharded, resume, and the bad-input errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import bookkeeping
import common
import sample
from bookkeeping import AltError
from common import SEPARATOR
from conftest import ROOT, tiny_texts

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = {
    "prompt_id",
    "sample_idx",
    "prompt",
    "generation",
    "condition",
    "iteration",
    "truncated",
    "num_tokens",
}


def write_prompts(path, texts, ids=None):
    with open(path, "w", encoding="utf-8") as fh:
        for i, t in enumerate(texts):
            fh.write(json.dumps({"prompt": t, **({"id": ids[i]} if ids else {})}) + "\n")
    return str(path)


def run(argv):
    """sample.py's CLI in-process: the exit code (0 on success)."""
    try:
        bookkeeping.cli(lambda: sample.main(argv))
    except SystemExit as e:
        return e.code
    return 0


def spy(model):
    """Record (input_ids, output ids) of every model.generate call."""
    calls, orig = [], model.generate

    def generate(*a, **k):
        out = orig(*a, **k)
        calls.append((k["input_ids"].clone(), out.clone()))
        return out

    model.generate = generate
    return calls


def biased(model, tokenizer, ids, value):
    """Untie lm_head and add `value` to the logits of `ids`."""
    head = torch.nn.Linear(model.config.n_embd, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.copy_(model.get_input_embeddings().weight)
        head.bias.zero_()
        head.bias[ids] = value
    model.lm_head = head
    return model


def scrambled(model, std=0.5):
    """Large random weights: the tiny model's greedy output then depends on the prompt (at init it does not)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    return model


@pytest.fixture()
def policy(tiny_model_dir):
    return common.load_policy(
        tiny_model_dir, "cpu", "float32", extra_tokens=[common.quantile_token(0)]
    )


def test_rows_schema_counts_and_raw_prompt(tiny_model_dir, tmp_path, capsys):
    # duplicates keep all their samples
    texts = ["the cat sat", "", "the cat sat", "you are so nice", "   "]
    prompts = write_prompts(tmp_path / "p.jsonl", texts, ids=[10, 11, 12, "x", 14])
    out = str(tmp_path / "s.jsonl")
    assert (
        run(
            [
                "--model",
                tiny_model_dir,
                "--prompts",
                prompts,
                "--out",
                out,
                "--num-samples",
                "3",
                "--max-new-tokens",
                "6",
                "--condition",
                "Lowest Toxicity",
                "--iteration",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    rows = bookkeeping.read_jsonl(out)
    assert len(rows) == 3 * 3
    assert all(set(r) == KEYS for r in rows)
    assert [(r["prompt_id"], r["sample_idx"]) for r in rows] == [
        (p, j) for p in (10, 12, "x") for j in range(3)
    ]
    assert [r["prompt"] for r in rows] == [
        t for t in ("the cat sat", "the cat sat", "you are so nice") for _ in range(3)
    ]
    assert all(
        r["condition"] == "Lowest Toxicity" and r["iteration"] == 2 and SEPARATOR not in r["prompt"]
        for r in rows
    )
    for r in rows:
        assert isinstance(r["generation"], str) and isinstance(r["truncated"], bool)
        assert r["num_tokens"] == 6 if r["truncated"] else 0 <= r["num_tokens"] < 6
    summary = capsys.readouterr().out
    assert "9 rows (3 prompts x 3)" in summary and "skipped 2 empty prompts" in summary

    unc = str(tmp_path / "u.jsonl")
    assert (
        run(
            [
                "--model",
                tiny_model_dir,
                "--prompts",
                prompts,
                "--out",
                unc,
                "--num-samples",
                "1",
                "--max-new-tokens",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    assert [r["condition"] for r in bookkeeping.read_jsonl(unc)] == [None] * 3


def test_model_input_is_condition_of_x_and_f(tiny_model_dir, tmp_path, monkeypatch):
    calls, load = [], common.load_policy

    def load_and_spy(*a, **k):
        model, tok = load(*a, **k)
        calls.append((tok, spy(model)))
        return model, tok

    monkeypatch.setattr(common, "load_policy", load_and_spy)
    prompts = write_prompts(tmp_path / "p.jsonl", ["the dog went to market"])
    assert (
        run(
            [
                "--model",
                tiny_model_dir,
                "--prompts",
                prompts,
                "--out",
                str(tmp_path / "s.jsonl"),
                "--num-samples",
                "2",
                "--max-new-tokens",
                "4",
                "--condition",
                "Lowest Toxicity",
                "--no-progress",
            ]
        )
        == 0
    )
    tok, gens = calls[0]
    ((input_ids, _),) = gens
    assert tok.decode(input_ids[0]) == "Lowest Toxicity" + SEPARATOR + "the dog went to market"
    assert (
        bookkeeping.read_jsonl(str(tmp_path / "s.jsonl"))[0]["prompt"] == "the dog went to market"
    )


def test_control_tokens_are_never_generated(policy):
    model, tok = policy
    control = common.control_token_ids(tok)
    assert len(control) == 2  # the separator and the quantile token
    biased(model, tok, control, 30.0)  # without suppression these would be nearly every token
    x = tok(["the cat"], return_tensors="pt")
    raw = model.generate(
        **x, do_sample=True, top_k=0, max_new_tokens=10, pad_token_id=tok.pad_token_id
    )
    assert torch.isin(raw[0, 2:], torch.tensor(control)).float().mean() > 0.9
    calls = spy(model)
    res = sample.generate_batched(
        model,
        tok,
        [common.condition("the cat", "good"), "a dog"],
        num_samples=8,
        max_new_tokens=10,
        batch_size=1,
        progress=False,
    )
    for input_ids, out in calls:
        assert not torch.isin(out[:, input_ids.shape[1] :], torch.tensor(control)).any()
    assert all(y["num_tokens"] > 0 and y["generation"] for ys in res for y in ys)


def nucleus(logits, top_p, temperature):
    """Brute force: softmax(logits / T), keep the most likely tokens until their mass reaches top_p, renormalise."""
    p = torch.softmax(logits.double() / temperature, -1)
    keep, mass = set(), 0.0
    for i in sorted(range(len(p)), key=lambda i: -float(p[i])):
        if mass >= top_p:
            break
        keep.add(i)
        mass += float(p[i])
    q = torch.tensor(
        [float(p[i]) if i in keep else 0.0 for i in range(len(p))], dtype=torch.float64
    )
    return q / q.sum()


@pytest.mark.parametrize("top_p,temperature", [(1.0, 1.0), (0.8, 1.0), (0.9, 0.6), (1.0, 1.7)])
def test_sampler_draws_the_nucleus_distribution_exactly(top_p, temperature):
    # token 2 is suppressed
    logits = torch.tensor([2.0, 0.5, -float("inf"), 1.0, 0.0, -1.0, 1.9, -3.0])
    n = 200_000
    torch.manual_seed(0)
    scores = sample.sampler(top_p, temperature)(
        torch.zeros(n, 1, dtype=torch.long), logits.repeat(n, 1)
    )
    # exactly one pick per row
    assert (scores.isfinite().sum(1) == 1).all() and (scores.max(1).values == 0).all()
    freq = torch.bincount(scores.argmax(1), minlength=len(logits)).double() / n
    want = nucleus(logits, top_p, temperature)
    assert (freq[want == 0] == 0).all()  # never outside the nucleus, never the -inf token
    sigma = (want * (1 - want) / n).sqrt()
    assert ((freq - want).abs() <= 5 * sigma + 1e-12).all(), (freq, want)


def test_inverse_cdf_never_picks_a_zero_probability_token_at_the_edge(monkeypatch):
    logits = torch.tensor([[0.0, 0.0, -float("inf")]])  # the last token has probability 0
    # u = 1 exactly
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(*a[:2], dtype=k.get("dtype")))
    scores = sample.InverseCdfSampler()(None, logits)
    # u just below the total: the last real token
    assert int(scores.argmax()) == 1 and scores[0, 2] == -float("inf")


@pytest.mark.parametrize("exact_sampler", [False, True])
def test_first_token_frequencies_match_the_model_softmax(policy, exact_sampler):
    """End to end through generate: suppression, temperature and top-p are applied in that order before the draw,
    by HF's do_sample (the default) and by the inverse-CDF sampler alike."""
    model, tok = policy
    scrambled(model, std=0.3)
    x = "the cat sat on"
    n, top_p, temperature = 6000, 0.9, 0.8
    res = sample.generate_batched(
        model,
        tok,
        [x],
        num_samples=n,
        max_new_tokens=1,
        top_p=top_p,
        temperature=temperature,
        batch_size=1,
        progress=False,
        return_ids=True,
        min_new_tokens=0,
        exact_sampler=exact_sampler,
    )
    with torch.no_grad():
        logits = model(**tok([x], return_tensors="pt")).logits[0, -1].double()
    logits[common.control_token_ids(tok)] = -float("inf")
    want = nucleus(logits, top_p, temperature)
    eos = tok.eos_token_id
    firsts = [y["ids"][0] if y["ids"] else eos for y in res[0]]  # an empty y means EOS was drawn
    freq = torch.bincount(torch.tensor(firsts), minlength=len(want)).double() / n
    assert (freq[want == 0] == 0).all()
    # the nucleus is neither trivial nor the whole vocabulary
    assert 2 < int((want > 0).sum()) < len(want)
    # total variation: noise ~0.03; T=1 gives 0.21, top_p=1 0.10
    assert 0.5 * (freq - want).abs().sum() < 0.06


@pytest.mark.parametrize("eos_bias", [-50.0, 3.0, 50.0])
def test_truncated_and_num_tokens_match_the_generated_ids(policy, eos_bias):
    model, tok = policy
    biased(model, tok, [tok.eos_token_id], eos_bias)
    calls = spy(model)
    res = sample.generate_batched(
        model,
        tok,
        ["the cat sat on"],
        num_samples=64,
        max_new_tokens=8,
        progress=False,
        min_new_tokens=0,
    )
    ((input_ids, out),) = calls
    ys = res[0]
    assert len(ys) == 64
    for gen, y in zip(out[:, input_ids.shape[1] :].tolist(), ys):
        first = gen.index(tok.eos_token_id) if tok.eos_token_id in gen else None  # brute force
        assert y["truncated"] == (first is None)
        assert y["num_tokens"] == (8 if first is None else first)
        assert y["generation"] == tok.decode(gen[: y["num_tokens"]], skip_special_tokens=True)
    if eos_bias > 10:
        assert all(y == {"generation": "", "truncated": False, "num_tokens": 0} for y in ys)
    elif eos_bias < -10:
        assert all(y["truncated"] and y["num_tokens"] == 8 for y in ys)
    else:
        assert {y["truncated"] for y in ys} == {True, False}


@pytest.mark.parametrize("min_new", [1, 3, 5])
def test_eos_is_blocked_for_the_first_min_new_tokens(policy, min_new):
    model, tok = policy
    biased(model, tok, [tok.eos_token_id], 50.0)  # EOS wins every position it is allowed at
    res = sample.generate_batched(
        model,
        tok,
        ["the cat", "a dog sat"],
        num_samples=16,
        max_new_tokens=8,
        progress=False,
        min_new_tokens=min_new,
    )
    assert all(y["num_tokens"] == min_new and not y["truncated"] for ys in res for y in ys)
    assert sample.MIN_NEW_TOKENS == 3  # the official toxicity sampler's minimum, the CLI default


def test_batched_greedy_equals_one_by_one_in_input_order(policy):
    model, tok = policy
    scrambled(model)
    texts = tiny_texts(9)
    stats = {}
    res = sample.generate_batched(
        model,
        tok,
        texts,
        num_samples=2,
        max_new_tokens=6,
        temperature=0,
        batch_size=4,
        progress=False,
        stats=stats,
    )
    want = []
    for t in texts:  # unpadded, one prompt at a time
        x = tok([t], return_tensors="pt")
        out = model.generate(
            **x,
            do_sample=False,
            max_new_tokens=6,
            pad_token_id=tok.pad_token_id,
            suppress_tokens=common.control_token_ids(tok),
        )
        want.append(tok.decode(out[0, x["input_ids"].shape[1] :], skip_special_tokens=True))
    assert [[y["generation"] for y in ys] for ys in res] == [[w, w] for w in want]
    assert len(set(want)) > 1  # otherwise the order check would not bite
    assert stats["batches"] == 3 and stats["pad_share"] < 0.2


def test_seed_reproduces_and_differs_across_seeds(policy):
    model, tok = policy
    texts = tiny_texts(6)
    kw = dict(num_samples=3, max_new_tokens=5, batch_size=4, progress=False)
    a = sample.generate_batched(model, tok, texts, seed=1, **kw)
    torch.manual_seed(123)  # the global RNG state before the call must not matter
    assert sample.generate_batched(model, tok, texts, seed=1, **kw) == a
    assert sample.generate_batched(model, tok, texts, seed=2, **kw) != a


def test_long_prompt_is_left_truncated_keeping_the_feedback(policy, capsys):
    model, tok = policy
    long_x = " ".join(["the cat sat on the mat"] * 60)  # far beyond the 128-token context
    calls = spy(model)
    stats = {}
    res = sample.generate_batched(
        model,
        tok,
        [common.condition(long_x, "kind"), "a dog"],
        num_samples=2,
        max_new_tokens=20,
        batch_size=2,
        progress=False,
        stats=stats,
    )
    assert stats["prompts_truncated"] == 1 and len(res) == 2
    assert "1 of 2 inputs exceed 108 tokens" in capsys.readouterr().err
    ((input_ids, _),) = calls
    assert input_ids.shape[1] == 108
    kept = tok.decode(input_ids[0])
    assert kept.startswith("kind" + SEPARATOR) and long_x.endswith(kept.split(SEPARATOR)[1])


def test_shard_merge_equals_unsharded_with_condition_pool(tiny_model_dir, tmp_path, capsys):
    texts = tiny_texts(10)
    texts[3] = texts[7] = texts[1]  # duplicate prompts
    texts[5] = ""  # skipped in its shard
    prompts = write_prompts(tmp_path / "p.jsonl", texts)
    pool = tmp_path / "exemplars.json"
    pool.write_text(json.dumps(["Lowest Toxicity", "Low Toxicity", "Medium Toxicity"]))
    base = [
        "--model",
        tiny_model_dir,
        "--prompts",
        prompts,
        "--num-samples",
        "2",
        "--max-new-tokens",
        "4",
        "--condition-pool",
        str(pool),
        "--batch-size",
        "3",
        "--no-progress",
    ]
    full, merged = str(tmp_path / "full.jsonl"), str(tmp_path / "m.jsonl")
    assert run(base + ["--out", full]) == 0
    for i in (0, 2):
        assert run(base + ["--out", merged, "--shard", f"{i}/3"]) == 0
    assert run(["--merge", merged]) == 2
    assert "missing shard(s) 1 of 3" in capsys.readouterr().err
    assert run(base + ["--out", merged, "--shard", "1/3"]) == 0
    assert all(r["prompt_index"] % 3 == 1 for r in bookkeeping.read_jsonl(merged + ".shard-1-of-3"))
    assert run(["--merge", merged]) == 0
    a, b = bookkeeping.read_jsonl(full), bookkeeping.read_jsonl(merged)
    keys = [(r["prompt_id"], r["sample_idx"]) for r in a]
    assert (
        keys
        == [(r["prompt_id"], r["sample_idx"]) for r in b]
        == [(i, j) for i in range(10) if i != 5 for j in range(2)]
    )
    assert [(r["prompt"], r["condition"]) for r in a] == [(r["prompt"], r["condition"]) for r in b]
    assert set(b[0]) == KEYS and len({r["condition"] for r in a}) > 1
    capsys.readouterr()
    assert run(["--merge", merged]) == 0 and capsys.readouterr().out.startswith("done")


def test_resume_skips_done_output_and_goes_on_from_finished_batches(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    prompts = write_prompts(tmp_path / "p.jsonl", tiny_texts(12))
    argv = [
        "--model",
        tiny_model_dir,
        "--prompts",
        prompts,
        "--num-samples",
        "2",
        "--max-new-tokens",
        "5",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    ref, out = str(tmp_path / "ref.jsonl"), str(tmp_path / "out.jsonl")
    assert run(argv + ["--out", ref]) == 0
    calls, orig = [], sample.sample_batch

    def crash_after_three(*a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(sample, "sample_batch", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        run(argv + ["--out", out])
    assert not os.path.exists(out) and len(bookkeeping.read_jsonl(out + ".partial")) == 1 + 3
    monkeypatch.setattr(sample, "sample_batch", orig)
    capsys.readouterr()
    assert run(argv + ["--out", out]) == 0
    assert "3 batches resumed" in capsys.readouterr().out
    assert bookkeeping.read_jsonl(out) == bookkeeping.read_jsonl(ref) and not os.path.exists(
        out + ".partial"
    )
    mtime = os.path.getmtime(out)
    assert run(argv + ["--out", out]) == 0
    assert capsys.readouterr().out.startswith("done") and os.path.getmtime(out) == mtime
    assert run(argv + ["--out", out, "--seed", "1", "--overwrite"]) == 0
    assert bookkeeping.read_jsonl(out) != bookkeeping.read_jsonl(ref)


@pytest.mark.slow
def test_sigkill_leaves_no_partial_output_and_rerun_resumes(tiny_model_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", tiny_texts(40))
    out = str(tmp_path / "s.jsonl")
    argv = [
        "--model",
        tiny_model_dir,
        "--prompts",
        prompts,
        "--out",
        out,
        "--num-samples",
        "1",
        "--max-new-tokens",
        "5",
        "--batch-size",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "sample.py"), *argv],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (
            os.path.exists(out + ".partial")
            and open(out + ".partial", "rb").read().count(b"\n") >= 3
        ):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "sample.py finished before it could be killed"
    assert not os.path.exists(out)
    assert run(argv) == 0
    assert len(bookkeeping.read_jsonl(out)) == 40
    resumed = int(capsys.readouterr().out.split(" batches resumed")[0].rsplit(" ", 1)[1])
    assert 2 <= resumed < 40


def test_prompt_field_through_datasets_json_loader(tiny_model_dir, tmp_path):
    path = tmp_path / "rtp.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "prompt": {"text": t, "toxicity": 0.1}}) + "\n"
            for i, t in enumerate(["the cat", "a dog sat"])
        )
    )
    out = str(tmp_path / "s.jsonl")
    assert (
        run(
            [
                "--model",
                tiny_model_dir,
                "--prompts",
                str(path),
                "--prompt-field",
                "prompt.text",
                "--out",
                out,
                "--num-samples",
                "1",
                "--max-new-tokens",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    assert [(r["prompt_id"], r["prompt"]) for r in bookkeeping.read_jsonl(out)] == [
        ("r0", "the cat"),
        ("r1", "a dog sat"),
    ]


@pytest.mark.parametrize(
    "extra, files, message",
    [
        (["--shard", "5/4"], {}, "expected i/n with 0 <= i < n"),
        (["--shard", "1-4"], {}, "expected i/n"),
        (["--top-p", "0"], {}, "--top-p: must be a finite number > 0 and <= 1"),
        (["--num-samples", "0"], {}, "--num-samples: must be an integer >= 1"),
        (["--max-new-tokens", "128"], {}, "leaves no room for a prompt in the 128-token context"),
        (["--condition", "a" + SEPARATOR + "b"], {}, "contains <|separator|>"),
        (
            ["--condition-pool", "{POOL}"],
            {"POOL": '["ok", 3]'},
            "expected a non-empty JSON list of non-empty strings",
        ),
        (["--condition-pool", "{POOL}"], {"POOL": '["ok"'}, "{POOL}:1: malformed JSON"),
        ([], {"PROMPTS": ""}, "{PROMPTS}: file is empty"),
        ([], {"PROMPTS": '{"prompt": "ok"}\n{"prompt": \n'}, "{PROMPTS}:2: malformed JSON"),
        ([], {"PROMPTS": '{"prompt": ""}\n{"prompt": " "}\n'}, "all 2 prompts are empty"),
        (
            [],
            {"PROMPTS": json.dumps({"prompt": "x" + SEPARATOR + "y"})},
            "row 1: prompt contains the control token",
        ),
        (["--model", "{MISSING}/model"], {}, "cannot load model"),
        (["--prompts", "{MISSING}/p.jsonl"], {}, "{MISSING}/p.jsonl: no such prompt file"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_code_2(
    tiny_model_dir, tmp_path, capsys, extra, files, message
):
    paths = {name: str(tmp_path / name) for name in ("PROMPTS", "POOL", "MISSING")}
    for name, text in files.items():
        open(paths[name], "w").write(text)
    if "PROMPTS" not in files:
        write_prompts(paths["PROMPTS"], ["the cat sat"])
    argv = [
        "--model",
        tiny_model_dir,
        "--prompts",
        paths["PROMPTS"],
        "--out",
        str(tmp_path / "s.jsonl"),
        "--no-progress",
    ] + [a.format(**paths) for a in extra]
    assert run(argv) == 2
    err = capsys.readouterr().err
    # argparse prints its usage first; load_policy may print a loading bar
    last = err.strip().splitlines()[-1]
    assert "error: " in last and message.format(**paths) in last
    assert "Traceback" not in err and not os.path.exists(tmp_path / "s.jsonl")


def test_generate_batched_rejects_an_input_with_no_tokens(policy):
    model, tok = policy
    with pytest.raises(AltError, match="input 1 tokenizes to nothing"):
        sample.generate_batched(model, tok, ["the cat", ""], progress=False)
    assert sample.generate_batched(model, tok, [], progress=False) == []
