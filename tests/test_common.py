"""common.py: JSONL errors name file:line:key, writes are atomic, the condition template round-trips."""

import json
import os

import pytest

import bookkeeping
import common
from bookkeeping import AltError


def strip_condition(text):
    """Inverse of common.condition(): (feedback or None, prompt)."""
    feedback, sep, prompt = text.partition(common.SEPARATOR)
    return (feedback, prompt) if sep else (None, text)


def write_bytes(path, data):
    path.write_bytes(data)
    return str(path)


def test_read_jsonl_reports_file_line_and_key(tmp_path):
    good = write_bytes(tmp_path / "a.jsonl", b'{"prompt": "x"}\n\n{"prompt": "y", "id": 7}\n')
    assert [r["prompt"] for r in bookkeeping.read_jsonl(good, required=("prompt",))] == ["x", "y"]
    bad = write_bytes(tmp_path / "b.jsonl", b'{"prompt": "x"}\n{"prompt": \n')
    with pytest.raises(AltError, match=r"b\.jsonl:2: malformed JSON"):
        bookkeeping.read_jsonl(bad)
    missing = write_bytes(tmp_path / "c.jsonl", b'{"prompt": "x"}\n{"text": "y"}\n')
    with pytest.raises(AltError, match=r"c\.jsonl:2: missing key 'prompt'"):
        bookkeeping.read_jsonl(missing, required=("prompt",))
    latin = write_bytes(tmp_path / "d.jsonl", b'{"prompt": "x"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(AltError, match=r"d\.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        bookkeeping.read_jsonl(latin)
    empty = write_bytes(tmp_path / "e.jsonl", b"\n")
    with pytest.raises(AltError, match=r"e\.jsonl: file is empty"):
        bookkeeping.read_jsonl(empty)
    assert bookkeeping.read_jsonl(empty, allow_empty=True) == []
    with pytest.raises(AltError, match="cannot read"):
        bookkeeping.read_jsonl(str(tmp_path / "nope.jsonl"))


def test_partial_ok_drops_only_a_torn_last_line(tmp_path):
    torn = write_bytes(tmp_path / "log.jsonl", b'{"k": 1}\n{"k": 2}\n{"k": 3, "v"')
    assert [r["k"] for r in bookkeeping.read_jsonl(torn, partial_ok=True)] == [1, 2]
    middle = write_bytes(tmp_path / "log2.jsonl", b'{"k": 1}\n{"k": \n{"k": 3}\n')
    with pytest.raises(AltError, match=":2: malformed JSON"):
        bookkeeping.read_jsonl(middle, partial_ok=True)


def test_append_jsonl_round_trips(tmp_path):
    path = tmp_path / "cache.jsonl"
    with open(path, "a", encoding="utf-8") as fh:
        for k in range(3):
            bookkeeping.append_jsonl(fh, {"k": k, "text": "é\n"})
    assert bookkeeping.read_jsonl(str(path)) == [{"k": k, "text": "é\n"} for k in range(3)]


def test_write_jsonl_is_atomic(tmp_path):
    out = tmp_path / "sub" / "rows.jsonl"
    bookkeeping.write_jsonl(str(out), [{"a": 1}, {"a": "ü"}])
    assert bookkeeping.read_jsonl(str(out)) == [{"a": 1}, {"a": "ü"}]

    def rows():
        yield {"a": 2}
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        bookkeeping.write_jsonl(str(out), rows())
    # the old file is intact and no temp file is left behind
    assert bookkeeping.read_jsonl(str(out)) == [{"a": 1}, {"a": "ü"}]
    assert os.listdir(out.parent) == ["rows.jsonl"]
    bookkeeping.write_json(str(tmp_path / "m.json"), {"x": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"x": [1, 2]}


def test_load_prompts_accepts_both_shapes_and_ids(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "plain"}\n{"prompt": {"text": "rtp", "toxicity": 0.1}}\n{"prompt": "z", "id": "q9"}\n'
    )
    assert common.load_prompts(str(path)) == [
        {"id": 0, "prompt": "plain"},
        {"id": 1, "prompt": "rtp"},
        {"id": "q9", "prompt": "z"},
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    with pytest.raises(AltError, match="bad.jsonl: row 1"):
        common.load_prompts(str(bad))


def test_load_prompts_through_datasets_json_loader(tmp_path):
    path = tmp_path / "rtp.jsonl"
    path.write_text('{"prompt": {"text": "one"}}\n{"prompt": {"text": "two"}}\n')
    rows = common.load_prompts(str(path), split="train", field="prompt.text")
    assert rows == [{"id": 0, "prompt": "one"}, {"id": 1, "prompt": "two"}]
    with pytest.raises(AltError, match="cannot load prompts 'no/such-dataset-xyz'"):
        common.load_prompts("no/such-dataset-xyz", field="prompt")


def test_condition_round_trip_and_separator_is_one_token(tiny_model_dir):
    model, tok = common.load_policy(tiny_model_dir, device="cpu", dtype="float32")
    x, f = "The cat sat on the mat", "Lowest Toxicity"
    text = common.condition(x, f)
    assert strip_condition(text) == (f, x)
    assert common.condition(x, None) == x and strip_condition(x) == (None, x)
    sep_id = tok.convert_tokens_to_ids(common.SEPARATOR)
    ids = tok(text)["input_ids"]
    assert ids.count(sep_id) == 1
    # the tokens before the separator are exactly the feedback's, the ones after exactly the prompt's
    cut = ids.index(sep_id)
    assert tok.decode(ids[:cut]) == f and tok.decode(ids[cut + 1 :]) == x
    assert ids[cut + 1 :] == tok(x)["input_ids"]
    # Quark's quantile tokens go through the same template and are single tokens too
    model, tok = common.load_policy(
        tiny_model_dir, device="cpu", extra_tokens=[common.quantile_token(k) for k in range(5)]
    )
    q = common.quantile_token(0)
    assert tok(common.condition(x, q))["input_ids"][:2] == [tok.convert_tokens_to_ids(q), sep_id]
    assert len(common.control_token_ids(tok)) == 6


def test_load_policy_adds_separator_with_eos_embedding(tiny_model_dir):
    model, tok = common.load_policy(tiny_model_dir, device="cpu")
    assert tok.padding_side == "left" and tok.pad_token is not None
    sep_id = tok.convert_tokens_to_ids(common.SEPARATOR)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) and sep_id == len(tok) - 1
    assert (emb[sep_id] == emb[tok.eos_token_id]).all()
    assert model.config.pad_token_id == tok.pad_token_id


def test_load_policy_unknown_model_offline_is_a_clear_error(tmp_path):
    with pytest.raises(
        AltError, match="cannot load model 'no-such-org/no-such-model'.*HF_HUB_OFFLINE"
    ):
        common.load_policy("no-such-org/no-such-model")
    with pytest.raises(AltError, match="cannot load model"):
        common.load_policy(str(tmp_path / "missing"))


def test_tiny_tokenizer_has_a_real_vocabulary(tiny_model_dir):
    # transformers 5's GPT2TokenizerFast(vocab_file=...) trap yields empty encodings; we load with from_pretrained
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("the cat sat")["input_ids"]
    assert len(ids) >= 3 and tok.decode(ids) == "the cat sat"
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|endoftext|>"


def test_seed_everything_reproduces():
    import torch

    bookkeeping.seed_everything(3)
    a = torch.rand(4)
    bookkeeping.seed_everything(3)
    assert torch.equal(a, torch.rand(4))


def test_bad_ids_and_unwritable_outputs_are_clear_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "id": [1, 2]}\n')
    with pytest.raises(AltError, match="row 1: 'id' must be an int or a string, got list"):
        common.load_prompts(str(path))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AltError, match="cannot write"):
        bookkeeping.write_jsonl(str(blocker / "sub" / "out.jsonl"), [{"a": 1}])


def test_read_json_errors_name_the_file_and_line(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}')
    assert bookkeeping.read_json(str(good)) == {"a": [1, 2]}
    cases = [
        ("missing.json", None, r"missing\.json: cannot read \(No such file"),
        (
            "bad.json",
            b'{\n  "a": 1,\n  "b": \n}',
            r"bad\.json:4: malformed JSON \(Expecting value",
        ),
        ("latin1.json", b'{"a": "caf\xe9"}', r"latin1\.json: not valid UTF-8 \(byte 0xe9\)"),
        ("list.json", b"[1, 2]", r"list\.json: expected a JSON object, got list"),
    ]
    for name, content, msg in cases:
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(AltError, match=msg):
            bookkeeping.read_json(str(tmp_path / name))
    assert bookkeeping.read_json(str(tmp_path / "list.json"), kind=list) == [1, 2]


def test_prompt_key_never_mixes_an_id_with_a_text():
    """A row whose prompt is "1" (no id) and a row with prompt_id 1 are two prompts, not one group."""
    seen = {}
    by_text = bookkeeping.prompt_key("p.jsonl", 1, {"prompt": "1", "prompt_id": None}, seen)
    by_id = bookkeeping.prompt_key("p.jsonl", 2, {"prompt": "other", "prompt_id": 1}, seen)
    assert by_text != by_id
    again = bookkeeping.prompt_key("p.jsonl", 3, {"prompt": "other", "prompt_id": "1"}, seen)
    assert again == by_id  # an id is the same x whether written 1 or "1"


def test_a_prompts_folder_must_be_a_saved_dataset(tmp_path, monkeypatch):
    """A plain folder is an error (datasets would build a cache of it under ~/.cache); a save_to_disk folder loads
    where it lies, with no cache written."""
    import datasets

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "p.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(AltError, match=r"plain: a folder, neither a prompt file nor a saved HF"):
        common.load_prompts(str(plain))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"prompt": "a", "id": 7}, {"prompt": "b", "id": 8}]).save_to_disk(
        str(saved)
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("cached a copy"))
    want = [{"id": 7, "prompt": "a"}, {"id": 8, "prompt": "b"}]
    assert common.load_prompts(str(saved)) == want
    splits = tmp_path / "splits"
    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"prompt": "c"}])}).save_to_disk(
        str(splits)
    )
    assert common.load_prompts(str(splits), split="test") == [{"id": 0, "prompt": "c"}]
