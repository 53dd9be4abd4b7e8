"""loop_plumbing.py: alt_loop.py's plumbing; a reader may skip it.

- here(): repo paths relative to the working folder, so printed commands stay short;
- run(): print a stage's command as a user would type it, then run it unless its atomic output
  exists; SIGINT and SIGTERM go on to the stage, and alt_loop stops with one line once it exited;
- same_path(): a flag's value as config.json compares it (one local path however it is spelled);
- check_hub(): a Hub name without network fails fast once, instead of retrying in every stage.
"""

import os
import shlex
import signal
import subprocess
import sys
import time

from bookkeeping import AltError, hub_unreachable

ROOT = os.path.dirname(os.path.abspath(__file__))


def here(*parts):
    """A repo path, relative to the caller's folder, so printed commands stay short."""
    return os.path.relpath(os.path.join(ROOT, *parts))


def show(cmd):
    """cmd as a user would type it (python -m baselines.dpo outside the repo root: with PYTHONPATH)."""
    shown = " ".join("python" if c == sys.executable else shlex.quote(c) for c in cmd)
    return (
        f"PYTHONPATH={shlex.quote(here())} {shown}" if repo_module(cmd) and here() != "." else shown
    )


def repo_module(cmd):
    """Whether cmd runs one of the repo's modules (python -m baselines.dpo)."""
    modules = (b for a, b in zip(cmd, cmd[1:]) if a == "-m")
    return any(os.path.isfile(os.path.join(ROOT, *m.split(".")) + ".py") for m in modules)


def run(cmd, done_path, dry=False):
    """Print the command a user would type, then run it, unless its atomic output already exists."""
    shown = show(cmd)
    if dry:
        return print(shown, flush=True)
    if os.path.exists(done_path):
        return print(f"[alt_loop] skip (done): {shown}", flush=True)
    print(f"\n[alt_loop] $ {shown}", flush=True)
    t0 = time.time()
    if run_stage(cmd) != 0:
        raise AltError(f"stage failed: {shown}")
    if not os.path.exists(done_path):
        raise AltError(f"stage exited 0 but wrote no {done_path}: {shown}")
    print(f"[alt_loop] ({time.time() - t0:.0f} s)", flush=True)


def run_stage(cmd):
    """Run cmd and return its exit code. SIGINT/SIGTERM to alt_loop go on to the stage, which is waited for (else
    it would run on, orphaned); then alt_loop stops with one line. A terminal's Ctrl-C reaches the stage too: the
    forwarded copy merges with it, or counts as a second Ctrl-C."""
    got, proc, old = [], None, {}

    def forward(signum, frame):
        got.append(signum)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        # nohup and background jobs ignore SIGINT: so does alt_loop then
        if signal.getsignal(sig) != signal.SIG_IGN:
            old[sig] = signal.signal(sig, forward)
    try:
        proc = subprocess.Popen(cmd, env=child_env())
        if got:  # a signal before Popen returned
            proc.send_signal(got[0])
        code = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if got:
        raise AltError(
            f"stopped by {signal.Signals(got[0]).name}; the stage exited {code}. Run the same "
            "command to resume"
        )
    return code


def child_env():
    """The stages' environment: the caller's, with the repo root first on PYTHONPATH, so that a repo module
    (python -m baselines.dpo) imports from any working folder."""
    path = [ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


PATHS = ("model", "train_prompts", "eval_prompts", "prompts_dir", "out", "fluency_model")
SCORERS = ("scorer", "eval_scorer", "extra_scorer")  # hf:MODEL[:LABEL] holds a path


def same_path(key, value):
    """A flag's value as compared in config.json: ./w/run, w/run and /abs/w/run are one local path; a name that is
    no local file (a Hub model, profanity-check) is only normalised, so it means the same from any folder."""
    if not isinstance(value, str) or key not in PATHS + SCORERS:
        return value
    if key in SCORERS:
        if not value.startswith("hf:"):
            return value
        name, sep, label = value[3:].partition(":")
        return "hf:" + same_path("model", name) + sep + label
    return os.path.realpath(value) if os.path.exists(value) else os.path.normpath(value)


def check_hub(args):
    """A Hub name without network costs ~25 s of retries per file in every stage; check once."""
    scorers = (args.scorer, args.eval_scorer, args.extra_scorer)
    judges = [s[3:].split(":")[0] for s in scorers if s and s[:3] == "hf:"]
    if hub_unreachable([args.model, args.fluency_model, *judges]):
        os.environ["HF_HUB_OFFLINE"] = "1"  # the stages inherit it: cached files, no retries
        print("[alt_loop] the Hub is unreachable: every stage runs with HF_HUB_OFFLINE=1")
