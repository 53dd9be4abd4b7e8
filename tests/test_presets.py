"""Presets (alt_loop.py --preset), the dry run, the paper's RTP splits (prepare_rtp_splits.py),
the Hub check: Table 3 in the printed commands and in config.json; TL;DR and HH end to end."""

import filecmp
import os

import pytest

import alt_loop
import bookkeeping
import common
import feedback
import prepare_rtp_splits
import scorers
from conftest import run_cli, tiny_texts
from stub_servers import openai_stub
from test_alt_loop import run_loop

TABLE_3 = {
    "lr": 1e-05,
    "beta": 0.05,
    "alpha": 0.06,
    "batch_size": 32,
    "max_new_tokens": 20,
    "train_top_p": 1.0,
    "temperature": 1.0,
    "eval_top_p": 0.9,
    "eval_samples": 25,
    "num_samples": 1,
    "train_samples": 64000,
    "epochs": 1,
    "method": "alt-rm",
}


def commands(stdout, script):
    """The printed `python SCRIPT ...` lines (SCRIPT relative to the working folder), or for a module
    `[PYTHONPATH=REPO ]python -m MODULE ...` (script "MODULE")."""
    lines = [c.split(" ", 1)[1] if c.startswith("PYTHONPATH=") else c for c in stdout.splitlines()]
    return [
        c
        for c in lines
        if c.startswith("python ")
        and (c.split()[1].rsplit("/", 1)[-1] == script or c.split()[1:3] == ["-m", script])
    ]


# ----------------------------------------------------------------------------- the RTP splits
def rtp_rows(texts):
    """Rows in RealToxicityPrompts' shape (prompt + continuation with Perspective attributes)."""
    return [
        {
            "filename": f"{i:07d}.txt",
            "begin": 0,
            "end": len(t),
            "challenging": False,
            "prompt": {"text": t, "toxicity": 0.1},
            "continuation": {"text": " x.", "toxicity": 0.2},
        }
        for i, t in enumerate(texts)
    ]


@pytest.fixture(scope="module")
def rtp_files(tmp_path_factory):
    """A 60-row RTP-shaped file and a 10-row "nontoxic_prompts-10k" file drawn from it; one test
    prompt appears twice in RTP, so 11 RTP rows are test prompts."""
    tmp = tmp_path_factory.mktemp("rtp")
    texts = list(dict.fromkeys(tiny_texts(80)))[:60]
    texts[59] = texts[3]  # RTP holds some texts twice
    bookkeeping.write_jsonl(str(tmp / "rtp.jsonl"), rtp_rows(texts))
    bookkeeping.write_jsonl(str(tmp / "nontoxic.jsonl"), rtp_rows(texts[:10]))
    return tmp, texts


def make_split(rtp_files, out, *extra, monkeypatch, capsys):
    tmp, _ = rtp_files
    argv = [
        "--rtp",
        str(tmp / "rtp.jsonl"),
        "--test",
        str(tmp / "nontoxic.jsonl"),
        "--out",
        str(out),
    ]
    code, stdout, err = run_cli("prepare_rtp_splits", argv + list(extra), monkeypatch, capsys)
    assert code == 0, err
    return {
        n: bookkeeping.read_jsonl(str(out / f"{n}.jsonl")) for n in ("train", "val", "test")
    }, stdout


def test_rtp_splits_are_deterministic_disjoint_and_sized(rtp_files, tmp_path, monkeypatch, capsys):
    _, texts = rtp_files
    a, stdout = make_split(
        rtp_files, tmp_path / "a", "--val-size", "7", monkeypatch=monkeypatch, capsys=capsys
    )
    make_split(rtp_files, tmp_path / "b", "--val-size", "7", monkeypatch=monkeypatch, capsys=capsys)
    for name in ("train", "val", "test"):  # the same command twice gives the same bytes
        assert filecmp.cmp(
            tmp_path / "a" / f"{name}.jsonl", tmp_path / "b" / f"{name}.jsonl", shallow=False
        )
    # sizes as documented: test = the 10k file, val = --val-size, train = the rest of RTP
    assert [len(a[n]) for n in ("test", "val", "train")] == [10, 7, 60 - 11 - 7]
    assert "42 + 7 + 10 prompts (11 RTP rows are test prompts" in stdout
    test = {r["prompt"] for r in a["test"]}
    assert not test & {r["prompt"] for r in a["train"] + a["val"]}  # no test prompt leaks
    # every other RTP row, once
    assert sorted(r["id"] for r in a["train"] + a["val"]) == sorted(
        f"rtp-{i}" for i, t in enumerate(texts) if t not in test
    )
    assert all(set(r) == {"id", "prompt"} for rows in a.values() for r in rows)
    assert common.load_prompts(str(tmp_path / "a" / "val.jsonl"))[0]["id"].startswith("rtp-")
    c, _ = make_split(
        rtp_files,
        tmp_path / "c",
        "--val-size",
        "7",
        "--seed",
        "1",
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert c["val"] != a["val"] and c["test"] == a["test"]  # the seed draws val; test is fixed
    with pytest.raises(AssertionError, match="49 prompts outside the test set"):  # 60 - 11 = 49
        make_split(
            rtp_files, tmp_path / "d", "--val-size", "49", monkeypatch=monkeypatch, capsys=capsys
        )


# ----------------------------------------------------------------------------- presets, dry run
def test_help_lists_the_presets_and_each_one_parses():
    text = alt_loop.build_parser().format_help()
    for name in ("toy", "toy-long", "paper-toxicity", "tldr-alt-rm", "hh-alt-lmc"):
        assert f"  {name} " in text
        values = {
            k: v
            for k, v in bookkeeping.read_json(f"{alt_loop.PRESETS}/{name}.json").items()
            if not k.startswith("_")
        }
        # flags the user must give
        required = [
            x for k, v in values.items() if v is None for x in (f"--{k.replace('_', '-')}", "X")
        ]
        args = alt_loop.parse_args(["--preset", name, *required])
        assert {k: getattr(args, k) for k in values if values[k] is not None} == {
            k: v for k, v in values.items() if v is not None
        }
    assert alt_loop.parse_args(["--preset", "toy"]).out == os.path.join("runs", "toy-alt-rm")
    assert alt_loop.parse_args(["--preset", "toy-long"]).out == os.path.join(
        "runs", "toy-long-alt-rm"
    )


def test_command_line_wins_and_null_is_required(tmp_path, monkeypatch, capsys):
    args = alt_loop.parse_args(
        [
            "--preset",
            "paper-toxicity",
            "--lr",
            "3e-5",
            "--prompts-dir",
            "D",
            "--eval-prompts",
            "mine.jsonl",
        ]
    )
    assert (args.lr, args.beta, args.model, args.fluency_model) == (
        3e-5,
        0.05,
        "gpt2-large",
        "gpt2-xl",
    )
    assert args.train_prompts == os.path.join("D", "train.jsonl")  # --prompts-dir ...
    assert args.eval_prompts == "mine.jsonl"  # ... unless the file is given
    assert args.out == os.path.join("runs", "paper-toxicity-alt-rm")
    with pytest.raises(SystemExit) as e:
        alt_loop.parse_args(["--preset", "tldr-alt-rm"])
    assert e.value.code == 2 and "leaves --prompts-dir, --scorer to you" in capsys.readouterr().err
    bookkeeping.write_json(str(tmp_path / "bad.json"), {"_about": "x", "learning_rate": 1})
    monkeypatch.setattr(alt_loop, "PRESETS", str(tmp_path))
    with pytest.raises(SystemExit):
        alt_loop.parse_args(["--preset", "bad"])
    assert "unknown key 'learning_rate'" in capsys.readouterr().err


def test_paper_dry_run_prints_table_3_and_writes_nothing(tmp_path):
    proc = run_loop(["--preset", "paper-toxicity", "--dry-run"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(tmp_path) == []  # nothing written, nothing run
    lines = [c for c in proc.stdout.splitlines() if not c.startswith("#")]
    assert len(lines) == 1 + 16 * 4  # p_0's evaluation, then 16 x (sample, feedback, train, eval)
    sample, fb, train, ev = (
        commands(proc.stdout, s) for s in ("sample.py", "feedback.py", "train.py", "evaluate.py")
    )
    assert len(sample) == len(fb) == len(train) == 16 and len(ev) == 17
    assert "--model gpt2-large " in ev[0] and "--model gpt2-large " in sample[0]
    for c in train:
        for flag in (
            "--lr 1e-05",
            "--beta 0.05",
            "--alpha 0.06",
            "--batch-size 32",
            "--warmup-ratio 0.05",
            "--max-samples 64000",
            "--epochs 1",
        ):
            assert flag in c, (flag, c)
    for c in sample:
        assert "--top-p 1.0 " in c and "--max-new-tokens 20 " in c and "--num-samples 1 " in c
    for c in ev:
        for flag in (
            "--num-samples 25",
            "--top-p 0.9",
            "--max-new-tokens 20",
            "--fluency-model gpt2-xl",
            "--prompts data/rtp/val.jsonl",
        ):
            assert flag in c, (flag, c)
    assert all("--quantiles 5 --scope global --tags toxicity" in c for c in fb)
    assert "exemplar in runs/paper-toxicity-alt-rm/iter_1/pool.meta.json" in sample[1]
    assert "--prompts data/rtp/test.jsonl" in proc.stdout.splitlines()[-1]


def test_tldr_and_hh_dry_runs_carry_the_papers_settings(tmp_path):
    proc = run_loop(
        ["--preset", "tldr-alt-rm", "--dry-run", "--prompts-dir", "P", "--scorer", "hf:my/rm"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    s, f, t = (commands(proc.stdout, n)[0] for n in ("sample.py", "feedback.py", "train.py"))
    assert (
        "--num-samples 96 --max-new-tokens 64 --min-new-tokens 3 --top-p 0.9 --temperature 0.9" in s
    )
    assert (
        "--scorer hf:my/rm --quantiles 5 --scope prompt --tags summarization --scorer-is-reward"
    ) in f
    assert "--beta 0.0" in t and "--per-category 2 --drop-truncated" in t
    assert "--max-samples" not in t and "--lr 2e-05" in t and "--batch-size 8" in t
    proc = run_loop(
        [
            "--preset",
            "hh-alt-lmc",
            "--dry-run",
            "--prompts-dir",
            "P",
            "--base-url",
            "http://judge/v1",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    s, f, t = (commands(proc.stdout, n)[0] for n in ("sample.py", "feedback.py", "train.py"))
    assert (
        "--num-samples 20 --max-new-tokens 256 --min-new-tokens 3 --top-p 0.9 --temperature 1.0"
        in s
    )
    assert "--method alt-lmc" in f and "--llm-model gpt-3.5-turbo-0125" in f
    assert "--beta 0.0" in t and "--per-category 2 --drop-truncated" in t and "--lr 2e-05" in t


def test_old_run_folders_resume_and_hub_names_fail_fast(tmp_path, tiny_model_dir, monkeypatch):
    args = alt_loop.parse_args(["--out", str(tmp_path / "old")])
    old = {k: v for k, v in vars(args).items() if k not in ("scorer", "beta", "preset", "dry_run")}
    bookkeeping.write_json(str(tmp_path / "old" / "config.json"), old)  # from before those flags
    alt_loop.check_config(args)  # no mismatch: a missing key counts as its default
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no network
    alt_loop.check_hub(alt_loop.parse_args(["--model", tiny_model_dir]))  # local: not even a probe
    with pytest.raises(bookkeeping.AltError, match="127.0.0.1:9 is unreachable. Download it"):
        alt_loop.check_hub(alt_loop.parse_args(["--model", "nobody/not-cached-model"]))


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def split_dir(rtp_files, tmp_path_factory):
    """prepare_rtp_splits.py's output on the tiny RTP: 46 train, 3 val, 10 test prompts."""
    tmp, out = rtp_files[0], tmp_path_factory.mktemp("split")
    prepare_rtp_splits.main(
        [
            "--rtp",
            str(tmp / "rtp.jsonl"),
            "--test",
            str(tmp / "nontoxic.jsonl"),
            "--out",
            str(out),
            "--val-size",
            "3",
        ]
    )
    return str(out)


def finished(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_paper_preset_end_to_end(tiny_model_dir, tiny_classifier, split_dir, tmp_path):
    out = tmp_path / "paper"
    finished(
        run_loop(
            [
                "--preset",
                "paper-toxicity",
                "--model",
                tiny_model_dir,
                "--prompts-dir",
                split_dir,
                "--iterations",
                "1",
                "--scorer",
                "profanity-check",
                "--fluency-model",
                tiny_model_dir,
                "--eval-args",
                f"--extra-scorer hf:{tiny_classifier[2]}:toxic",
                "--out",
                str(out),
            ]
        )
    )
    config = bookkeeping.read_json(str(out / "config.json"))
    assert {k: config[k] for k in TABLE_3} == TABLE_3 and config["preset"] == "paper-toxicity"
    assert "--warmup-ratio 0.05" in config["train_args"]
    assert "--quantiles 5" in config["feedback_args"]
    assert config["train_prompts"] == os.path.join(split_dir, "train.jsonl")
    ev = bookkeeping.read_json(str(out / "iter_1" / "eval" / "eval.json"))
    assert ev["n_generations"] == 3 * 25 and "extra" in ev  # 25 y per val prompt, 2 judges
    assert len(bookkeeping.read_jsonl(str(out / "iter_1" / "samples.jsonl"))) == 46  # 1 y per x
    summary = bookkeeping.read_json(str(out / "iter_1" / "model" / "train_summary.json"))
    assert summary["method"] == "alt-rm" and summary["counts"]["read"] == 46  # all of D_1


@pytest.mark.slow
def test_tldr_preset_end_to_end_with_a_tiny_reward_model(
    tiny_model_dir, tiny_classifier, split_dir, tmp_path
):
    out, rm = tmp_path / "tldr", f"hf:{tiny_classifier[1]}"  # one sigmoid output, higher = better
    finished(
        run_loop(
            [
                "--preset",
                "tldr-alt-rm",
                "--model",
                tiny_model_dir,
                "--prompts-dir",
                split_dir,
                "--scorer",
                rm,
                "--iterations",
                "1",
                "--num-samples",
                "15",
                "--max-new-tokens",
                "8",
                "--eval-samples",
                "2",
                "--train-args",
                "--per-category 2",
                "--out",
                str(out),
            ]
        )
    )
    pool = bookkeeping.read_jsonl(str(out / "iter_1" / "pool.jsonl"))
    scores = scorers.make_scorer(rm)([r["generation"] for r in pool])
    assert [round(r["reward"], 5) for r in pool] == [round(s, 5) for s in scores]  # r = score
    for pid in {r["prompt_id"] for r in pool}:  # per prompt, "Excellent" is the best reward
        rows = [r for r in pool if r["prompt_id"] == pid]
        assert max(rows, key=lambda r: r["reward"])["feedback"] == "Excellent"
    summary = bookkeeping.read_json(str(out / "iter_1" / "model" / "train_summary.json"))
    assert summary["counts"]["per_category"] == 46 * 5  # 3 rows per (prompt, tag): 1 over 2


@pytest.mark.slow
def test_hh_preset_end_to_end_against_the_stub_judge(tiny_model_dir, split_dir, tmp_path):
    cats, out = feedback.HH_CATEGORIES, tmp_path / "hh"
    with openai_stub(lambda text, n: cats[len(text) % 4]) as stub:
        finished(
            run_loop(
                [
                    "--preset",
                    "hh-alt-lmc",
                    "--model",
                    tiny_model_dir,
                    "--prompts-dir",
                    split_dir,
                    "--base-url",
                    stub.url,
                    "--iterations",
                    "1",
                    "--num-samples",
                    "2",
                    "--max-new-tokens",
                    "8",
                    "--eval-samples",
                    "2",
                    "--train-args",
                    "--per-category 2",
                    "--out",
                    str(out),
                ],
                env={**os.environ, "OPENAI_API_KEY": "sk-test-not-a-secret"},
            )
        )
        assert stub.requests >= 46 * 2  # every (x, y) of iteration 1 was judged
    pool = bookkeeping.read_jsonl(str(out / "iter_1" / "pool.jsonl"))
    assert {r["feedback"] for r in pool} <= set(cats) and all(r["feedback"] for r in pool)
    config = bookkeeping.read_json(str(out / "config.json"))
    assert (config["beta"], config["lr"], config["epochs"]) == (0, 2e-05, 2)


def test_toy_defaults_train_and_evaluate_on_different_judges(tmp_path):
    """The toy trains on toy/scorer and evaluates with profanity-check (plus toy/scorer beside it); --eos-target
    reaches train.py only for ALT (baselines/dpo.py has no such flag)."""
    proc = run_loop(["--dry-run"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    fb, train, ev = (
        commands(proc.stdout, n)[0] for n in ("feedback.py", "train.py", "evaluate.py")
    )
    assert "--scorer hf:" in fb and fb.split("--scorer hf:")[1].split()[0].endswith("toy/scorer")
    assert "--scorer profanity-check" in ev and "--extra-scorer hf:" in ev
    assert "--alpha 0.0" in train and "--eos-target" not in train
    sample = commands(proc.stdout, "sample.py")[0]
    # fixed-length y in sampling and evaluation; the paper's preset keeps the official 3
    assert "--max-new-tokens 20 --min-new-tokens 20" in sample and "--min-new-tokens 20" in ev
    paper = run_loop(["--dry-run", "--preset", "paper-toxicity"], cwd=tmp_path)
    assert "--min-new-tokens 3" in commands(paper.stdout, "sample.py")[0]
    on = commands(run_loop(["--dry-run", "--eos-target"], cwd=tmp_path).stdout, "train.py")[0]
    dpo = commands(
        run_loop(["--dry-run", "--eos-target", "--method", "dpo"], cwd=tmp_path).stdout,
        "baselines.dpo",
    )[0]
    assert "--eos-target" in on and "--eos-target" not in dpo
    off = commands(
        run_loop(
            ["--dry-run", "--eval-scorer", "none", "--extra-scorer", "none"], cwd=tmp_path
        ).stdout,
        "evaluate.py",
    )[0]
    assert "--extra-scorer" not in off and "--scorer hf:" in off


def test_a_stage_run_by_hand_fails_fast_on_an_unreachable_hub(tiny_model_dir, monkeypatch):
    """Not only alt_loop: load_policy, the hf: judge and the fluency LM probe the Hub once instead of
    retrying every file, and a local folder is never probed."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no network
    assert bookkeeping.hub_unreachable([tiny_model_dir]) is False  # local: not even a probe
    with pytest.raises(
        bookkeeping.AltError, match="nobody/not-cached-model: not a local folder, not in"
    ):
        common.load_policy("nobody/not-cached-model")
    with pytest.raises(
        bookkeeping.AltError, match="nobody/no-judge: not a local folder, not in the Hub"
    ):
        scorers.make_scorer("hf:nobody/no-judge")
