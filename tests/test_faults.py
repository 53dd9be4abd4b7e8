"""Reliability suite (issue 9): every stage survives a SIGKILL and resumes to an uninterrupted run's output; the 12
kinds of bad input each give one clear line and exit code 2 (or a documented, counted skip); API faults through the
loopback stubs end with retried items scored and permanently failed ones null, counted in the meta."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import bookkeeping
import evaluate
import feedback
import scorers
from bookkeeping import AltError
from conftest import ROOT, inject_nan_at_step, run_cli, tiny_texts
from stub_servers import judge_target, openai_stub, perspective_stub

pytestmark = pytest.mark.usefixtures("one_thread")


def write(path, text):
    with open(path, "wb") as fh:
        fh.write(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(path)


def jsonl(path, rows):
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def pool_rows(n, tags=("A", "B", "C"), **override):
    """Datapool rows with feedback: y continues x."""
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
                "iteration": 1,
                "generation": " " + " ".join(words[3:]),
                "condition": None,
                "truncated": False,
                "num_tokens": len(words) - 3,
                "reward": 0.5,
                "feedback": tags[i % len(tags)],
                **override,
            }
        )
    return rows


def asked_y(body):
    """The y a judge request (prompts/lmc_hh.txt) is about."""
    return (
        judge_target(body["messages"][0]["content"])
        .split("### Reply\n", 1)[1]
        .rsplit("\n### Feedback", 1)[0]
    )


def sample_file_rows(gens):
    return [
        {
            "prompt_id": i,
            "sample_idx": 0,
            "iteration": 1,
            "prompt": f"Human: question {i}?\n\nAssistant:",
            "generation": g,
        }
        for i, g in enumerate(gens)
    ]


# ============================================================================= the 12 bad inputs
def bad_input_cases(tmp, model):
    """(kind, stage, argv, env, the exact stderr line; '...' ends a prefix) for each of the 12 kinds of bad input."""
    ok_samples = jsonl(
        tmp / "ok.jsonl", sample_file_rows(["have a nice day", "you idiot", "the cat", "hi", "ok"])
    )
    pool = jsonl(tmp / "pool.jsonl", pool_rows(6))
    bookkeeping.write_json(
        str(tmp / "pool.meta.json"),
        {"method": "alt-rm", "quantiles": 5, "scorer": "profanity-check", "tags": ["A", "B", "C"]},
    )
    purple = pool_rows(6)
    purple[2]["feedback"] = "Purple"
    purple = jsonl(tmp / "purple.jsonl", purple)
    bookkeeping.write_json(
        str(tmp / "purple.meta.json"), {"method": "alt-rm", "tags": ["A", "B", "C"]}
    )
    torn = write(
        tmp / "torn.jsonl",
        json.dumps(sample_file_rows(["a"])[0]) + '\n{"prompt_id": 1, "prompt": \n',
    )
    nokey = jsonl(tmp / "nokey.jsonl", [pool_rows(2)[0], {"prompt": "x", "feedback": "A"}])
    latin = write(
        tmp / "latin.jsonl",
        b'{"prompt_id": 0, "prompt": "a", "generation": "b"}\n'
        b'{"prompt_id": 1, "prompt": "caf\xe9", "generation": "b"}\n',
    )
    empty = write(tmp / "empty.jsonl", "")
    prompts = jsonl(tmp / "prompts.jsonl", [{"prompt": "the cat"}])
    out = str(tmp / "out")
    fb = ["--method", "alt-rm", "--out", out + ".jsonl"]
    tr = ["--model", model, "--out", out, "--batch-size", "4"]
    return [
        (
            "1 malformed JSON line",
            "feedback",
            [*fb, "--samples", torn],
            {},
            f"feedback.py: error: {torn}:2: malformed JSON (Expecting value at column 28)",
        ),
        (
            "2 missing required key",
            "train",
            ["--data", nokey, *tr],
            {},
            f"train.py: error: {nokey}:2: missing key 'generation'",
        ),
        (
            "3 non-UTF-8 bytes",
            "evaluate",
            ["--generations", latin, "--out", out, "--fluency-model", "none"],
            {},
            f"evaluate.py: error: {latin}:2: not valid UTF-8 (byte 0xe9 at column 32)",
        ),
        (
            "4 empty file",
            "feedback",
            [*fb, "--samples", empty],
            {},
            f"feedback.py: error: {empty}: file is empty",
        ),
        (
            "8 unknown feedback label in a pool",
            "train",
            ["--data", purple, *tr],
            {},
            f"train.py: error: {purple}:3: feedback 'Purple' is not one of the 3 tags in {tmp / 'purple.meta.json'} "
            "(a pool from another method or K?)",
        ),
        (
            "9 pool from another K",
            "feedback",
            [*fb, "--samples", ok_samples, "--pool", pool, "--quantiles", "3", "--tags", "a,b,c"],
            {},
            f"feedback.py: error: --pool {pool} was made with quantiles 5, this run uses 3 ({tmp / 'pool.meta.json'})",
        ),
        (
            "9 pool from another method",
            "feedback",
            ["--method", "quark", "--out", out + ".jsonl", "--samples", ok_samples, "--pool", pool],
            {},
            f"feedback.py: error: --pool {pool} was made with method 'alt-rm', this run uses 'quark' "
            f"({tmp / 'pool.meta.json'})",
        ),
        (
            "9 pool from another method (train)",
            "train",
            ["--data", pool, *tr, "--expect-method", "quark"],
            {},
            f"train.py: error: {tmp / 'pool.meta.json'}: pool method 'alt-rm', expected 'quark'",
        ),
        (
            "10 NaN loss (injected)",
            "train",
            ["--data", jsonl(tmp / "p24.jsonl", pool_rows(24)), *tr, "--save-every", "2"],
            {"nan_at_step": 3},
            f"train.py: error: non-finite loss (nan) at step 3; stopped before the update; last good checkpoint kept: "
            f"{out}/checkpoint",
        ),
        (
            "11 unknown model path",
            "sample",
            ["--model", str(tmp / "no_such_model"), "--prompts", prompts, "--out", out + ".jsonl"],
            {},
            f"sample.py: error: cannot load model '{tmp / 'no_such_model'}': not a local model folder and not loadable "
            "from the Hub (HF_HUB_OFFLINE is set): ...",
        ),
        (
            "11 unknown Hub name offline",
            "train",
            ["--data", pool, "--model", "no-such-org/no-such-model", "--out", out],
            {},
            "train.py: error: cannot load model 'no-such-org/no-such-model': not a local model folder and not "
            "loadable from the Hub (HF_HUB_OFFLINE is set): ...",
        ),
        (
            "12 bad CLI value --shard 5/4",
            "sample",
            ["--model", model, "--prompts", prompts, "--out", out + ".jsonl", "--shard", "5/4"],
            {},
            "...error: argument --shard: expected i/n with 0 <= i < n (e.g. 0/4), got '5/4'",
        ),
        (
            "12 bad CLI value --quantiles 0",
            "feedback",
            [*fb, "--samples", ok_samples, "--quantiles", "0"],
            {},
            "feedback.py: error: bad --quantiles value (quantiles, concurrency, attempts, batch >= 1; qps > 0; "
            "out *.jsonl)",
        ),
        (
            "12 bad CLI value --top-p 1.5",
            "evaluate",
            ["--model", model, "--out", out, "--top-p", "1.5"],
            {},
            "...error: argument --top-p: must be a finite number > 0 and <= 1, got '1.5'",
        ),
        (
            "12 bad CLI value --batch-size 0",
            "train",
            ["--data", pool, *tr[:-1], "0"],
            {},
            "...error: argument --batch-size: must be an integer >= 1, got '0'",
        ),
    ]


def test_bad_inputs_give_one_clear_line_and_exit_2(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Kinds 1-4 and 8-12 (5-7 are counted skips: the next test). Each runs as the CLI does, in-process."""
    for kind, stage, argv, env, want in bad_input_cases(tmp_path, tiny_model_dir):
        with monkeypatch.context() as m:
            for k, v in env.items():
                if k == "nan_at_step":
                    inject_nan_at_step(m, v)
                else:
                    m.setenv(k, v)
            code, out, err = run_cli(stage, argv, m, capsys)
        # argparse prints its usage above the error
        line = err.strip().splitlines()[-1] if err.strip() else ""
        assert code == 2, (kind, out, err)
        assert "Traceback" not in err, kind
        if want.startswith("..."):
            assert line.endswith(want[3:]), (kind, line)
        elif want.endswith("..."):
            assert line.startswith(want[:-3]), (kind, line)
        else:
            assert line == want, kind
        assert not os.path.exists(tmp_path / "out.jsonl") and not os.path.exists(
            tmp_path / "out" / "eval.json"
        )
        assert not os.path.exists(tmp_path / "out" / "train_summary.json"), kind


def test_empty_prompt_long_prompt_and_empty_generation_are_counted_skips(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """Kinds 5-7: an empty x is skipped (sample, evaluate) and counted; an x past the context is left-truncated, kept
    whole in the row, and counted; an empty y or a null f is skipped by train.py and counted in train_summary."""
    long_x = " ".join(["the cat sat on the mat"] * 40)  # ~240 tokens, the tiny context is 128
    prompts = jsonl(
        tmp_path / "p.jsonl", [{"prompt": "the cat"}, {"prompt": ""}, {"prompt": long_x}]
    )
    out = str(tmp_path / "s.jsonl")
    code, printed, err = run_cli(
        "sample",
        [
            "--model",
            tiny_model_dir,
            "--prompts",
            prompts,
            "--out",
            out,
            "--num-samples",
            "2",
            "--max-new-tokens",
            "4",
            "--no-progress",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "skipped 1 empty prompts; left-truncated 1 over-long prompts" in printed
    assert "warning: 1 of 2 inputs exceed 124 tokens" in err
    rows = bookkeeping.read_jsonl(out)
    assert [(r["prompt_id"], r["sample_idx"]) for r in rows] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert rows[2]["prompt"] == long_x  # the row keeps the raw x; only the model input was cut

    code, _, err = run_cli(
        "evaluate",
        [
            "--model",
            tiny_model_dir,
            "--prompts",
            prompts,
            "--out",
            str(tmp_path / "ev"),
            "--num-samples",
            "2",
            "--max-new-tokens",
            "4",
            "--fluency-model",
            "none",
            "--no-progress",
        ],
        monkeypatch,
        capsys,
    )
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert code == 0 and res["n_prompts"] == 2 and res["counts"]["n_prompts_empty_skipped"] == 1
    assert res["counts"]["n_prompts_left_truncated"] == 1

    rows = pool_rows(10)
    rows[1]["generation"] = ""
    rows[2]["feedback"] = None
    rows[2]["prompt"] = rows[3]["prompt"] = long_x  # both y of prompt_id 1
    pool = jsonl(tmp_path / "pool.jsonl", rows)
    code, _, err = run_cli(
        "train",
        [
            "--data",
            pool,
            "--model",
            tiny_model_dir,
            "--out",
            str(tmp_path / "m"),
            "--batch-size",
            "4",
            "--beta",
            "0",
        ],
        monkeypatch,
        capsys,
    )
    summary = json.loads((tmp_path / "m" / "train_summary.json").read_text())
    assert code == 0, err
    c = summary["counts"]
    assert (c["read"], c["empty_generation"], c["null_feedback"], c["used"]) == (10, 1, 1, 8)
    assert c["clipped_to_context"] == 1 and summary["steps"] == 2


def test_more_bad_inputs_found_by_this_suite(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Holes this suite found (tracebacks before the fix): odd ids, a non-UTF-8 template, a summary that is not an
    object, an unreadable resume state."""
    rows = sample_file_rows(["a", "b", "c", "d", "e", "f"])
    rows[3]["prompt_id"] = None
    nullid = jsonl(tmp_path / "nullid.jsonl", rows)
    rows = sample_file_rows(["a", "b", "c", "d", "e", "f"])
    rows[4]["sample_idx"] = "x"
    stridx = jsonl(tmp_path / "stridx.jsonl", rows)
    gens = jsonl(
        tmp_path / "g.jsonl",
        [{"prompt_id": [1], "prompt": "a", "generation": "b", "toxicity": 0.1}],
    )
    template = write(tmp_path / "t.txt", b"Judge \xff {prompt} {generation}")
    model = tmp_path / "summary_list"
    model.mkdir()
    (model / "train_summary.json").write_text("[1, 2]")
    ck = tmp_path / "t" / "checkpoint"
    shutil.copytree(tiny_model_dir, ck)  # weights fine, the resume state not
    (ck / "state.pt").write_bytes(b"not a torch file")
    # a partial train.py run's folder: its stage record (written first) says so
    bookkeeping.write_json(str(tmp_path / "t" / "stage.json"), {"stage": "train.py"})
    pool = jsonl(tmp_path / "pool.jsonl", pool_rows(8))
    fb = [
        "--method",
        "alt-rm",
        "--out",
        str(tmp_path / "o.jsonl"),
        "--quantiles",
        "2",
        "--tags",
        "a,b",
    ]
    cases = [
        (
            "feedback",
            [*fb, "--samples", nullid],
            f"feedback.py: error: {nullid}:4: 'prompt_id'",
        ),
        (
            "feedback",
            [*fb, "--samples", stridx],
            f"feedback.py: error: {stridx}:5: 'sample_idx'",
        ),
        (
            "feedback",
            [
                "--method",
                "alt-lmc",
                "--samples",
                jsonl(tmp_path / "ok.jsonl", sample_file_rows(["a"])),
                "--out",
                str(tmp_path / "o.jsonl"),
                "--base-url",
                "http://127.0.0.1:9/v1",
                "--prompt-template",
                template,
            ],
            f"feedback.py: error: --prompt-template {template}: not a UTF-8 file with both {{prompt}} and "
            "{generation}",
        ),
        (
            "evaluate",
            ["--generations", gens, "--out", str(tmp_path / "ev"), "--fluency-model", "none"],
            f"evaluate.py: error: {gens}: row 1: 'prompt_id'",
        ),
        (
            "evaluate",
            ["--model", str(model), "--out", str(tmp_path / "ev"), "--fluency-model", "none"],
            f"evaluate.py: error: {model / 'train_summary.json'}: expected a JSON object, got list",
        ),
        (
            "train",
            [
                "--data",
                pool,
                "--model",
                tiny_model_dir,
                "--out",
                str(tmp_path / "t"),
                "--batch-size",
                "4",
            ],
            f"train.py: error: {ck}: unreadable resume state (UnpicklingError); rerun with --overwrite",
        ),
    ]
    for stage, argv, want in cases:
        code, _, err = run_cli(stage, argv, monkeypatch, capsys)
        assert code == 2 and err.strip().splitlines()[-1].startswith(want)


# ============================================================================= SIGKILL and resume
def start(script, argv, log, env=None):
    """`python script ARGV` with stdout+stderr to `log` (a file: a full pipe would stall the child)."""
    full = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [sys.executable, os.path.join(ROOT, script), *argv],
            cwd=ROOT,
            env=full,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


def kill_when(proc, ready, log, timeout=240):
    """SIGKILL `proc` as soon as ready() holds (its first durable progress); fail if it ends first."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(
                f"ended (rc {proc.poll()}) before it could be killed:\n{open(log).read()[-3000:]}"
            )
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def lines(path):
    try:
        with open(path, "rb") as fh:
            return fh.read().count(b"\n")
    except FileNotFoundError:
        return 0


def assert_no_half_written(folder, finished):
    """After the kill: no finished output exists, and every JSON(L) file left is whole (logs: but a torn last line)."""
    for name in finished:
        assert not os.path.exists(os.path.join(folder, name)), name
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            if f.endswith(".jsonl"):
                bookkeeping.read_jsonl(path, allow_empty=True, partial_ok=True)
            elif f.endswith(".json"):
                json.load(open(path))


@pytest.mark.slow
def test_sample_killed_then_rerun_equals_an_uninterrupted_run(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    prompts = jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in tiny_texts(40)])
    out = str(tmp_path / "run" / "s.jsonl")
    argv = [
        "--model",
        tiny_model_dir,
        "--prompts",
        prompts,
        "--out",
        out,
        "--num-samples",
        "2",
        "--max-new-tokens",
        "5",
        "--batch-size",
        "1",
        "--condition",
        "Lowest Toxicity",
        "--no-progress",
    ]
    proc = start("sample.py", argv, tmp_path / "log")
    # the config + 2 finished batches
    kill_when(proc, lambda: lines(out + ".partial") >= 3, tmp_path / "log")
    assert_no_half_written(tmp_path / "run", ["s.jsonl"])
    code, printed, _ = run_cli("sample", argv, monkeypatch, capsys)
    resumed = int(printed.split(" batches resumed")[0].rsplit(" ", 1)[1])
    assert code == 0 and 2 <= resumed < 40
    ref = str(tmp_path / "ref.jsonl")
    assert run_cli("sample", [*argv[:5], ref, *argv[6:]], monkeypatch, capsys)[0] == 0
    assert bookkeeping.read_jsonl(out) == bookkeeping.read_jsonl(ref) and not os.path.exists(
        out + ".partial"
    )


@pytest.mark.slow
def test_feedback_offline_killed_then_rerun_equals_an_uninterrupted_run(
    tmp_path, monkeypatch, capsys
):
    texts = tiny_texts(400)
    # big enough to be still scoring at the kill
    samples = jsonl(
        tmp_path / "s.jsonl",
        [
            {
                "prompt_id": i // 4,
                "sample_idx": i % 4,
                "iteration": 1,
                "prompt": "the cat",
                "generation": f"{texts[i % 400]} {i}",
            }
            for i in range(20000)
        ],
    )
    out = str(tmp_path / "run" / "pool.jsonl")
    argv = ["--method", "alt-rm", "--samples", samples, "--out", out]
    proc = start("feedback.py", argv, tmp_path / "log")
    kill_when(
        proc,
        lambda: b"scoring 20000 new rows" in open(tmp_path / "log", "rb").read(),
        tmp_path / "log",
    )
    # the meta, written last, marks a finished pool
    assert_no_half_written(tmp_path / "run", ["pool.meta.json"])
    assert run_cli("feedback", argv, monkeypatch, capsys)[0] == 0
    ref = str(tmp_path / "ref" / "pool.jsonl")
    assert run_cli("feedback", [*argv[:-1], ref], monkeypatch, capsys)[0] == 0
    assert bookkeeping.read_jsonl(out) == bookkeeping.read_jsonl(ref)
    assert (
        json.load(open(feedback.meta_path(out)))["counts"]
        == json.load(open(feedback.meta_path(ref)))["counts"]
    )


@pytest.mark.slow
def test_feedback_llm_killed_then_rerun_never_pays_twice(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cats = feedback.HH_CATEGORIES
    gens = [f"reply number {i}" for i in range(30)]
    samples = jsonl(tmp_path / "s.jsonl", sample_file_rows(gens))
    answer = lambda text, n: cats[int(judge_target(text).split("reply number ")[-1].split()[0]) % 4]  # noqa: E731
    out = str(tmp_path / "run" / "pool.jsonl")
    cache = tmp_path / "run" / "llm_cache.jsonl"
    with openai_stub(answer, latency=0.03) as stub:
        argv = [
            "--method",
            "alt-lmc",
            "--samples",
            samples,
            "--out",
            out,
            "--base-url",
            stub.url,
            "--llm-model",
            "stub-judge",
            "--concurrency",
            "1",
        ]
        proc = start("feedback.py", argv, tmp_path / "log")
        kill_when(proc, lambda: lines(cache) >= 3, tmp_path / "log")
        assert_no_half_written(tmp_path / "run", ["pool.jsonl", "pool.meta.json"])
        # the child is dead: final
        paid = {r["key"] for r in bookkeeping.read_jsonl(str(cache), partial_ok=True)}
        n0 = len(stub.log)
        assert run_cli("feedback", argv, monkeypatch, capsys)[0] == 0
        asked = [asked_y(body) for _, _, body in stub.log[n0:]]
        template = open(
            os.path.join(feedback.HERE, "prompts", "lmc_hh.txt"), encoding="utf-8"
        ).read()
        unpaid = [
            r["generation"]
            for r in sample_file_rows(gens)
            if feedback.cache_key("stub-judge", template, r["prompt"], r["generation"]) not in paid
        ]
        assert 3 <= len(paid) < 30 and len(unpaid) == 30 - len(paid)
        # each unpaid item asked once; no paid answer asked again
        assert sorted(asked) == sorted(unpaid)
        ref = str(tmp_path / "ref" / "pool.jsonl")
        assert run_cli("feedback", [*argv[:5], ref, *argv[6:]], monkeypatch, capsys)[0] == 0
    assert bookkeeping.read_jsonl(out) == bookkeeping.read_jsonl(ref)
    assert [r["feedback"] for r in bookkeeping.read_jsonl(out)] == [cats[i % 4] for i in range(30)]
    assert len(bookkeeping.read_jsonl(str(cache))) == 30


@pytest.mark.slow
def test_train_killed_then_rerun_reaches_the_same_final_step(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    pool = jsonl(tmp_path / "pool.jsonl", pool_rows(160))
    out = str(tmp_path / "run")
    argv = [
        "--data",
        pool,
        "--model",
        tiny_model_dir,
        "--out",
        out,
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--save-every",
        "4",
    ]
    proc = start("train.py", argv, tmp_path / "log")
    kill_when(
        proc,
        lambda: (
            os.path.exists(os.path.join(out, "checkpoint", "state.pt"))
            and lines(os.path.join(out, "train_log.jsonl")) >= 5
        ),
        tmp_path / "log",
    )
    assert_no_half_written(out, ["train_summary.json", "model.safetensors"])
    killed_at = len(bookkeeping.read_jsonl(os.path.join(out, "train_log.jsonl"), partial_ok=True))
    assert run_cli("train", argv, monkeypatch, capsys)[0] == 0
    ref = str(tmp_path / "ref")
    assert run_cli("train", [*argv[:5], ref, *argv[6:]], monkeypatch, capsys)[0] == 0
    a, b = (bookkeeping.read_jsonl(os.path.join(d, "train_log.jsonl")) for d in (out, ref))
    assert 5 <= killed_at < 40 and [r["step"] for r in a] == [r["step"] for r in b] == list(
        range(1, 41)
    )
    for x, y in zip(a, b):
        assert (x["lr"], x["tokens"], x["epoch"]) == (y["lr"], y["tokens"], y["epoch"])
        assert [x[k] for k in ("nll", "kl", "entropy")] == pytest.approx(
            [y[k] for k in ("nll", "kl", "entropy")], abs=1e-5
        )
    sa, sb = (json.load(open(os.path.join(d, "train_summary.json"))) for d in (out, ref))
    assert sa["steps"] == sb["steps"] == 40 and sa["final"]["step"] == 40
    assert not os.path.exists(os.path.join(out, "checkpoint"))


@pytest.mark.slow
def test_evaluate_killed_then_rerun_equals_an_uninterrupted_run(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    prompts = jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in tiny_texts(24)])
    out = str(tmp_path / "run")
    argv = [
        "--model",
        tiny_model_dir,
        "--prompts",
        prompts,
        "--out",
        out,
        "--num-samples",
        "2",
        "--max-new-tokens",
        "5",
        "--batch-size",
        "1",
        "--fluency-model",
        tiny_model_dir,
        "--no-progress",
    ]
    proc = start("evaluate.py", argv, tmp_path / "log")
    kill_when(proc, lambda: lines(os.path.join(out, "eval.partial.jsonl")) >= 3, tmp_path / "log")
    assert_no_half_written(out, ["eval.json", "generations.jsonl"])
    assert run_cli("evaluate", argv, monkeypatch, capsys)[0] == 0
    ref = str(tmp_path / "ref")
    assert run_cli("evaluate", [*argv[:5], ref, *argv[6:]], monkeypatch, capsys)[0] == 0
    assert bookkeeping.read_jsonl(os.path.join(out, "generations.jsonl")) == bookkeeping.read_jsonl(
        os.path.join(ref, "generations.jsonl")
    )
    a, b = (json.load(open(os.path.join(d, "eval.json"))) for d in (out, ref))
    assert {k: a[k] for k in evaluate.METRICS} == {k: b[k] for k in evaluate.METRICS}
    assert not os.path.exists(os.path.join(out, "eval.partial.jsonl"))


# ============================================================================= API faults (what test_feedback lacks)
def perspective_faults(times):
    """Every fault once, then a good score; DOWN always 500, BADREQ always 400. `times` records request times."""

    def behave(text, n):
        times.setdefault(text, []).append(time.monotonic())
        first = {
            "RATE": {"status": 429, "headers": {"Retry-After": "0.3"}},
            "FLAKY": {"status": 500},
            "RESET": {"reset": True},
            "SLOW": {"sleep": 1.0, "reply": 0.99},
            "GARBAGE": {"raw": b"<html>"},
            "RANGE": 1.7,
        }
        if "DOWN" in text:
            return {"status": 500}
        if "BADREQ" in text:
            return {"status": 400}
        hit = next((v for k, v in first.items() if k in text), None)
        return hit if hit is not None and n == 0 else 0.9 if "idiot" in text else 0.1

    return behave


def test_perspective_faults_end_to_end_counted_in_the_meta(tmp_path, monkeypatch, capsys):
    gens = [
        "nice",
        "you idiot",
        "RATE",
        "FLAKY",
        "RESET",
        "SLOW",
        "GARBAGE",
        "RANGE",
        "DOWN",
        "BADREQ",
    ]
    samples = jsonl(tmp_path / "s.jsonl", sample_file_rows(gens))
    out = str(tmp_path / "pool.jsonl")
    times = {}
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "test-key")
    monkeypatch.setenv("PERSPECTIVE_TIMEOUT", "0.3")
    with perspective_stub(perspective_faults(times)) as stub:
        monkeypatch.setenv("PERSPECTIVE_API_URL", stub.url)
        code, _, err = run_cli(
            "feedback",
            [
                "--method",
                "alt-rm",
                "--scorer",
                "perspective",
                "--qps",
                "200",
                "--samples",
                samples,
                "--out",
                out,
                "--quantiles",
                "2",
                "--tags",
                "good,bad",
            ],
            monkeypatch,
            capsys,
        )
        n_requests = len(stub.log)
    assert code == 0, err
    rows = bookkeeping.read_jsonl(out)
    # retried items succeed; DOWN and BADREQ stay unscored
    want = [0.9, 0.1] + [0.9] * 6 + [None, None]
    assert [r["reward"] for r in rows] == pytest.approx(want)
    assert [r["feedback"] is None for r in rows] == [w is None for w in want]
    # Retry-After honoured, though --qps allows 200/s
    assert times["RATE"][1] - times["RATE"][0] >= 0.3
    c = json.load(open(feedback.meta_path(out)))["counts"]
    assert (c["reward_null"], c["feedback_null"]) == (2, 2)
    assert (c["scorer_http_429"], c["scorer_http_500"], c["scorer_http_400"]) == (1, 1 + 4, 1)
    assert c["scorer_value_out_of_range"] == 1
    errors = {k: v for k, v in c.items() if k.startswith("scorer_")}
    # every failed request counted, by kind
    assert sum(errors.values()) == n_requests - 8 == 6 + 4 + 1
    # 429, 500, 400, out of range, and the reset, timeout and garbage exception kinds
    assert len(errors) == 7


def test_evaluate_counts_perspective_faults_and_nulls(tmp_path, monkeypatch):
    gens = jsonl(
        tmp_path / "g.jsonl",
        [
            {"prompt_id": i // 2, "prompt": "the cat", "generation": g}
            for i, g in enumerate(["nice", "FLAKY", "DOWN", "GARBAGE"])
        ],
    )
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "test-key")
    monkeypatch.setenv("PERSPECTIVE_TIMEOUT", "0.3")
    with perspective_stub(perspective_faults({})) as stub:
        monkeypatch.setenv("PERSPECTIVE_API_URL", stub.url)
        evaluate.main(
            [
                "--generations",
                gens,
                "--out",
                str(tmp_path / "ev"),
                "--scorer",
                "perspective",
                "--qps",
                "200",
                "--fluency-model",
                "none",
                "--no-progress",
            ]
        )
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    rows = bookkeeping.read_jsonl(str(tmp_path / "ev" / "generations.jsonl"))
    assert [r["toxicity"] for r in rows] == [0.1, 0.1, None, 0.1]
    assert (
        res["counts"]["n_scores_null"] == 1 and res["counts"]["scorer_errors"]["http_500"] == 1 + 4
    )
    assert res["avg_max_toxicity"] == pytest.approx(0.1) and res["n_prompts"] == 2


# ============================================================================= outputs never clobber inputs
def snapshot(path):
    """Every byte under a file or folder, to check an input is left exactly as it was."""
    if os.path.isfile(path):
        return open(path, "rb").read()
    return {
        os.path.relpath(os.path.join(root, f), path): open(os.path.join(root, f), "rb").read()
        for root, _, files in os.walk(path)
        for f in files
    }


def overlap_case(case, tmp, tiny_model_dir):
    """(stage, argv, the input that must stay unchanged, the error after 'error: ')."""
    model = str(tmp / "m")
    shutil.copytree(tiny_model_dir, model)  # a copy: the old code wrote into the model it read
    pool = jsonl(tmp / "pool.jsonl", pool_rows(8))
    bookkeeping.write_json(feedback.meta_path(pool), {"method": "alt-rm", "tags": ["A", "B", "C"]})
    samples = jsonl(tmp / "s.jsonl", sample_file_rows(["a", "b", "c", "d", "e", "f"]))
    prompts = jsonl(tmp / "p.jsonl", [{"prompt": "the cat"}, {"prompt": "a dog"}])
    fb = ["--method", "alt-rm", "--quantiles", "2", "--tags", "a,b"]
    same = "{} and {} are the same path ({}): an output may not replace an input"
    inside = "{} {} lies inside {} {}: an output may not overlap an input"
    if case == "train --out = --model":
        argv = ["--data", pool, "--model", model, "--out", model, "--batch-size", "4"]
        return "train", argv, model, same.format("--out", "--model", model)
    if case == "train --out inside --model":
        out = os.path.join(model, "ft")
        argv = ["--data", pool, "--model", model, "--out", out, "--batch-size", "4"]
        return "train", argv, model, inside.format("--out", out, "--model", model)
    if case == "train --out = --ref-model":
        out = str(tmp / "ref")
        shutil.copytree(model, out)
        argv = ["--data", pool, "--model", model, "--ref-model", out, "--out", out]
        return "train", argv, out, same.format("--out", "--ref-model", out)
    if case == "train --model inside --out --overwrite":
        out, inner = str(tmp / "run"), str(tmp / "run" / "checkpoint")
        shutil.copytree(model, inner)
        argv = ["--data", pool, "--model", inner, "--out", out, "--overwrite", "--batch-size", "4"]
        return "train", argv, inner, inside.format("--model", inner, "--out", out)
    if case == "sample --out = --prompts":
        argv = ["--model", model, "--prompts", prompts, "--out", prompts, "--max-new-tokens", "2"]
        return "sample", argv, prompts, same.format("--out", "--prompts", prompts)
    if case == "sample --out = --prompts --overwrite":
        argv = ["--model", model, "--prompts", prompts, "--out", prompts, "--overwrite"]
        return "sample", argv, prompts, same.format("--out", "--prompts", prompts)
    if case == "feedback --out = --pool":
        argv = [*fb, "--samples", samples, "--pool", pool, "--out", pool]
        return "feedback", argv, pool, same.format("--out", "--pool", pool)
    if case == "feedback --out = --samples":
        argv = [*fb, "--samples", samples, "--out", samples]
        return "feedback", argv, samples, same.format("--out", "--samples", samples)
    if case == "feedback --cache = --samples":
        argv = ["--method", "alt-lmc", "--samples", samples, "--out", str(tmp / "o.jsonl")]
        argv += ["--cache", samples, "--base-url", "http://127.0.0.1:9/v1", "--max-retries", "0"]
        return "feedback", argv, samples, same.format("--cache", "--samples", samples)
    if case == "evaluate --generations inside --out":
        (tmp / "ev").mkdir()
        gens = jsonl(tmp / "ev" / "generations.jsonl", sample_file_rows(["a", "b"]))
        argv = ["--generations", gens, "--out", str(tmp / "ev"), "--fluency-model", "none"]
        return "evaluate", argv, gens, inside.format("--generations", gens, "--out", tmp / "ev")
    if case == "dpo --out = --model":
        argv = ["--data", pool, "--model", model, "--out", model, "--batch-size", "1"]
        return "baselines.dpo", argv, model, same.format("--out", "--model", model)
    if case == "ppo --prompts inside --out --overwrite":
        (tmp / "run").mkdir()
        inner = jsonl(tmp / "run" / "ppo_prompts.jsonl", [{"prompt": "the cat"}] * 4)
        argv = ["--model", model, "--prompts", inner, "--out", str(tmp / "run"), "--overwrite"]
        return "baselines.ppo", argv, inner, inside.format("--prompts", inner, "--out", tmp / "run")
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "train --out = --model",
        "train --out inside --model",
        "train --out = --ref-model",
        "train --model inside --out --overwrite",
        "sample --out = --prompts",
        "sample --out = --prompts --overwrite",
        "feedback --out = --pool",
        "feedback --out = --samples",
        "feedback --cache = --samples",
        "evaluate --generations inside --out",
        "dpo --out = --model",
        "ppo --prompts inside --out --overwrite",
    ],
)
def test_outputs_never_clobber_inputs(case, tiny_model_dir, tmp_path, monkeypatch, capsys):
    stage, argv, watched, want = overlap_case(case, tmp_path, tiny_model_dir)
    before = snapshot(watched)
    code, out, err = run_cli(stage, argv, monkeypatch, capsys)
    assert (code, err.strip().split(": error: ", 1)[-1]) == (2, want), out
    assert len(err.strip().splitlines()) == 1 and "done" not in out
    assert snapshot(watched) == before


def test_refuse_overlap_ignores_hub_names_and_sibling_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    bookkeeping.refuse_overlap(
        {"--out": [str(tmp_path / "out"), str(tmp_path / "pool.jsonl")]},
        {
            "--model": "no-such-org/no-such-model",  # a Hub name: its parent folder does not exist
            "--ref-model": str(tmp_path / "out2"),
            "--pool": str(tmp_path / "pool.jsonl.old"),
            "--prompts": None,
            "--condition-pool": "",  # not the current folder, which holds --out
        },
    )
    os.symlink(tmp_path / "out", tmp_path / "link")
    with pytest.raises(bookkeeping.AltError, match=r"^--data .*link.* lies inside --out "):
        bookkeeping.refuse_overlap(
            {"--out": str(tmp_path / "out")}, {"--data": str(tmp_path / "link" / "d.jsonl")}
        )


# ============================================================================= file modes
def test_outputs_honour_the_umask(tmp_path):
    """Outputs get 0666 & ~umask, as open() gives, not mkstemp's 0600 (a shared run folder stays readable)."""
    shard = sample_file_rows(["a", "b"])
    for r in shard:
        r["prompt_index"] = r["prompt_id"]
    jsonl(tmp_path / "s.jsonl.shard-0-of-1", shard)
    gens = jsonl(
        tmp_path / "g.jsonl",
        [{"prompt_id": 0, "prompt": "a", "generation": " b", "toxicity": 0.1}],
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for argv in (
        ["sample.py", "--merge", str(tmp_path / "s.jsonl")],
        ["evaluate.py", "--generations", gens, "--out", str(tmp_path / "ev")]
        + ["--fluency-model", "none", "--no-progress"],
    ):
        proc = subprocess.run(
            [sys.executable, *argv], cwd=ROOT, env=env, umask=0o022, capture_output=True
        )
        assert proc.returncode == 0, proc.stderr
    for path in (
        tmp_path / "s.jsonl",
        tmp_path / "ev" / "eval.json",
        tmp_path / "ev" / "generations.jsonl",
    ):
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o644), path


# ============================================================================= honest exits
def test_evaluate_fails_when_the_scorer_scores_no_row(tmp_path, monkeypatch, capsys):
    """Every row unscored: exit 2 counting the failure kinds (as feedback.py), no eval.json; the rerun asks again."""
    gens = jsonl(
        tmp_path / "g.jsonl",
        [{"prompt_id": i, "prompt": "the cat", "generation": f"DOWN {i}"} for i in range(3)],
    )
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "test-key")
    argv = ["--generations", gens, "--out", str(tmp_path / "ev"), "--scorer", "perspective"]
    argv += ["--qps", "500", "--fluency-model", "none", "--no-progress"]
    with perspective_stub(lambda text, n: {"status": 500}) as stub:
        monkeypatch.setenv("PERSPECTIVE_API_URL", stub.url)
        for run in (1, 2):
            code, _, err = run_cli("evaluate", argv, monkeypatch, capsys)
            assert (code, err.strip().splitlines()[-1]) == (
                2,
                "evaluate.py: error: scorer perspective could not score any of the 3 rows "
                f"({3 * scorers.PERSPECTIVE_ATTEMPTS} http_500)",
            )
            assert len(stub.log) == run * 3 * scorers.PERSPECTIVE_ATTEMPTS
    assert not os.path.exists(tmp_path / "ev" / "eval.json")


# ============================================================================= message bugs
def test_malformed_json_names_the_column_once(tmp_path):
    """json's "Unterminated string starting at" used to read "... starting at at column 7"."""
    for path, read, line, text in (
        (tmp_path / "t.jsonl", bookkeeping.read_jsonl, 2, '{"a": 1}\n{"a": "torn'),
        (tmp_path / "t.json", bookkeeping.read_json, 2, '{\n "a": "torn'),
        (tmp_path / "c.jsonl", bookkeeping.read_jsonl, 1, '{"a": "x\ty"}\n'),
    ):
        with pytest.raises(bookkeeping.AltError) as e:
            read(write(path, text))
        what = (
            "Invalid control character at column 9"
            if "\t" in text
            else ("Unterminated string starting at column 7")
        )
        assert str(e.value) == f"{path}:{line}: malformed JSON ({what})"


@pytest.mark.parametrize(
    "stage, flag, value, want",
    [
        ("feedback", "--timeout", "-1", "must be a finite number > 0"),
        ("feedback", "--max-retries", "-1", "must be an integer >= 0"),
        ("feedback", "--temperature", "nan", "must be a finite number >= 0"),
        ("sample", "--temperature", "nan", "must be a finite number >= 0"),
        ("evaluate", "--qps", "inf", "must be a finite number > 0"),
        ("train", "--lr", "nan", "must be a finite number > 0"),
        ("train", "--max-grad-norm", "-1", "must be a finite number > 0"),
        ("train", "--warmup-ratio", "1.5", "must be a finite number >= 0 and <= 1"),
    ],
)
def test_bad_numbers_are_usage_errors_naming_the_flag(
    stage, flag, value, want, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """Once `--timeout -1` ran every judge request into an error blamed on --base-url, and NaN passed `< 0` checks."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    samples = jsonl(tmp_path / "s.jsonl", sample_file_rows(["a", "b"]))
    prompts = jsonl(tmp_path / "p.jsonl", [{"prompt": "the cat"}])
    pool = jsonl(tmp_path / "pool.jsonl", pool_rows(8))
    out = str(tmp_path / "out")
    argv = {
        "feedback": ["--method", "alt-lmc", "--samples", samples, "--out", out + ".jsonl"]
        + ["--base-url", "http://127.0.0.1:9/v1", "--max-attempts", "1"],
        "sample": ["--model", tiny_model_dir, "--prompts", prompts, "--out", out + ".jsonl"],
        "evaluate": ["--generations", samples, "--out", out, "--fluency-model", "none"],
        "train": ["--data", pool, "--model", tiny_model_dir, "--out", out, "--batch-size", "4"],
    }[stage]
    code, _, err = run_cli(stage, [*argv, flag, value], monkeypatch, capsys)
    assert code == 2, err
    # feedback.py's parser takes its name from sys.argv[0] at import: pytest's in-process
    assert (
        err.strip().splitlines()[-1].endswith(f".py: error: argument {flag}: {want}, got '{value}'")
    )
    assert not os.path.exists(out) and not os.path.exists(out + ".jsonl")


@pytest.mark.parametrize(
    "change, error",
    [
        ({"prompt_id": 1.5}, "pool.jsonl:2: 'prompt_id' must be an int or a string.*, got 1.5"),
        ({"prompt_id": [0]}, "pool.jsonl:2: 'prompt_id' must be an int or a string.*, got \\[0\\]"),
        (
            {"prompt": "another x"},
            "pool.jsonl:2: prompt_id 0 was given to another prompt on line 1",
        ),
    ],
)
def test_pool_prompt_ids_are_checked_by_train_and_dpo(tmp_path, change, error):
    """A float/list prompt_id, or one id reused for another x, would silently merge or split the groups that
    --per-category and DPO's pairs are built from."""
    import train
    from baselines import dpo

    rows = pool_rows(4)
    rows[1].update(change)
    pool = jsonl(tmp_path / "pool.jsonl", rows)
    with pytest.raises(bookkeeping.AltError, match=error):
        train.read_pool(pool, ("A", "B", "C"))
    with pytest.raises(bookkeeping.AltError, match=error):
        dpo.make_pairs(bookkeeping.read_jsonl(pool), pool)


# ============================================================================= "done" means done
def test_done_only_for_this_stages_output_under_the_same_settings(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """A stage says "done" only for its own finished output made with the same settings; any other file or folder at
    --out is one line suggesting --overwrite (the old code said "done" for all of them)."""
    gens = jsonl(
        tmp_path / "g.jsonl",
        [{"prompt_id": 0, "prompt": "a", "generation": " b", "toxicity": 0.1}],
    )
    ev = ["--generations", gens, "--out", str(tmp_path / "ev"), "--fluency-model", "none"]
    assert run_cli("evaluate", ev, monkeypatch, capsys)[0] == 0
    code, out, _ = run_cli("evaluate", ev, monkeypatch, capsys)
    assert code == 0 and out.startswith("done")
    code, out, err = run_cli("evaluate", [*ev, "--seed", "5"], monkeypatch, capsys)
    assert code == 2 and "done" not in out
    assert err.strip() == (
        f"evaluate.py: error: {tmp_path / 'ev'} was made with other settings (--seed 5 (was 0)): "
        "--overwrite to redo it, or another --out"
    )
    prompts = jsonl(tmp_path / "p.jsonl", [{"prompt": "the cat"}])
    pool = jsonl(tmp_path / "pool.jsonl", pool_rows(4))  # no record: not sample.py's
    smp = ["--model", tiny_model_dir, "--prompts", prompts, "--max-new-tokens", "2"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    samples = str(tmp_path / "s.jsonl")
    assert run_cli("sample", [*smp, "--out", samples], monkeypatch, capsys)[0] == 0
    no_output = "exists but is no output of"
    for stage, argv, want in (
        (
            "sample",
            [*smp, "--out", pool],
            f"{pool} {no_output} sample.py (has no {pool}.stage.json)",
        ),
        (
            "feedback",
            ["--method", "alt-rm", "--samples", gens, "--out", samples, "--quantiles", "1"],
            f"{samples} {no_output} feedback.py (was written by sample.py)",
        ),
        (
            "evaluate",
            [*ev[:3], str(foreign), *ev[4:]],
            f"{foreign} {no_output} evaluate.py (has no {foreign / 'stage.json'})",
        ),
        (
            "train",
            ["--data", pool, "--model", tiny_model_dir, "--out", prompts],
            f"{prompts} is a file; train.py writes a folder there",
        ),
    ):
        code, out, err = run_cli(stage, argv, monkeypatch, capsys)
        assert code == 2 and "done" not in out, (stage, out, err)
        assert err.strip().split(": error: ", 1)[1].startswith(want), (stage, err)
    assert (foreign / "notes.txt").read_text() == "mine" and sorted(os.listdir(foreign)) == [
        "notes.txt"
    ]


HOLD = "import sys, time, bookkeeping; bookkeeping.hold_lock(sys.argv[1]); print('held', flush=True); time.sleep(60)"


def test_a_second_process_on_the_same_output_is_refused(tmp_path, monkeypatch, capsys):
    """While another process holds OUT.lock (beside a folder or a file output), a stage on OUT stops before reading
    or writing it: exit 2, one line naming the holder's pid (the old code ran the stage alongside the holder)."""
    gens = jsonl(
        tmp_path / "g.jsonl",
        [{"prompt_id": 0, "prompt": "a", "generation": " b", "toxicity": 0.1}],
    )
    samples = jsonl(tmp_path / "s.jsonl", sample_file_rows(["a", "b", "c"]))
    ev, pool = tmp_path / "ev", tmp_path / "pool.jsonl"
    monkeypatch.setattr(feedback, "make_scorer", lambda *a, **k: pytest.fail("scored rows"))
    for stage, out, argv in (
        ("evaluate", ev, ["--generations", gens, "--out", str(ev), "--fluency-model", "none"]),
        ("feedback", pool, ["--method", "alt-rm", "--samples", samples, "--out", str(pool)]),
    ):
        lock = f"{out}.lock"
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD, lock], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout.readline() == "held\n"
            code, printed, err = run_cli(stage, argv, monkeypatch, capsys)
        finally:
            holder.kill()
            holder.wait()
        assert code == 2 and printed == "" and len(err.splitlines()) == 1, (stage, err)
        assert err == (
            f"{stage}.py: error: {lock} is held by pid {holder.pid} on {socket.gethostname()}: "
            "another run is using it\n"
        )
        assert sorted(os.listdir(tmp_path)) == sorted(
            ["g.jsonl", "s.jsonl", os.path.basename(lock)]
        ), stage
        os.remove(lock)
    # the holder is gone: its lock blocks no one, and a rerun in this process (which holds the lock) says done
    ev_argv = ["--generations", gens, "--out", str(ev), "--fluency-model", "none"]
    open(f"{ev}.lock", "w").write("pid 1 on elsewhere\n")
    assert run_cli("evaluate", ev_argv, monkeypatch, capsys)[0] == 0
    code, printed, _ = run_cli("evaluate", ev_argv, monkeypatch, capsys)
    assert code == 0 and printed.startswith("done")
    assert "eval.json" in os.listdir(ev) and not any(f.endswith(".lock") for f in os.listdir(ev))


# ============================================================================= write failures
def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def temp_files(folder):
    return [f for _, _, files in os.walk(folder) for f in files if f.endswith(".tmp")]


def test_write_failures_are_one_line_and_keep_the_last_good_output(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """A full disk, a folder at --out, a read-only file system: one line naming the path and the OS reason, exit 2,
    no temp file or checkpoint.tmp left, the previous output intact; a folder at --out fails before any work."""
    good = tmp_path / "good.jsonl"
    bookkeeping.write_jsonl(str(good), [{"a": 1}])
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", no_space)
        with pytest.raises(AltError, match=rf"^{good}: cannot write \(No space left on device\)$"):
            bookkeeping.write_jsonl(str(good), [{"a": 2}])
        with open(tmp_path / "log.jsonl", "a") as fh:
            with pytest.raises(AltError, match=r"log\.jsonl: cannot write \(No space left"):
                bookkeeping.append_jsonl(fh, {"a": 1})
    assert bookkeeping.read_jsonl(str(good)) == [{"a": 1}] and temp_files(tmp_path) == []

    # a stage: sample.py --merge --overwrite on a full disk keeps the merged file it had
    shard = sample_file_rows(["a", "b"])
    for r in shard:
        r["prompt_index"] = r["prompt_id"]
    merged = tmp_path / "m" / "s.jsonl"
    merged.parent.mkdir()
    jsonl(tmp_path / "m" / "s.jsonl.shard-0-of-1", shard)
    assert run_cli("sample", ["--merge", str(merged)], monkeypatch, capsys)[0] == 0
    before = merged.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", no_space)
        code, _, err = run_cli("sample", ["--merge", str(merged), "--overwrite"], m, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.strip().endswith("cannot write (No space left on device)") and str(merged) in err
    assert merged.read_bytes() == before and temp_files(tmp_path) == []

    # an OSError from anywhere in a stage (a read-only file system): one line, not a traceback
    def read_only():
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/out.jsonl")

    monkeypatch.setattr(sys, "argv", ["x.py"])
    with pytest.raises(SystemExit) as exit_:
        bookkeeping.cli(read_only)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "x.py: error: /ro/out.jsonl: Read-only file system\n"

    # --out a folder: feedback.py stops before scoring a single row
    samples = jsonl(tmp_path / "s.jsonl", sample_file_rows(["a", "b", "c"]))
    (tmp_path / "pool.jsonl").mkdir()
    monkeypatch.setattr(feedback, "make_scorer", lambda *a, **k: pytest.fail("scored rows"))
    argv = ["--method", "alt-rm", "--samples", samples, "--out", str(tmp_path / "pool.jsonl")]
    code, _, err = run_cli("feedback", [*argv, "--quantiles", "1"], monkeypatch, capsys)
    assert code == 2 and err.strip() == (
        f"feedback.py: error: {tmp_path / 'pool.jsonl'} is a folder; feedback.py writes a file there"
    )

    # the resume checkpoint: a full disk mid-save leaves no checkpoint.tmp and the last checkpoint as it was
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    run = tmp_path / "run"
    bookkeeping.save_checkpoint(str(run), model, tok, {"step": 1})
    kept = snapshot(run / "checkpoint")

    def half_then_full(folder, **kwargs):
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, "model.safetensors"), "wb").write(b"half")
        no_space()

    monkeypatch.setattr(model, "save_pretrained", half_then_full)
    with pytest.raises(AltError, match=r"checkpoint\.tmp: cannot write the checkpoint \(No space"):
        bookkeeping.save_checkpoint(str(run), model, tok, {"step": 2})
    assert sorted(os.listdir(run)) == ["checkpoint"] and snapshot(run / "checkpoint") == kept
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=True) == {"step": 1}


# ============================================================================= broken model files
def test_a_broken_model_file_is_named_with_its_fault(
    tiny_model_dir, tiny_classifier, tmp_path, monkeypatch, capsys
):
    """A truncated model.safetensors or a bad config.json names the file and what is wrong with it, for a policy and
    for an hf: scorer (the old line said "not a local model folder and not loadable from the Hub")."""
    cut, bad_config, classifier = tmp_path / "cut", tmp_path / "bad_config", tmp_path / "cls"
    for copy, source in ((cut, tiny_model_dir), (bad_config, tiny_model_dir)):
        shutil.copytree(source, copy)
    shutil.copytree(tiny_classifier[2], classifier)
    for folder in (cut, classifier):
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (bad_config / "config.json").write_text('{"model_type": "gpt2",')
    prompts = jsonl(tmp_path / "p.jsonl", [{"prompt": "the cat"}])
    for model, want in (
        (cut, f"{cut / 'model.safetensors'}: truncated or invalid safetensors file (Error while"),
        (bad_config, f"{bad_config / 'config.json'}:1: malformed JSON"),
    ):
        argv = ["--model", str(model), "--prompts", prompts, "--out", str(tmp_path / "o.jsonl")]
        code, _, err = run_cli("sample", argv, monkeypatch, capsys)
        assert code == 2 and err.strip().startswith(
            f"sample.py: error: cannot load model '{model}': {want}"
        ), err
    with pytest.raises(AltError, match="truncated or invalid safetensors") as e:
        scorers.make_scorer(f"hf:{classifier}")
    assert str(e.value).startswith(
        f"cannot load classifier '{classifier}': {classifier / 'model.safetensors'}: "
    )
