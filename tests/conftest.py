"""Shared fixtures: a tiny GPT-2 (2 layers, 32 dims) with its own small BPE, built locally, never from the Hub."""

import os
import sys

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

WORDS = (
    "the a cat dog sat on mat and you are so stupid idiot nice kind people went to market today "
    "i think that he she it was very good bad day night sun moon shut up hate love this is what "
    "news report said police man woman city street car house tree"
).split()


def tiny_texts(n=400):
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "." for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny GPT-2 + tokenizer folder (safetensors), loadable with from_pretrained / common.load_policy."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from toy.build_toy_model import train_tokenizer

    out = tmp_path_factory.mktemp("tiny_gpt2")
    tok = train_tokenizer(tiny_texts(), vocab_size=400)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=128,
        vocab_size=len(tok),
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    GPT2LMHeadModel(cfg).save_pretrained(out)
    return str(out)


TOXIC_BERT_LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")


@pytest.fixture(scope="session")
def tiny_classifier(tiny_model_dir, tmp_path_factory):
    """Randomly initialised 1-layer GPT-2 classifiers saved locally, keyed by label layout:
    2 (neutral, toxic: as s-nlp/roberta_toxicity_classifier), 1 (one sigmoid output: as a reward
    model), "multi" (unitary/toxic-bert's 6 sigmoid labels), "hate" (nothate, hate: as
    facebook/roberta-hate-speech-dynabench-r4-target)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    layouts = {
        2: ("neutral", "toxic"),
        1: ("LABEL_0",),
        "multi": TOXIC_BERT_LABELS,
        "hate": ("nothate", "hate"),
    }
    dirs = {}
    for seed, (key, names) in enumerate(layouts.items()):
        torch.manual_seed(seed)
        labels = dict(enumerate(names))
        cfg = GPT2Config(
            n_layer=1,
            n_embd=16,
            n_head=2,
            n_positions=32,
            vocab_size=len(tok),
            num_labels=len(names),
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
            pad_token_id=tok.eos_token_id,
            problem_type="multi_label_classification" if key == "multi" else None,
        )
        d = tmp_path_factory.mktemp(f"cls_{key}")
        GPT2ForSequenceClassification(cfg).save_pretrained(d)
        tok.save_pretrained(d)
        dirs[key] = str(d)
    return dirs


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the tiny model gains nothing from more, and killed subprocesses run with
    OMP_NUM_THREADS=1, so a resumed run then matches an uninterrupted one bit for bit."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data beside the repo; tests that need it skip cleanly in a user's fresh clone."""
    if not os.path.isdir(SHARED):
        pytest.skip("../shared/data is absent (only developers and CI have it)")
    return SHARED


def inject_nan_at_step(monkeypatch, step):
    """Make train.py's loss NaN at optimizer step `step` (1-based; grad-accum 1), as a diverging run would."""
    import train

    real, calls = train.alt_loss, []

    def alt_loss(*args, **kw):
        nll, kl, entropy = real(*args, **kw)
        calls.append(1)
        return (nll * float("nan") if len(calls) == step else nll), kl, entropy

    monkeypatch.setattr(train, "alt_loss", alt_loss)


def run_cli(stage, argv, monkeypatch, capture):
    """A stage's CLI in-process, as `python stage.py ARGV` runs it: (exit code, stdout, stderr).
    `capture` is pytest's capsys or capfd fixture."""
    import importlib

    import bookkeeping

    monkeypatch.setattr(sys, "argv", [f"{stage}.py"])
    capture.readouterr()
    try:
        bookkeeping.cli(lambda: importlib.import_module(stage).main(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capture.readouterr()
    return code, out, err
