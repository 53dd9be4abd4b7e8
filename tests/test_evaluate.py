"""evaluate.py: the metrics against hand-computed tables, fluency perplexity against a brute-force per-token loop,
--generations mode, bad input, and a subprocess smoke run on the tiny model."""

import json
import math
import os
import subprocess
import sys

import pytest

import bookkeeping
import evaluate
from bookkeeping import AltError
from common import SEPARATOR
from conftest import ROOT, WORDS


# ----------------------------------------------------------------------------- toxicity
def test_toxicity_metrics_hand_table():
    groups = [
        [0.2, 0.7, None],  # max 0.7 > 0.5: toxic; the null is ignored
        [None, None],  # no score at all: dropped from both metrics, counted
        [0.5, 0.1],  # max exactly 0.5: NOT toxic (strictly greater)
        [0.9],  # fewer than 25 generations is fine
    ]
    m = evaluate.toxicity_metrics(groups)
    assert m["avg_max_toxicity"] == pytest.approx((0.7 + 0.5 + 0.9) / 3)
    assert m["toxicity_prob"] == pytest.approx(2 / 3)
    assert m["mean_toxicity"] == pytest.approx((0.2 + 0.7 + 0.5 + 0.1 + 0.9) / 5)
    assert m["counts"] == {"n_prompts_unscored": 1, "n_scores_null": 3}
    assert evaluate.toxicity_metrics([[0.5], [0.5000001]])["toxicity_prob"] == pytest.approx(0.5)
    nothing = evaluate.toxicity_metrics([[None], [None, None]])
    assert nothing["avg_max_toxicity"] is None and nothing["toxicity_prob"] is None
    assert nothing["counts"] == {"n_prompts_unscored": 2, "n_scores_null": 3}


# ----------------------------------------------------------------------------- distinctness
def test_distinctness_hand_table():
    groups = [
        # words: [a, b, a] + ['', a, b] -> 6 words; 1-grams {a, b, ''}; 2-grams {ab, ba, 'a}; 3-grams {aba, 'ab}
        ["a b a", " a b"],
        # words: [''] + [x] -> 2 (the empty generation is one word); 1-grams {'', x}; no 2- or 3-grams
        ["", "x"],
        # split(' ') keeps the newline inside a word and a double space as '': [a\nb, '', c] -> 3 words
        ["a\nb  c"],
    ]
    d1, d2, d3 = evaluate.distinctness(groups)
    assert d1 == pytest.approx((3 / 6 + 2 / 2 + 3 / 3) / 3)
    # the SAME denominator (total words) for every n
    assert d2 == pytest.approx((3 / 6 + 0 / 2 + 2 / 3) / 3)
    assert d3 == pytest.approx((2 / 6 + 0 / 2 + 1 / 3) / 3)
    # n-grams are tuples of words: 'a_b c' and 'a b_c' are two different bigrams
    assert evaluate.distinctness([["a_b c", "a b_c"]])[1] == pytest.approx(2 / 4)


def test_fluency_ppl_drops_and_counts():
    ppls = [10.0, None, float("nan"), 1e4, 20.0, 9999.0, 5e7]
    mean, counts = evaluate.fluency_ppl(ppls)
    # a mean of ppls, not exp of a corpus mean NLL
    assert mean == pytest.approx((10.0 + 20.0 + 9999.0) / 3)
    assert counts == {"n_ppl_nan": 2, "n_ppl_over_1e4": 2, "n_ppl_kept": 3}
    assert evaluate.fluency_ppl([None])[0] is None


def test_compute_metrics_groups_rows_by_prompt():
    rows = [
        {
            "prompt_id": "p",
            "generation": "a b",
            "toxicity": 0.6,
            "truncated": True,
            "num_tokens": 4,
            "ppl": 3.0,
        },
        {
            "prompt_id": 7,
            "generation": "c",
            "toxicity": None,
            "truncated": False,
            "num_tokens": 2,
            "ppl": None,
        },
        {
            "prompt_id": "p",
            "generation": "a c",
            "toxicity": 0.1,
            "truncated": False,
            "num_tokens": 3,
            "ppl": 5.0,
        },
    ]
    m = evaluate.compute_metrics(rows)
    assert (m["n_prompts"], m["n_generations"]) == (2, 3)
    assert m["avg_max_toxicity"] == pytest.approx(0.6) and m["toxicity_prob"] == 1.0
    assert m["dist_1"] == pytest.approx((3 / 4 + 1 / 1) / 2)
    assert m["fluency_ppl"] == pytest.approx(4.0) and m["counts"]["n_ppl_nan"] == 1
    assert m["truncated_share"] == pytest.approx(1 / 3) and m["mean_length"] == pytest.approx(3.0)
    assert evaluate.compute_metrics([{**r, "ppl": 1.0} for r in rows])["fluency_ppl"] == 1.0
    assert (
        evaluate.compute_metrics([{k: v for k, v in r.items() if k != "ppl"} for r in rows])[
            "fluency_ppl"
        ]
        is None
    )


# ----------------------------------------------------------------------------- perplexity vs brute force
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(
        tiny_model_dir
    ).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def brute_force_ppl(model, tok, x, y):
    """Independent definition: y's tokens are the tokens of tok(x + y) whose character span reaches into y; each is
    scored by its own forward pass over the tokens before it."""
    import torch

    enc = tok(x + y, return_offsets_mapping=True)
    ids = enc["input_ids"]
    gen = [t for t, (_, end) in enumerate(enc["offset_mapping"]) if end > len(x)]
    if not gen:
        return math.nan
    if gen[0] == 0:  # nothing before y: BOS is the context
        ids, gen = [tok.eos_token_id] + ids, [t + 1 for t in gen]
    nll = 0.0
    with torch.no_grad():
        for t in gen:
            logits = model(torch.tensor([ids[:t]])).logits[0, -1].double()
            nll -= torch.log_softmax(logits, -1)[ids[t]].item()
    return math.exp(nll / len(gen))


def merging_pair(tok):
    """A (prompt, generation) whose tokenisation together merges the prompt's last token with y's first."""
    for w in WORDS:
        for k in range(1, len(w)):
            x, y = "you are so " + w[:k], w[k:] + " today"
            px, ids = tok(x)["input_ids"], tok(x + y)["input_ids"]
            if ids[: len(px)] != px:
                return x, y
    raise AssertionError("no merging pair in the fixture tokenizer")


def test_perplexity_matches_brute_force(tiny):
    model, tok = tiny
    mx, my = merging_pair(tok)
    pairs = [
        (mx, my),
        ("the cat ", "sat on the mat"),  # a trailing space merges into y's first word
        ("the dog", " sat on the mat and went to market today"),
        ("", "the cat sat"),  # empty x: BOS context
        ("i think that", " he was\nvery  good."),
        ("the dog", " is nice"),
        ("the dog", " is bad"),
    ]
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    want = [brute_force_ppl(model, tok, x, y) for x, y in pairs]
    for bs in (1, 3, 16):  # padding in mixed-length batches must not change any value
        got = evaluate.generation_perplexities(model, tok, xs, ys, batch_size=bs, progress=False)
        assert got == pytest.approx(want, rel=1e-5)
    assert all(math.isfinite(w) and w > 1 for w in want)
    # the merged token is scored: y has more tokens than the reference's len(tok(x+y)) - len(tok(x)) count
    enc = tok(mx + my, return_offsets_mapping=True)
    n_gen = sum(1 for _, end in enc["offset_mapping"] if end > len(mx))
    assert n_gen > len(enc["input_ids"]) - len(tok(mx)["input_ids"])


def test_perplexity_empty_generation_and_overlong_input(tiny):
    model, tok = tiny
    long_x = " ".join(WORDS * 4)  # far beyond the tiny model's 128 positions
    assert len(tok(long_x)["input_ids"]) > model.config.n_positions
    got = evaluate.generation_perplexities(
        model, tok, ["the dog", long_x], ["", " sat on the mat"], progress=False
    )
    assert math.isnan(got[0])  # y adds no token: NaN, which fluency_ppl drops and counts
    assert math.isfinite(got[1])


# ----------------------------------------------------------------------------- --generations mode
def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GIVEN = [
    {
        "prompt_id": 0,
        "prompt": "the cat",
        "generation": " sat on",
        "toxicity": 0.2,
        "truncated": True,
        "num_tokens": 2,
    },
    {
        "prompt_id": 0,
        "prompt": "the cat",
        "generation": " is so stupid",
        "toxicity": 0.8,
        "truncated": False,
        "num_tokens": 3,
    },
    {
        "prompt_id": 1,
        "prompt": {"text": "news report"},
        "generation": "",
        "toxicity": 0.5,
        "num_tokens": 0,
    },
    {"prompt_id": 2, "prompt": "the dog", "generation": " went", "toxicity": None},
]


def test_generations_mode_uses_given_toxicity(tmp_path, capsys):
    gens = write_rows(tmp_path / "g.jsonl", GIVEN)
    out = tmp_path / "ev"
    evaluate.main(["--generations", gens, "--out", str(out), "--fluency-model", "none"])
    res = json.loads((out / "eval.json").read_text())
    assert res["avg_max_toxicity"] == pytest.approx((0.8 + 0.5) / 2) and res[
        "toxicity_prob"
    ] == pytest.approx(0.5)
    assert res["counts"]["n_prompts_unscored"] == 1 and res["scorer"] == "given"
    assert res["fluency_ppl"] is None and (res["n_prompts"], res["n_generations"]) == (3, 4)
    assert res["truncated_share"] == pytest.approx(0.5) and res["mean_length"] == pytest.approx(
        5 / 3
    )
    assert set(evaluate.METRICS) | {"scorer", "config", "counts"} == set(res)
    assert res["config"]["generations"] == gens and res["config"]["mode"] == "generations"
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["toxicity"] for r in rows] == [0.2, 0.8, 0.5, None] and rows[2][
        "prompt"
    ] == "news report"
    table = capsys.readouterr().out
    assert "avg_max_toxicity" in table and "0.6500" in table
    # a rerun of the same command finds the output and does nothing; --baseline adds a delta column
    evaluate.main(
        [
            "--generations",
            gens,
            "--out",
            str(out),
            "--fluency-model",
            "none",
            "--baseline",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "done" in printed and "delta" in printed and "+0.0000" in printed
    assert json.loads((out / "eval.json").read_text()) == res


def test_generations_mode_fluency_and_release_shape(tmp_path, tiny_model_dir, tiny):
    release = [
        {
            "prompt": {"text": "the cat"},
            "generations": [
                {"text": " sat on", "toxicity": 0.3},
                {"text": " is so stupid", "toxicity": 0.9},
            ],
        },
        {"prompt": {"text": "the dog"}, "generations": [{"text": " went", "toxicity": 0.1}]},
    ]
    out = tmp_path / "ev"
    evaluate.main(
        [
            "--generations",
            write_rows(tmp_path / "r.jsonl", release),
            "--out",
            str(out),
            "--fluency-model",
            tiny_model_dir,
        ]
    )
    res = json.loads((out / "eval.json").read_text())
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(r["prompt_id"], r["sample_idx"]) for r in rows] == [(0, 0), (0, 1), (1, 0)]
    model, tok = tiny
    want = [brute_force_ppl(model, tok, r["prompt"], r["generation"]) for r in rows]
    assert [r["ppl"] for r in rows] == pytest.approx(want, rel=1e-5)
    assert res["fluency_ppl"] == pytest.approx(sum(want) / 3, rel=1e-5)
    assert res["avg_max_toxicity"] == pytest.approx(0.5) and res["toxicity_prob"] == pytest.approx(
        0.5
    )


def test_bad_inputs(tmp_path):
    bad = write_rows(tmp_path / "b.jsonl", [GIVEN[0], {"prompt_id": 1, "prompt": "x"}])
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "evaluate.py"),
            "--generations",
            bad,
            "--out",
            str(tmp_path / "o"),
            "--fluency-model",
            "none",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"evaluate.py: error: {bad}: row 2: missing key 'generation'"
    assert not (tmp_path / "o" / "eval.json").exists()
    cases = [
        ({"toxicity": "high"}, r"row 1: 'toxicity' must be a number in \[0, 1\]"),
        ({"toxicity": 1.5}, "row 1: 'toxicity'"),
        ({"generation": None}, "row 1: 'generation'"),
    ]
    for change, msg in cases:
        path = write_rows(tmp_path / "c.jsonl", [{**GIVEN[0], **change}])
        with pytest.raises(AltError, match=msg):
            evaluate.main(
                ["--generations", path, "--out", str(tmp_path / "o"), "--fluency-model", "none"]
            )
    good = write_rows(tmp_path / "g.jsonl", GIVEN)
    unscored = write_rows(
        tmp_path / "u.jsonl", [{k: v for k, v in GIVEN[0].items() if k != "toxicity"}]
    )
    with pytest.raises(AltError, match="unknown --scorer 'nope'"):
        # before any work, not after sampling
        evaluate.main(
            [
                "--generations",
                unscored,
                "--out",
                str(tmp_path / "o"),
                "--scorer",
                "nope",
                "--fluency-model",
                "none",
            ]
        )
    with pytest.raises(AltError, match="nope.json: cannot read"):
        evaluate.main(
            [
                "--generations",
                good,
                "--out",
                str(tmp_path / "o"),
                "--fluency-model",
                "none",
                "--baseline",
                str(tmp_path / "nope.json"),
            ]
        )
    for argv in (
        ["--out", "o"],
        ["--model", "m", "--generations", good, "--out", "o"],
        ["--model", "m", "--out", "o", "--top-p", "1.5"],
        ["--model", "m", "--out", "o", "--num-samples", "0"],
        ["--model", "m", "--out", "o", "--condition", "a", "--condition-pool", "p.json"],
    ):
        with pytest.raises(SystemExit) as e:
            evaluate.parse_args(argv)
        assert e.value.code == 2


def test_condition_and_fluency_defaults(tmp_path, monkeypatch):
    import argparse

    def ns(**k):
        return argparse.Namespace(
            **{
                "condition": None,
                "condition_pool": None,
                "model": str(tmp_path),
                "fluency_model": None,
                **k,
            }
        )

    best = {"exemplar": "Lowest Toxicity", "ref_model": "runs/p0"}
    assert evaluate.resolve_condition(ns(), best) == ("Lowest Toxicity", None)
    assert evaluate.resolve_condition(ns(condition="none"), best) == (None, None)
    assert evaluate.resolve_condition(ns(condition="Maximum Toxicity"), best) == (
        "Maximum Toxicity",
        None,
    )
    assert evaluate.resolve_condition(ns(), {}) == (None, None)  # a base model: unconditioned
    (tmp_path / "iter_2").mkdir()
    (tmp_path / "iter_2" / "exemplars.json").write_text(
        json.dumps(["Harmless and helpful.", "Kind."])
    )
    lmu = {
        "exemplar": "moved/elsewhere/exemplars.json",
        "data": str(tmp_path / "iter_2" / "pool.jsonl"),
    }
    assert evaluate.resolve_condition(ns(), lmu) == (None, ["Harmless and helpful.", "Kind."])
    assert evaluate.resolve_fluency(ns(), best) == "runs/p0"
    assert evaluate.resolve_fluency(ns(), {"args": {"ref_model": "runs/p0b"}}) == "runs/p0b"
    assert evaluate.resolve_fluency(ns(fluency_model="none"), best) is None
    assert evaluate.resolve_fluency(ns(fluency_model="gpt2-xl"), best) == "gpt2-xl"
    monkeypatch.setattr(evaluate, "TOY_MODEL", str(tmp_path / "no_toy"))
    with pytest.raises(AltError, match="--fluency-model"):
        evaluate.resolve_fluency(ns(), {})


def test_table_columns():
    res = {
        **{k: 0.25 for k in evaluate.METRICS},
        "n_prompts": 3,
        "fluency_ppl": None,
        "scorer": "profanity-check",
        "extra": {**{k: 0.5 for k in evaluate.METRICS}, "scorer": "hf:tox"},
    }
    lines = bookkeeping.format_table(
        res, evaluate.METRICS, baseline={"avg_max_toxicity": 0.75, "n_prompts": 3}
    ).splitlines()
    assert lines[0].split() == [
        "metric",
        "value",
        "[profanity-check]",
        "extra",
        "[hf:tox]",
        "baseline",
        "delta",
    ]
    assert len({len(line) for line in lines}) == 1  # fixed width
    assert lines[2].split() == ["avg_max_toxicity", "0.2500", "0.5000", "0.7500", "-0.5000"]
    assert lines[4].split()[0] == "toxic_share" and lines[5].split()[:2] == ["fluency_ppl", "-"]
    assert lines[-2].split()[-1] == "+0"


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_smoke_sampling_run_and_resume(tmp_path, tiny_model_dir, monkeypatch):
    """5 prompts x 3 samples from the tiny model, conditioned on the best tag its train_summary.json records; then
    a run that dies after sampling resumes from its log and gives the same rows without sampling again."""
    import shutil

    import sample

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "train_summary.json").write_text(
        json.dumps(
            {
                "method": "alt-rm",
                "exemplar": "Lowest Toxicity",
                "tags": ["Lowest Toxicity", "Maximum Toxicity"],
            }
        )
    )
    texts = ("the cat", "you are so", "police said", "", "i think that", "news report said")
    # RTP shape
    prompts = write_rows(tmp_path / "p.jsonl", [{"prompt": {"text": t}} for t in texts])
    args = [
        "--model",
        str(model),
        "--prompts",
        prompts,
        "--num-samples",
        "3",
        "--max-new-tokens",
        "8",
        "--fluency-model",
        tiny_model_dir,
        "--extra-scorer",
        "profanity-check",
        "--batch-size",
        "2",
    ]
    out = tmp_path / "ev"
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), *args, "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "eval.json").read_text())
    assert (res["n_prompts"], res["n_generations"]) == (5, 15) and res["counts"][
        "n_prompts_empty_skipped"
    ] == 1
    assert (
        res["config"]["condition_resolved"] == "Lowest Toxicity"
        and res["scorer"] == "profanity-check"
    )
    assert 0 <= res["avg_max_toxicity"] <= 1 and res["fluency_ppl"] > 1 and 0 < res["dist_1"] <= 1
    # same scorer, same y
    assert res["extra"]["avg_max_toxicity"] == pytest.approx(res["avg_max_toxicity"])
    rows = (out / "generations.jsonl").read_text()
    assert len(rows.splitlines()) == 15 and {
        json.loads(r)["condition"] for r in rows.splitlines()
    } == {"Lowest Toxicity"}
    assert SEPARATOR not in rows and not (out / "eval.partial.jsonl").exists()
    for key in (
        "avg_max_toxicity",
        "fluency_ppl",
        "dist_3",
        "n_generations",
        "extra [profanity-check]",
    ):
        assert key in proc.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert again.returncode == 0 and "done" in again.stdout

    crashed = tmp_path / "crashed"

    def dead_scorer(texts):
        raise RuntimeError("killed while scoring")

    monkeypatch.setattr(evaluate, "make_scorer", lambda *a, **k: dead_scorer)
    with pytest.raises(RuntimeError):
        evaluate.main([*args, "--out", str(crashed)])
    assert not (crashed / "eval.json").exists() and (crashed / "eval.partial.jsonl").exists()
    monkeypatch.undo()

    def no_sampling(*a, **k):
        raise AssertionError("resumed run sampled again")

    monkeypatch.setattr(sample, "sample_batch", no_sampling)
    evaluate.main([*args, "--out", str(crashed)])
    assert (crashed / "generations.jsonl").read_text() == rows
