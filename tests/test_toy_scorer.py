"""The bundled toy toxicity scorer (toy/scorer) through scorers.make_scorer, and build_toy_scorer.py's pieces."""

import itertools
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

SCORER = os.path.join(ROOT, "toy", "scorer")
ABUSIVE = [
    "You are a fucking idiot, shut up you stupid piece of shit.",
    "What a stupid idiot.",
    "You people are disgusting animals.",
]
BENIGN = [
    "The weather is lovely today and the children played in the park.",
    "The city council met on Tuesday to discuss the budget.",
    "She planted tomatoes in the garden.",
]


@pytest.fixture(scope="module")
def score():
    from scorers import make_scorer

    return make_scorer(f"hf:{SCORER}")


def test_folder_is_a_small_sigmoid_classifier_with_a_saved_pad_token():
    from transformers import AutoConfig, AutoTokenizer

    files = os.listdir(SCORER)
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert sum(os.path.getsize(os.path.join(SCORER, f)) for f in files) <= 8 * 2**20
    cfg, tok = AutoConfig.from_pretrained(SCORER), AutoTokenizer.from_pretrained(SCORER)
    # feedback.py: sigmoid
    assert cfg.num_labels == 1 and cfg.problem_type == "multi_label_classification"
    # GPT-2 pooling needs it
    assert tok.pad_token is not None and cfg.pad_token_id == tok.pad_token_id
    assert tok.model_max_length <= cfg.n_positions


def test_scores_are_probabilities_and_abuse_outranks_benign_text(score):
    vals = score(ABUSIVE + BENIGN + ["", " ", "ok"])
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in vals)
    abusive, benign = vals[: len(ABUSIVE)], vals[len(ABUSIVE) : len(ABUSIVE) + len(BENIGN)]
    assert min(abusive) > max(benign)
    assert min(abusive) > 0.5 > max(benign)


def test_batched_scores_match_one_at_a_time_and_repeat_exactly(score):
    from scorers import make_scorer

    rng = random.Random(0)
    words = (" ".join(ABUSIVE + BENIGN)).split()
    texts = (
        ABUSIVE
        + BENIGN
        + [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(20)]
    )
    texts.append(" ".join(words * 10))  # > 128 tokens: truncated, not an error
    batched = score(texts)
    assert score(texts) == batched  # deterministic (eval mode: no dropout)
    single = make_scorer(f"hf:{SCORER}", batch_size=1)(texts)  # no padding at all
    np.testing.assert_allclose(batched, single, atol=1e-5)
    perm = list(range(len(texts)))
    rng.shuffle(perm)
    np.testing.assert_allclose(
        [batched[i] for i in perm], score([texts[i] for i in perm]), atol=1e-5
    )


def test_roc_auc_and_pearson_match_brute_force():
    from toy.build_toy_scorer import pearson, roc_auc

    rng = np.random.default_rng(0)
    for _ in range(5):
        s = rng.integers(0, 6, size=40).astype(float)  # few distinct values: many ties
        y = rng.random(40) < 0.4
        pairs = [
            (1.0 if a > b else 0.5 if a == b else 0.0) for a, b in itertools.product(s[y], s[~y])
        ]
        assert roc_auc(y, s) == pytest.approx(sum(pairs) / len(pairs))
        t = rng.random(40)
        ds, dt = s - s.mean(), t - t.mean()
        ref = np.sum(ds * dt) / np.sqrt(np.sum(ds**2) * np.sum(dt**2))
        assert pearson(s, t) == pytest.approx(ref)


def _fake_rtp(path, n=40):
    """n RTP-shaped rows: a benign prompt (0.1) and an abusive continuation (0.9); row 3 has a null score."""
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            row = {
                "prompt": {"text": f"row {i} the cat sat on the mat and", "toxicity": 0.1},
                "continuation": {
                    "text": f" you stupid idiot {i}",
                    "toxicity": None if i == 3 else 0.9,
                },
            }
            fh.write(json.dumps(row) + "\n")


def test_labelled_rows_skip_nulls_and_split_keeps_rows_together(tmp_path):
    from bookkeeping import AltError
    from toy.build_toy_scorer import load_labelled, split_rows

    path = tmp_path / "rtp.jsonl"
    _fake_rtp(path)
    rows, skipped = load_labelled(str(path))
    assert skipped == 1 and len(rows) == 40 and len(rows[3]) == 1
    train, val, held = split_rows(rows, 0.15, 0.1, seed=0)
    assert len(train) + len(val) + len(held) == 79

    def row_of(items):
        return {t.split()[1] for t, _ in items if t.startswith("row")} | {
            t.split()[-1] for t, _ in items if not t.startswith("row")
        }

    assert (
        not row_of(train) & row_of(held)
        and not row_of(val) & row_of(held)
        and not row_of(train) & row_of(val)
    )
    assert len(row_of(held)) == 6 and split_rows(rows, 0.15, 0.1, seed=0) == (train, val, held)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"prompt": {"text": "x", "toxicity": 1.5}}) + "\n")
    with pytest.raises(AltError, match=r"rtp\.jsonl:41: prompt\.toxicity"):
        load_labelled(str(path))


def test_bundled_summary_matches_a_fresh_held_out_measurement(shared_data, score):
    from scorers import make_scorer
    from toy.build_toy_scorer import RTP, agreement, load_labelled, split_rows

    with open(os.path.join(SCORER, "build_summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    cfg = summary["config"]
    rows, _ = load_labelled(os.path.join(shared_data, RTP))
    train, _, held = split_rows(rows, cfg["holdout"], cfg["val"], cfg["seed"])
    assert len(held) == summary["held_out_texts"] and len(train) == summary["train_texts"]
    texts, persp = [t for t, _ in held], [t for _, t in held]
    ours, prof = (
        agreement(persp, score(texts)),
        agreement(persp, make_scorer("profanity-check")(texts)),
    )
    for key in ("pearson", "roc_auc"):
        assert ours[key] == pytest.approx(summary["toy_scorer"][key], abs=2e-4)
        assert prof[key] == pytest.approx(summary["profanity_check"][key], abs=2e-4)
    assert ours["roc_auc"] > 0.8 and ours["pearson"] > 0.6  # it learned Perspective, not noise


@pytest.mark.slow
def test_build_end_to_end_on_fake_data_then_done_and_bad_input(tmp_path):
    data, out = tmp_path / "data", tmp_path / "scorer"
    (data / "rtp").mkdir(parents=True)
    _fake_rtp(data / "rtp" / "rtp_dev4k.jsonl")
    cmd = [
        sys.executable,
        "-m",
        "toy.build_toy_scorer",
        "--data",
        str(data),
        "--out",
        str(out),
        "--tokenizer",
        str(tmp_path / "none"),
        "--vocab-size",
        "300",
        "--n-layer",
        "1",
        "--n-embd",
        "16",
        "--n-head",
        "2",
        "--block",
        "32",
        "--epochs",
        "2",
        "--batch",
        "8",
        "--warmup",
        "2",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "toy scorer" in run.stdout and "profanity-check" in run.stdout
    summary = json.loads((out / "build_summary.json").read_text())
    from toy.build_toy_scorer import load_labelled, split_rows

    held = split_rows(load_labelled(str(data / "rtp" / "rtp_dev4k.jsonl"))[0], 0.15, 0.1, 0)[2]
    assert summary["held_out_texts"] == len(held) >= 11 and summary["null_scores_skipped"] == 1
    assert summary["tokenizer"].startswith("trained on")
    from scorers import make_scorer

    assert all(0.0 <= v <= 1.0 for v in make_scorer(f"hf:{out}")(["you stupid idiot", "the cat"]))
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert again.returncode == 0 and again.stdout.startswith("done")
    with open(data / "rtp" / "rtp_dev4k.jsonl", "a", encoding="utf-8") as fh:
        fh.write("{not json\n")
    bad = subprocess.run(
        cmd + ["--overwrite"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert bad.returncode == 2 and "rtp_dev4k.jsonl:41: malformed JSON" in bad.stderr
    assert "Traceback" not in bad.stderr
