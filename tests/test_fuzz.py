"""Property tests: every reader of user files and every numeric flag, fed random bytes and random JSON, returns a
result or raises the project's AltError (argparse: exits 2), never another exception."""

import argparse
import contextlib
import io
import json
import os
import tempfile
import types

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import alt_loop
import bookkeeping
import common
import feedback
import train
from baselines import dpo
from bookkeeping import AltError

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

# JSON values, with the edges json.loads lets through: NaN/Infinity, ints beyond a float, lone surrogates
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(10**400), 10**400)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["A", "B", "x", "", "\ud800", "a.json"])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
# bytes built from JSON-ish pieces reach further into the parser than uniform noise
pieces = st.sampled_from(
    [b"{", b"}", b"[", b"]", b'"', b":", b",", b"\n", b" ", b"\xff", b"\xc3", b"\xef\xbb\xbf"]
    + [b'"prompt"', b'"id"', b"1", b"-0.5e9", b"NaN", b"null", b"true", b"\\ud800", b"[" * 3000]
    + [b"9" * 5000, b'{"prompt": "x"}', b'{"prompt": {"text": "x"}}']
)
raw_bytes = st.binary(max_size=200) | st.lists(pieces, max_size=20).map(b"".join)


# values a reader accepts, so that random rows get past the first checks to the later ones
PLAUSIBLE = {
    "prompt": st.sampled_from(["x", "y", "1"]),
    "generation": st.sampled_from(["", "g", "h"]),
    "feedback": st.sampled_from(["A", "B", None]),
    "prompt_id": st.integers(0, 2) | st.sampled_from(["0", "1", "a"]),
    "id": st.integers(0, 2) | st.sampled_from(["0", "a"]),
    "reward": st.none() | st.floats() | st.integers() | st.integers(-(10**400), 10**400),
    "truncated": st.booleans(),
    "iteration": st.integers(0, 2),
    "sample_idx": st.integers(0, 2),
}


def row_of(keys):
    """A dict on the keys a reader looks at, each value plausible or random JSON (or a dict of junk)."""
    return st.fixed_dictionaries(
        {}, optional={k: PLAUSIBLE[k] | PLAUSIBLE[k] | json_values for k in keys}
    ) | st.dictionaries(st.text(max_size=6), json_values, max_size=3)


def jsonl_bytes(rows):
    """Rows as JSONL, some lines replaced by raw bytes."""
    return rows.flatmap(
        lambda rs: st.lists(
            st.one_of(st.just(None), raw_bytes), min_size=len(rs), max_size=len(rs)
        ).map(
            lambda junk: b"\n".join(
                j if j is not None and k % 3 == 2 else json.dumps(r).encode()
                for k, (r, j) in enumerate(zip(rs, junk))
            )
        )
    )


def write(folder, name, data):
    path = os.path.join(folder, name)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def allowed(fn, *args, **kw):
    """fn's result, or None when it raised AltError; any other exception fails the test."""
    try:
        return fn(*args, **kw)
    except AltError as e:
        assert str(e) and "\n" not in str(e).strip(), repr(e)  # one line
        return None


@FUZZ
@given(
    data=raw_bytes | jsonl_bytes(st.lists(json_values, max_size=5)),
    required=st.sampled_from([(), ("prompt",), ("prompt", "id")]),
    allow_empty=st.booleans(),
    partial_ok=st.booleans(),
)
def test_read_jsonl(data, required, allow_empty, partial_ok):
    with tempfile.TemporaryDirectory() as d:
        rows = allowed(
            bookkeeping.read_jsonl,
            write(d, "f.jsonl", data),
            required,
            allow_empty=allow_empty,
            partial_ok=partial_ok,
        )
    if rows is not None:
        assert all(isinstance(r, dict) and all(k in r for k in required) for r in rows)


@FUZZ
@given(
    data=raw_bytes | json_values.map(lambda v: json.dumps(v).encode()),
    kind=st.sampled_from([dict, list]),
)
def test_read_json(data, kind):
    with tempfile.TemporaryDirectory() as d:
        value = allowed(bookkeeping.read_json, write(d, "f.json", data), kind)
    assert value is None or isinstance(value, kind)


@FUZZ
@given(data=raw_bytes | jsonl_bytes(st.lists(row_of(["prompt", "id"]), max_size=5)))
def test_load_prompts_from_a_file(data):
    with tempfile.TemporaryDirectory() as d:
        prompts = allowed(common.load_prompts, write(d, "p.jsonl", data))
    for p in prompts or []:
        assert isinstance(p["prompt"], str) and type(p["id"]) in (int, str)


POOL_KEYS = ["prompt", "generation", "feedback", "prompt_id", "reward", "truncated"]


@FUZZ
@given(
    pool=jsonl_bytes(st.lists(row_of(POOL_KEYS), max_size=6)),
    meta=st.none() | raw_bytes | json_values.map(lambda v: json.dumps(v).encode()),
    per_category=st.sampled_from([None, 1, 2]),
    max_samples=st.sampled_from([None, 1, 3]),
)
def test_train_reads_a_pool_and_its_meta(pool, meta, per_category, max_samples):
    with tempfile.TemporaryDirectory() as d:
        path = write(d, "pool.jsonl", pool)
        if meta is not None:
            write(d, "pool.meta.json", meta)
        m = allowed(train.read_meta, path)
        tags = (m or {}).get("tags") or []
        # tags become Quark's control tokens and train's vocabulary: strings only
        assert all(isinstance(t, str) for t in tags)
        got = allowed(train.read_pool, path, tags, per_category, max_samples=max_samples)
    for r in got[0] if got else []:
        assert isinstance(r["prompt"], str) and isinstance(r["generation"], str)


@FUZZ
@given(
    pool=jsonl_bytes(st.lists(row_of(POOL_KEYS + ["iteration", "sample_idx"]), max_size=5)),
    samples=jsonl_bytes(
        st.lists(
            row_of(["prompt_id", "prompt", "generation", "iteration", "sample_idx"]), max_size=4
        )
    ),
    meta=st.none() | json_values.map(lambda v: json.dumps(v).encode()),
)
def test_feedback_reads_a_pool_its_meta_and_samples(pool, samples, meta):
    with tempfile.TemporaryDirectory() as d:
        args = types.SimpleNamespace(
            pool=write(d, "pool.jsonl", pool),
            samples=write(d, "samples.jsonl", samples),
            method="alt-rm",
            quantiles=3,
            scorer="profanity-check",
        )
        if meta is not None:
            write(d, "pool.meta.json", meta)
        allowed(feedback.load_inputs, args, ["A", "B", "x"])


@FUZZ
@given(
    rows=st.lists(
        st.fixed_dictionaries(  # dpo reads the pool with read_jsonl(required=prompt, generation)
            {k: PLAUSIBLE[k] | json_values for k in ("prompt", "generation")},
            optional={k: PLAUSIBLE[k] | json_values for k in ("reward", "prompt_id")},
        ),
        max_size=6,
    )
)
def test_dpo_make_pairs(rows):
    got = allowed(dpo.make_pairs, rows, "pool.jsonl")
    for w, lose in got[0] if got else []:
        assert w["reward"] > lose["reward"]


@FUZZ
@given(meta=raw_bytes | json_values.map(lambda v: json.dumps({"exemplar": v}).encode()))
def test_alt_loop_reads_the_exemplar_from_a_meta(meta):
    with tempfile.TemporaryDirectory() as d:
        flags = allowed(alt_loop.exemplar_flags, write(d, "pool.meta.json", meta))
    assert flags is None or all(isinstance(f, str) for f in flags)


PARSER = argparse.ArgumentParser(prog="fuzz")
FLAGS = {
    "--a": bookkeeping.finite(),
    "--b": bookkeeping.finite(0, strict=True),
    "--c": bookkeeping.finite(0, 1),
    "--d": bookkeeping.finite(1, kind=int),
    "--e": bookkeeping.finite(0, 100, kind=int, strict=True),
}
for flag, kind in FLAGS.items():
    PARSER.add_argument(flag, type=kind)

numbers = st.text(max_size=12) | st.sampled_from(["nan", "-inf", "1e999", "1_0", " 7 ", "0x10"])


@FUZZ
@given(
    flag=st.sampled_from(list(FLAGS)),
    text=numbers | st.integers(-(10**400), 10**400).map(str) | st.floats().map(repr),
)
def test_number_flags_parse_or_exit_2(flag, text):
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            value = getattr(PARSER.parse_args([f"{flag}={text}"]), flag[2:])
    except SystemExit as e:
        assert e.code == 2
        return
    assert isinstance(value, (int, float)) and value == value  # a number, not NaN
