"""The toy world: our BPE trainer, the data mix/packing of build_toy_model.py, and the bundled toy/model."""

import json
import os
import random
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_texts

TOY = os.path.join(ROOT, "toy", "model")


def test_train_tokenizer_round_trips_and_has_eos():
    from toy.build_toy_model import train_tokenizer

    texts = tiny_texts()
    tok = train_tokenizer(texts, vocab_size=400)
    assert len(tok) <= 400
    assert tok.convert_tokens_to_ids("<|endoftext|>") == tok.eos_token_id
    for text in ["the cat sat on the mat.", "Zürich ☃ 42 idiot!!", " leading space"]:
        ids = tok(text)["input_ids"]
        assert len(ids) > 1  # the transformers 5 vocab_file trap yields [] silently
        assert tok.decode(ids) == text  # byte-level: unseen characters survive too
    # merges were learned: the training text takes far fewer tokens than bytes
    assert sum(len(ids) for ids in tok(texts)["input_ids"]) < 0.5 * sum(
        len(t.encode()) for t in texts
    )


def _fake_data(root, n=30):
    """A ../shared/data look-alike: every MIX source with n small documents."""
    from toy.build_toy_model import MIX

    rng = random.Random(1)
    for name, (rel, _) in MIX.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        docs = [
            f"{name} doc {i} " + " ".join(rng.choice(tiny_texts(50)).split()[:6]) for i in range(n)
        ]
        with open(path, "w", encoding="utf-8") as fh:
            for i, d in enumerate(docs):
                if rel.endswith(".jsonl"):
                    row = {"prompt": {"text": d}}
                    if name == "rtp":
                        # every third row toxic by Perspective (stage 2 keeps few of them)
                        row["continuation"] = {
                            "text": f" cont {i}",
                            "toxicity": 0.9 if i % 3 == 0 else 0.1,
                        }
                    fh.write(json.dumps(row) + "\n")
                else:
                    fh.write(d + "\n")


def test_build_stream_holds_out_rtp_and_applies_weights(tmp_path):
    from toy.build_toy_model import MIX, build_stream, pack, parse_args, train_tokenizer

    _fake_data(tmp_path, n=30)
    args = parse_args(["--data", str(tmp_path), "--val-rows", "5"])
    train, val, counts = build_stream(args, random.Random(0))
    assert len(val) == 5 and all(v.startswith("rtp doc") and " cont " in v for v in val)
    assert not set(val) & set(train)  # the val slice is never trained on
    rtp_train = [d for d in train if d.startswith("rtp doc")]
    # weight 4 -> each kept row 4 times
    assert len(rtp_train) == counts["rtp"] == int(MIX["rtp"][1]) * 25
    assert counts["chitchat_ccc_dialogues"] == int(30 * MIX["chitchat_ccc_dialogues"][1])
    tok = train_tokenizer(train, vocab_size=300)
    blocks = pack(tok, train[:20], 16)
    flat = blocks.flatten().tolist()
    n_ids = sum(len(tok(d)["input_ids"]) + 1 for d in train[:20])
    # full blocks only, remainder dropped
    assert blocks.shape[1] == 16 and len(flat) == n_ids // 16 * 16
    # EOS closes each document: decoding up to the first EOS gives the first document back
    assert tok.decode(flat[: flat.index(tok.eos_token_id)]) == train[0]


def test_stage_two_keeps_the_val_rows_and_drops_most_toxic_rtp_rows(tmp_path):
    from toy.build_toy_model import CLEAN_MIX, RTP_TOXIC_KEEP, build_stream, parse_args

    _fake_data(tmp_path, n=300)
    one = build_stream(parse_args(["--data", str(tmp_path), "--val-rows", "20"]), random.Random(0))
    two = build_stream(
        parse_args(["--data", str(tmp_path), "--val-rows", "20", "--init", "m"]), random.Random(0)
    )
    # the same held-out rows in both stages: val perplexities are comparable
    assert one[1] == two[1]
    assert set(two[2]) == set(CLEAN_MIX) and "civil_comments_toxic_spans" not in two[2]
    rows = {d for d in two[0] if d.startswith("rtp doc")}
    toxic = sum(int(d.split()[2]) % 3 == 0 for d in rows)
    # a third toxic before; RTP_TOXIC_KEEP of them kept
    assert 0 < toxic < 0.5 * (len(rows) - toxic)
    assert RTP_TOXIC_KEEP < 0.5


@pytest.mark.slow
def test_build_script_trains_saves_and_resumes(tmp_path):
    """A 3-step build on fake data saves a loadable model; rerunning with a larger budget resumes."""
    data, out, ckpt = tmp_path / "data", tmp_path / "model", tmp_path / "ckpt"
    _fake_data(data, n=40)
    cmd = [
        sys.executable,
        "-m",
        "toy.build_toy_model",
        "--data",
        str(data),
        "--out",
        str(out),
        "--ckpt-dir",
        str(ckpt),
        "--val-rows",
        "8",
        "--vocab-size",
        "300",
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--n-head",
        "2",
        "--block",
        "16",
        "--batch",
        "4",
        "--warmup",
        "2",
        "--threads",
        "1",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        cmd + ["--max-steps", "3"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "final: val ppl" in r.stdout
    summary = json.loads((out / "build_summary.json").read_text())
    assert summary["step"] == 3 and summary["val_ppl"] > 1
    r = subprocess.run(
        cmd + ["--max-steps", "5"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "after 5 steps" in r.stdout


def test_missing_data_is_one_line_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "toy.build_toy_model", "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 2
    assert (
        r.stderr.startswith("build_toy_model.py: error: ")
        and "rtp_dev4k.jsonl: missing" in r.stderr
    )
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def toy():
    import common

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return common.load_policy(TOY, device="cpu", dtype="float32")


def test_toy_model_is_small_and_has_known_encoding(toy):
    model, tok = toy
    size = sum(os.path.getsize(os.path.join(TOY, f)) for f in os.listdir(TOY))
    assert size <= 25 * 2**20
    assert model.config.model_type == "gpt2" and 7000 <= model.config.vocab_size <= 9000
    ids = tok("The quick brown fox")["input_ids"]
    assert 1 < len(ids) <= 8  # an English BPE: about a token per word, never empty
    assert tok.decode(ids) == "The quick brown fox"
    assert len(tok("<|separator|>hello")["input_ids"]) == 1 + len(tok("hello")["input_ids"])


def test_toy_model_generates_and_prefers_fluent_text(toy):
    import torch

    model, tok = toy
    enc = tok(["The police said that", "You are such a"], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 2 and out.shape[1] > enc["input_ids"].shape[1]
    assert any(
        tok.decode(row[enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        for row in out
    )

    def loss(text):
        x = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return model(x, labels=x).loss.item()

    fluent = "The police said the man was arrested on Monday after a fight in the city."
    words = fluent.split()
    scrambled = " ".join(words[::-1])
    assert loss(fluent) < loss(scrambled) - 0.5  # it learned English word order, not just unigrams
