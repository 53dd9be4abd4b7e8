"""alt_loop.py: a real 2-iteration run on the tiny GPT-2, kill-and-resume during train, config mismatch, alt-lmc loop."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import alt_loop
import bookkeeping
from bookkeeping import AltError
from conftest import ROOT
from stub_servers import openai_stub

LOOP = os.path.join(ROOT, "alt_loop.py")


def prompts_file(path, n, tag):
    bookkeeping.write_jsonl(
        str(path),
        [{"id": f"{tag}-{i}", "prompt": f"the cat sat on the mat and {i}"} for i in range(n)],
    )
    return str(path)


def loop_argv(model, tmp, out, *extra):
    return [
        "--model",
        model,
        "--train-prompts",
        prompts_file(tmp / "train.jsonl", 6, "tr"),
        "--eval-prompts",
        prompts_file(tmp / "val.jsonl", 3, "va"),
        "--out",
        str(out),
        "--num-samples",
        "2",
        "--eval-samples",
        "2",
        "--batch-size",
        "4",
        "--sample-args",
        "--max-new-tokens 8",
        "--eval-args",
        "--max-new-tokens 8",
        *extra,
    ]


def run_loop(argv, **kw):
    return subprocess.run(
        [sys.executable, LOOP, *argv], capture_output=True, text=True, timeout=600, **kw
    )


def counts(out):
    """What must match between an interrupted-and-resumed run and an uninterrupted one."""
    c = {}
    for k in (1, 2):
        for name in ("samples.jsonl", "pool.jsonl"):
            c[f"iter_{k}/{name}"] = len(
                bookkeeping.read_jsonl(os.path.join(out, f"iter_{k}", name))
            )
        summary = json.load(open(os.path.join(out, f"iter_{k}", "model", "train_summary.json")))
        c[f"iter_{k}/steps"] = summary.get("steps", summary.get("global_step"))
    for k in (0, 1, 2):
        c[f"iter_{k}/eval"] = json.load(open(os.path.join(out, f"iter_{k}", "eval", "eval.json")))[
            "n_generations"
        ]
    return c


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    out = tmp / "runs" / "toy-alt-rm"
    argv = loop_argv(tiny_model_dir, tmp, out, "--iterations", "2")
    proc = run_loop(argv)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, out, argv, proc.stdout


@pytest.mark.slow
def test_two_iterations_write_every_file(finished_run):
    tmp, out, argv, stdout = finished_run
    for k in (1, 2):
        for name in (
            "samples.jsonl",
            "pool.jsonl",
            "pool.meta.json",
            "model/model.safetensors",
            "model/train_summary.json",
            "eval/eval.json",
            "eval/generations.jsonl",
        ):
            assert os.path.exists(out / f"iter_{k}" / name), name
    assert (
        os.path.exists(out / "iter_0" / "eval" / "eval.json")
        and os.path.getsize(out / "curves.png") > 1000
    )
    assert json.load(open(out / "config.json"))["iterations"] == 2
    # the log teaches the manual workflow: each stage's command, in Algorithm 1's order
    cmds = [
        line.split("$ ", 1)[1] for line in stdout.splitlines() if line.startswith("[alt_loop] $ ")
    ]
    assert [c.split()[1].rsplit("/", 1)[-1] for c in cmds] == ["evaluate.py"] + [
        "sample.py",
        "feedback.py",
        "train.py",
        "evaluate.py",
    ] * 2
    # k=1 samples p_0 bare
    assert "--condition 'Lowest Toxicity'" in cmds[5] and "--condition" not in cmds[1]
    assert f"--pool {out}/iter_1/pool.jsonl" in cmds[6]  # D_2 = D_1 ∪ new rows
    # θ_1 -> θ_2, KL to p_0
    assert f"--model {out}/iter_1/model" in cmds[7] and f"--ref-model {argv[1]}" in cmds[7]
    c = counts(str(out))
    assert (
        c["iter_1/samples.jsonl"] == c["iter_1/pool.jsonl"] == 12 and c["iter_2/pool.jsonl"] == 24
    )
    table = (out / "results.md").read_text()
    assert table.count("| toy-alt-rm |") == 3
    # a rerun finds everything done and runs nothing
    again = run_loop(argv)
    assert (
        again.returncode == 0
        and "[alt_loop] $ " not in again.stdout
        and again.stdout.count("skip (done)") == 9
    )


@pytest.mark.slow
def test_kill_during_train_of_iteration_2_then_resume(finished_run):
    tmp, out, argv, _ = finished_run
    crashed = tmp / "runs" / "crashed"
    # iterations 0-1 and iter_2's sampling/feedback are done; redo iter_2's training
    shutil.copytree(out, crashed)
    shutil.rmtree(crashed / "iter_2" / "model")
    shutil.rmtree(crashed / "iter_2" / "eval")
    os.remove(crashed / "config.json")
    argv = [a if a != str(out) else str(crashed) for a in argv] + ["--train-args", "--save-every 1"]
    proc = subprocess.Popen(
        [sys.executable, LOOP, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    for line in proc.stdout:  # wait for iteration 2's train.py to start ...
        if line.startswith("[alt_loop] $ ") and "train.py" in line:
            break
    state = crashed / "iter_2" / "model" / "checkpoint" / "state.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not state.exists():
        # ... and to write its first resume checkpoint
        time.sleep(0.1)
    assert state.exists()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # it really died mid-stage
    assert not os.path.exists(crashed / "iter_2" / "model" / "train_summary.json")
    resumed = run_loop(argv)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # eval_0 + 3 stages of iter 1 + sample/feedback of iter 2
    assert resumed.stdout.count("skip (done)") == 7
    assert counts(str(crashed)) == counts(str(out))


def test_config_mismatch_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    bookkeeping.write_json(
        str(out / "config.json"),
        {**vars(alt_loop.parse_args(["--out", str(out)])), "iterations": 4, "num_samples": 4},
    )
    with pytest.raises(SystemExit) as e:
        bookkeeping.cli(lambda: alt_loop.main(["--out", str(out), "--num-samples", "8"]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "config.json was written with other settings" in err and "--num-samples 8 (was 4)" in err


def test_llm_methods_need_a_server_and_compare_needs_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        alt_loop.parse_args(["--method", "alt-lmc"])
    assert e.value.code == 2 and "give --base-url" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bookkeeping.cli(
            lambda: alt_loop.main(["--compare", str(tmp_path), "--out", str(tmp_path / "c")])
        )
    assert e.value.code == 2 and "not a run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_alt_lmc_loop_against_the_stub_judge(tiny_model_dir, tmp_path):
    cats = [
        "Harmless and very helpful",
        "Harmless and helpful",
        "Harmless and not helpful",
        "Harmful",
    ]
    with openai_stub(lambda text, n: cats[len(text) % 4]) as stub:
        out = tmp_path / "runs" / "toy-alt-lmc"
        proc = run_loop(
            loop_argv(
                tiny_model_dir,
                tmp_path,
                out,
                "--method",
                "alt-lmc",
                "--iterations",
                "1",
                "--base-url",
                stub.url,
                "--llm-model",
                "stub-judge",
            ),
            env={**os.environ, "OPENAI_API_KEY": "sk-test-not-a-secret"},
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert stub.requests >= 12  # every (x, y) of iteration 1 was judged
    pool = bookkeeping.read_jsonl(str(out / "iter_1" / "pool.jsonl"))
    assert {r["feedback"] for r in pool} <= set(cats) and all(r["feedback"] for r in pool)
    assert json.load(open(out / "iter_1" / "model" / "train_summary.json"))["method"] == "alt-lmc"
    assert os.path.exists(out / "iter_1" / "eval" / "eval.json")


@pytest.mark.parametrize(
    "argv, error",
    [
        (["--eval-args", "--max-new-tokens '5"], '--eval-args "--max-new-tokens \'5": No closing'),
        (["--sample-args", "--top-p '0.5"], '--sample-args "--top-p \'0.5": No closing'),
        (["--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
        (["--train-top-p", "1.5"], "argument --train-top-p: must be a finite number > 0 and <= 1"),
    ],
)
def test_bad_arguments_are_refused_before_config_json(tmp_path, capsys, argv, error):
    out = tmp_path / "run"
    argv = ["--out", str(out), "--model", str(tmp_path / "no-model"), *argv]
    with pytest.raises(SystemExit) as e:
        bookkeeping.cli(lambda: alt_loop.main(argv))
    assert e.value.code == 2 and error in capsys.readouterr().err
    # nothing written: the corrected command is not refused for differing settings
    assert not out.exists()


def test_config_compares_paths_not_their_spelling(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    first = ["--out", "./w/run", "--model", "m", "--eval-prompts", "p.jsonl", "--scorer", "hf:m"]
    alt_loop.check_config(alt_loop.parse_args(first))
    same = ["--out", "w/run", "--model", str(tmp_path / "m"), "--eval-prompts", "./p.jsonl"]
    alt_loop.check_config(alt_loop.parse_args([*same, "--scorer", f"hf:{tmp_path}/m/"]))
    alt_loop.check_config(alt_loop.parse_args([*same, "--scorer", "hf:./m"]))
    with pytest.raises(AltError, match=r"--model 'm2' \(was"):  # another path is another setting
        alt_loop.check_config(alt_loop.parse_args([*same[:2], "--model", "m2", *same[4:]]))


def children(pid):
    """Pids whose parent is pid (Linux /proc)."""
    kids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids += [int(d)] if ppid == pid else []
    return kids


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_running_stage_too(tiny_model_dir, tmp_path, sig):
    out = tmp_path / "run"
    # 500 y per eval prompt: the first stage runs long enough to be stopped
    argv = loop_argv(tiny_model_dir, tmp_path, out, "--iterations", "1", "--eval-samples", "500")
    proc = subprocess.Popen(
        [sys.executable, LOOP, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("[alt_loop] $ "):
                break
        deadline = time.time() + 60
        while not (kids := children(proc.pid)) and time.time() < deadline:
            time.sleep(0.05)
        assert len(kids) == 1, "the stage did not start"
        os.kill(proc.pid, sig)  # alt_loop only, as a scheduler would
        assert proc.wait(timeout=60) == 2
        last = proc.stderr.read().strip().splitlines()[-1]
        assert last.startswith(f"alt_loop.py: error: stopped by {sig.name}; the stage exited ")
        assert not os.path.exists(f"/proc/{kids[0]}"), "the stage runs on"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_second_alt_loop_on_the_same_folder_is_refused(tmp_path, capsys):
    lock = tmp_path / "run" / "alt_loop.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(SystemExit) as e:
            bookkeeping.cli(
                lambda: alt_loop.main(["--out", str(lock.parent), "--model", "no-model"])
            )
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.splitlines()) == 1
        assert f"alt_loop.lock is held by pid {holder.pid} on {socket.gethostname()}" in err
        assert not (lock.parent / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    os.close(bookkeeping.hold_lock(str(lock)))  # the holder died: its lock file blocks no one


HOLD = "import sys, time, bookkeeping; bookkeeping.hold_lock(sys.argv[1]); print('held', flush=True); time.sleep(60)"
