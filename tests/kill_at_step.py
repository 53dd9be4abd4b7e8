"""Test launcher: run a stage script as __main__, SIGKILLed right after it logs training step N.

    python tests/kill_at_step.py N train.py ARGS...

The kill lands after the step's log row is written and before its checkpoint, as a crash would; production code
carries no test hook for it. It wraps bookkeeping.append_jsonl, which the trainers call once per logged step.
"""

import os
import runpy
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bookkeeping

kill_at, script = int(sys.argv[1]), sys.argv[2]
append = bookkeeping.append_jsonl


def append_then_die(fh, row):
    append(fh, row)
    if isinstance(row, dict) and row.get("step") == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


bookkeeping.append_jsonl = append_then_die
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
