"""bookkeeping.py: plumbing, not the algorithm. A reader of ALT may skip this file.

What every stage needs and none should re-invent: the one-line error and its exit code (AltError, cli), argparse's
finite-number type (finite, finite_number), atomic JSON/JSONL writes and reads, the done / --overwrite preamble
(finished), the resumable journal (open_journal: sample's OUT.partial, evaluate's eval.partial.jsonl, feedback's
judge cache, the trainers' logs), the resume checkpoint with its RNG state (save/find/load/remove_checkpoint), the
context-length lookup, row checks against a declared schema (check_row), the overlap check of output and input
paths, the Hub probe, seeding, the default device and the run folder's lock (hold_lock). For sample.py and
evaluate.py: length-sorted batches with left truncation (plan_batches), resumable journaled batches (run_batches,
score_chunks), --shard / --merge, the prompt checks, --generations rows and the metrics table.
"""

import argparse
import contextlib
import functools
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time

# os.umask reads it only by setting it: once, here, as later it would race with threads making files
UMASK = os.umask(0)
os.umask(UMASK)


class AltError(Exception):
    """A user-facing error: printed as one line (no traceback) and the stage exits with code 2."""


def cli(main):
    """Run a stage's main(); turn AltError, and an OSError (a full disk, a read-only folder), into a one-line
    message naming the path and exit code 2."""
    try:
        main()
    except (AltError, OSError) as e:
        where = f"{e.filename}: " if isinstance(e, OSError) and e.filename is not None else ""
        print(f"{os.path.basename(sys.argv[0])}: error: {where}{why(e)}", file=sys.stderr)
        sys.exit(2)


def why(e):
    """An exception's reason in one line: an OSError's strerror, else its message's first line."""
    text = getattr(e, "strerror", None) or str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def finite(lo=None, hi=None, kind=float, strict=False):
    """An argparse type: a finite `kind` >= lo (> lo when strict) and <= hi; else the flag's one-line usage error."""
    bounds = [f"{'>' if strict else '>='} {lo}"] if lo is not None else []
    bounds += [f"<= {hi}"] if hi is not None else []
    what = "an integer" if kind is int else "a finite number"
    need = f"must be {what} {' and '.join(bounds)}".rstrip()

    def parse(text):
        value = kind(text)  # a ValueError is argparse's own "invalid float value: 'x'"
        low = lo is not None and (value <= lo if strict else value < lo)
        if not finite_number(value) or low or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{need}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def finite_number(value):
    """A JSON/CLI number that fits a float (a bool is none): math.isfinite overflows on a huge int."""
    try:
        return type(value) in (int, float) and math.isfinite(value)
    except OverflowError:
        return False


# ----------------------------------------------------------------------------- JSON / JSONL I/O
def malformed_json(where, e):
    # some of json's messages end in " at" ("Unterminated string starting at"): the column completes them
    return AltError(f"{where}: malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})")


def read_jsonl(path, required=(), allow_empty=False, partial_ok=False, schema=None, numbered=False):
    """Read a JSONL file; errors name file:line and the key. partial_ok drops a torn last line (append logs); schema
    checks each row's types (check_row); numbered gives (line, row) pairs."""
    try:
        with open(path, "rb") as fh:
            lines = fh.read().split(b"\n")
    except OSError as e:
        raise AltError(f"{path}: cannot read ({e.strerror})") from None
    rows = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise AltError(
                f"{path}:{i}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            ) from None
        except json.JSONDecodeError as e:
            if partial_ok and i >= len(lines) - 1:
                # a crash mid-append leaves at most one torn final line
                break
            raise malformed_json(f"{path}:{i}", e) from None
        except (ValueError, RecursionError) as e:  # an int over 4300 digits, nesting past the stack
            raise AltError(f"{path}:{i}: unreadable JSON ({str(e).split(':')[0]})") from None
        if not isinstance(row, dict):
            raise AltError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        for key in required:
            if key not in row:
                raise AltError(f"{path}:{i}: missing key '{key}'")
        check_row(f"{path}:{i}", row, schema or {})
        rows.append((i, row) if numbered else row)
    if not rows and not allow_empty:
        raise AltError(f"{path}: file is empty")
    return rows


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """Write to a temp file in the same folder, then rename: a crash never leaves a half-written `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as e:
        raise AltError(f"{path}: cannot write ({e.strerror})") from None
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            # mkstemp makes 0600: give the file the mode open() would
            os.fchmod(fh.fileno(), 0o666 & ~UMASK)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        # the write itself failed (a full disk, `path` a folder), not something else in the caller's block
        if isinstance(e, OSError) and e.filename in (None, tmp, path):
            raise AltError(f"{path}: cannot write ({why(e)})") from None
        raise


def write_jsonl(path, rows):
    with atomic_open(path) as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_json(path, obj):
    with atomic_open(path) as fh:
        fh.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path, kind=dict):
    """A whole JSON file (config, meta, summary) -> its value, a `kind`; any failure is one error naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except OSError as e:
        raise AltError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise malformed_json(f"{path}:{e.lineno}", e) from None
    except UnicodeDecodeError as e:
        raise AltError(f"{path}: not valid UTF-8 (byte 0x{e.object[e.start]:02x})") from None
    except (ValueError, RecursionError) as e:  # an int over 4300 digits, nesting past the stack
        raise AltError(f"{path}: unreadable JSON ({str(e).split(':')[0]})") from None
    if not isinstance(value, kind):
        raise AltError(
            f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}, "
            f"got {type(value).__name__}"
        )
    return value


def append_jsonl(fh, row):
    """Append one row to an open log and make it durable now (side files, LLM caches); read back with partial_ok."""
    try:
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    except OSError as e:
        raise AltError(f"{fh.name}: cannot write ({why(e)})") from None


# ----------------------------------------------------------------------------- resume
def open_journal(path, settings=None, keep=None, fresh=False):
    """A resumable append-only JSONL of finished work -> (its rows still valid, the file open for append_jsonl).
    settings (a JSON value: whatever shapes the work) heads the file as {"settings": ...}: the rows of a run made with
    other settings are dropped. keep(row) drops more (a log's steps past the resume checkpoint); fresh drops all.
    Used for sample.py's OUT.partial, evaluate.py's eval.partial.jsonl, feedback.py's judge cache and the trainers'
    logs. The file is rewritten first, so a torn last line (a kill mid-append) is gone before anything follows it."""
    exists = os.path.exists(path) and not fresh
    rows = read_jsonl(path, allow_empty=True, partial_ok=True) if exists else []
    head = [] if settings is None else [{"settings": settings}]
    if head:
        rows = rows[1:] if rows[:1] == head else []
    rows = [r for r in rows if keep is None or keep(r)]
    write_jsonl(path, head + rows)
    return rows, open(path, "a", encoding="utf-8")


def journal_batch(fh, **head):
    """on_batch for run_batches: append {**head, "batch": b, "results": results} to the open journal fh."""
    return lambda b, results: append_jsonl(fh, {**head, "batch": b, "results": results})


def batches_done(rows, **head):
    """A journal's finished batches written by journal_batch(fh, **head) -> {b: results}."""
    return {r["batch"]: r["results"] for r in rows if all(r.get(k) == v for k, v in head.items())}


def open_log(path, upto, key="step"):
    """A trainer's log reopened for append on a (re)start: its rows past the resume point (row[key] > upto) go."""
    return open_journal(path, keep=lambda row: row.get(key, 0) <= upto)[1]


def log_row(fh, bar, row, **postfix):
    """A trainer's step: append `row` to its log and move its progress bar; a rank without the log (fh None) does
    nothing."""
    if fh is not None:
        append_jsonl(fh, row)
        bar.update(1)
        bar.set_postfix(**postfix)


# flags that change how a stage runs or what it prints, never what it writes
NOT_SETTINGS = ("out", "overwrite", "no_progress", "baseline", "local_rank", "qps", "concurrency")


def finished(stage, out, args, done=None, stale=(), say=None):
    """The done / --overwrite preamble of every stage -> True when `out` is finished. `done`: the paths whose presence
    marks it finished (default [out]: a file; else `out` is a folder). `args`: the stage's argparse Namespace (or a
    dict): its `overwrite`, and its settings (less NOT_SETTINGS), which OUT.stage.json beside a file (OUT/stage.json
    in a folder) records with `stage` from the start, so that "done" is said only for this stage's finished output
    under the same settings (after printing `say`, default "done: PATH exists (--overwrite to redo)"), a partial run
    of this stage resumes, and any other file or folder at `out` is an error. Writing the record first also fails a
    read-only or full output folder before any work. With --overwrite: rank 0 deletes the `stale` files and folders
    (a summary) and a folder's resume checkpoint first. Rank 0 first holds OUT.lock (beside `out`, file or folder)
    until it exits: a second process on the same output fails naming the holder."""
    settings = args if isinstance(args, dict) else vars(args)
    done, rank0 = done or [out], os.environ.get("RANK", "0") == "0"
    if rank0:
        hold_output(out)
    file = out in done  # else a folder, holding its markers
    side = out + ".stage.json" if file else os.path.join(out, "stage.json")
    for path in done if file else [out]:
        if os.path.exists(path) and os.path.isdir(path) == file:
            kinds = ("a folder", "a file")[:: 1 if file else -1]
            raise AltError(f"{path} is {kinds[0]}; {stage} writes {kinds[1]} there")
    norm = {  # a path means the same from any working folder
        k: os.path.realpath(v) if isinstance(v, str) and os.path.exists(v) else v
        for k, v in settings.items()
        if k not in NOT_SETTINGS
    }
    record = json.loads(json.dumps({"stage": stage, "settings": norm}, default=str))
    if settings["overwrite"] and rank0 and not file:
        remove_checkpoint(out)  # a redone folder must not resume the old run
    if settings["overwrite"]:
        for path in stale if rank0 else ():
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    elif any(os.path.exists(p) for p in done) or _holds_more(out, file, side):
        old = read_json(side) if os.path.isfile(side) else {}
        if old.get("stage") != stage:
            by = f"was written by {old['stage']}" if "stage" in old else f"has no {side}"
            raise AltError(
                f"{out} exists but is no output of {stage} ({by}): --overwrite to replace it, or "
                "another --out"
            )
        if all(os.path.exists(p) for p in done):
            was = old.get("settings", {})
            diff = [
                f"--{k.replace('_', '-')} {record['settings'].get(k)!r} (was {was.get(k)!r})"
                for k in sorted(set(was) | set(record["settings"]))
                if was.get(k) != record["settings"].get(k)
            ]
            if diff:
                raise AltError(
                    f"{out} was made with other settings ({'; '.join(diff)}): --overwrite to "
                    "redo it, or another --out"
                )
            print(say or f"done: {done[0]} exists (--overwrite to redo)")
            return True
    if rank0:
        write_json(side, record)
    return False


def _holds_more(out, file, side):
    """A folder output already holds something besides its stage record (and that record's temp files)."""
    name = os.path.basename(side)
    return not file and any(
        not f.startswith((name, f".{name}."))
        for f in (os.listdir(out) if os.path.isdir(out) else [])
    )


def context_length(config):
    """A model's context in tokens: n_positions or max_position_embeddings, else 1024 (GPT-2's) for a config that
    names neither."""
    n = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return n or 1024


# ----------------------------------------------------------------------------- resume checkpoints
def save_checkpoint(
    out, model, tok, state, rank=0, barrier=lambda: None, zero=None, name="checkpoint", extra=None
):
    """Write OUT/NAME.tmp (weights as safetensors, tokenizer, state.pt, and one rng_RANK.pt per rank: its RNG and,
    under DeepSpeed, its ZeRO shard `zero`; extra(folder) adds files), then swap it in for OUT/NAME by renames. Every
    rank calls it; `barrier` syncs them. Used by train.py, baselines/dpo.py and baselines/ppo.py."""
    import torch

    ck = os.path.join(out, name)
    tmp = ck + ".tmp"
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            torch.save(state, os.path.join(tmp, "state.pt"))
            if extra is not None:
                extra(tmp)
        barrier()
        cuda = {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}
        torch.save(
            {"torch": torch.get_rng_state(), **cuda, **({"zero": zero} if zero else {})},
            os.path.join(tmp, f"rng_{rank}.pt"),
        )
    except (
        Exception
    ) as e:  # torch and safetensors report a full disk as RuntimeError or their own error
        shutil.rmtree(tmp, ignore_errors=True)
        raise AltError(f"{tmp}: cannot write the checkpoint ({why(e)}); {ck} is kept") from None
    barrier()
    if rank == 0:
        # rename is atomic; a crash between the two renames leaves NAME.old, which find_checkpoint reads
        if os.path.isdir(ck):
            # ck came from an atomic rename, so it is complete: a leftover .old is stale
            shutil.rmtree(ck + ".old", ignore_errors=True)
            os.replace(ck, ck + ".old")
        os.replace(tmp, ck)
        shutil.rmtree(ck + ".old", ignore_errors=True)
    barrier()


def save_trained(out, model, tok, summary_path, summary, t_start, args):
    """A trainer's end (rank 0): the model and tokenizer in OUT, then `summary` with train_seconds (since t_start)
    and args at summary_path (its presence marks OUT finished), then the resume checkpoint goes."""
    model.save_pretrained(out)
    tok.save_pretrained(out)
    summary.update(train_seconds=round(time.time() - t_start, 1), args=vars(args))
    write_json(summary_path, summary)
    remove_checkpoint(out)


def find_checkpoint(out, name="checkpoint"):
    """OUT/NAME, or OUT/NAME.old where a crash fell between save_checkpoint's renames; None when neither is whole."""
    found = [c for c in (name, name + ".old") if os.path.isfile(os.path.join(out, c, "state.pt"))]
    return os.path.join(out, found[0]) if found else None


def load_checkpoint(ck, fingerprint, optimizer=None, scheduler=None, rank=0):
    """Restore this rank's RNG and, when given, the optimizer and the schedule from `ck` -> its state dict, plus
    "zero": this rank's ZeRO shard (None without DeepSpeed). A checkpoint of other settings is an error."""
    import torch

    try:  # weights_only: never unpickle objects from a run dir
        state, rng = (
            torch.load(os.path.join(ck, f), weights_only=True)
            for f in ("state.pt", f"rng_{rank}.pt")
        )
    except Exception as e:  # a tampered, truncated or foreign file: one line, not a traceback
        raise AltError(
            f"{ck}: unreadable resume state ({type(e).__name__}); rerun with --overwrite"
        ) from None
    if state["fingerprint"] != fingerprint:
        raise AltError(
            f"{ck}: made with other settings ({state['fingerprint']}); rerun with --overwrite"
        )
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return {**state, "zero": rng.get("zero")}


def remove_checkpoint(out, name="checkpoint"):
    """The resume state goes once the run is finished, or on --overwrite."""
    for d in (name, name + ".old", name + ".tmp"):
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)


# ----------------------------------------------------------------------------- paths, Hub, seeds
def _local_path(path):
    """The real path of a local file or folder, or None for a Hub name (neither it nor its parent folder exists)."""
    if path and (os.path.exists(path) or os.path.isdir(os.path.dirname(os.path.abspath(path)))):
        return os.path.realpath(path)
    return None


def refuse_overlap(outputs, inputs):
    """Raise AltError when an output path is, holds or lies inside an input path. outputs, inputs: {flag: path, list
    of paths or None}. Called before a stage writes or deletes anything, whatever --overwrite says."""

    def pairs(flags):
        for flag, paths in flags.items():
            for path in [paths] if isinstance(paths, str) else paths or []:
                real = _local_path(path)
                if real is not None:
                    yield flag, path, real

    for out_flag, out, o in pairs(outputs):
        for in_flag, inp, i in pairs(inputs):
            if o == i:
                raise AltError(
                    f"{out_flag} and {in_flag} are the same path ({out}): an output may not replace "
                    "an input"
                )
            if os.path.commonpath([o, i]) in (o, i):
                inner, outer = (out_flag, out), (in_flag, inp)
                if len(o) < len(i):  # the shorter path holds the other
                    inner, outer = outer, inner
                raise AltError(
                    f"{inner[0]} {inner[1]} lies inside {outer[0]} {outer[1]}: an output may not "
                    "overlap an input"
                )


def load_error(what, name, e):
    """The one line for a model (`what`: model, classifier) that from_pretrained could not load (exception `e`): in a
    local folder, the file at fault (config.json, a truncated or invalid safetensors file) and why."""
    if not os.path.isdir(name):
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        return AltError(
            f"cannot load {what} '{name}': not a local model folder and not loadable from the "
            f"Hub{offline}: {why(e)}"
        )
    from safetensors import safe_open

    config = os.path.join(name, "config.json")
    try:
        read_json(config)
        for path in sorted(glob.glob(os.path.join(name, "*.safetensors"))):
            try:
                with safe_open(path, "pt"):
                    pass
            except Exception as bad:  # safetensors' own error type: a cut or foreign file
                raise AltError(
                    f"{path}: truncated or invalid safetensors file ({why(bad)})"
                ) from None
    except AltError as bad:
        return AltError(f"cannot load {what} '{name}': {bad}")
    return AltError(f"cannot load {what} '{name}' (a local folder): {why(e)}")


def default_device_dtype():
    import torch

    return ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")


def load_fluency_lm(name, args):
    """evaluate.py's fluency LM exactly as saved: unlike load_policy, no separator row (it would change the
    softmax). args: evaluate's flags (--fluency-dtype, --device, --trust-remote-code)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = hub_unreachable([name])  # cached, Hub unreachable: load without retries
    try:
        tok = AutoTokenizer.from_pretrained(
            name, trust_remote_code=args.trust_remote_code, local_files_only=local
        )
        model = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=getattr(torch, args.fluency_dtype),
            trust_remote_code=args.trust_remote_code,
            local_files_only=local,
        )
    except (OSError, ValueError, AttributeError) as e:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise AltError(
            f"cannot load fluency model '{name}'{offline}: {str(e).splitlines()[0]}"
        ) from None
    return model.to(args.device or default_device_dtype()[0]), tok


@functools.lru_cache(maxsize=None)
def _hub_answers(endpoint):
    """One HEAD probe per endpoint and process (a stage may load a policy, a judge and a fluency LM)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=5)
        return True
    except urllib.error.HTTPError:  # an answer, even an error, means the Hub is reachable
        return True
    except (OSError, ValueError):
        return False


def hub_unreachable(names):
    """Fail fast where transformers would retry for ~25 s per file: a name that is no local folder, with
    HF_HUB_OFFLINE unset and the Hub unreachable, must be in the Hub cache. True: unreachable, all cached."""
    names = sorted({n for n in names if n and not os.path.isdir(n)})
    if not names or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if _hub_answers(endpoint):
        return False
    from huggingface_hub import try_to_load_from_cache

    def cached(name):
        try:
            return isinstance(try_to_load_from_cache(name, "config.json"), str)
        except ValueError:  # not a valid repo id either: a local path that does not exist
            return False

    missing = [n for n in names if not cached(n)]
    if missing:
        raise AltError(
            f"{', '.join(missing)}: not a local folder, not in the Hub cache, and "
            f"{endpoint} is unreachable. Download it where there is network (`hf "
            f"download NAME`) or pass a local folder"
        )
    return True


def seed_everything(seed):
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


# ----------------------------------------------------------------------------- row schemas
KINDS = {str: "a string", int: "an int", float: "a finite number", None: "null"}


def is_kind(value, kind):
    """value is of `kind`: str, int (no bool), float (any finite number, no bool), or None (null)."""
    if kind is None or isinstance(value, bool):
        return value is kind
    if kind is float:
        return finite_number(value)
    return isinstance(value, kind)


def check_row(where, row, schema):
    """AltError at `where` (FILE:LINE) unless every key of `schema` ({key: kinds, a tuple of KINDS}) that the row
    holds has one of its kinds; an absent key is the reader's to require."""
    for key, kinds in schema.items():
        if key in row and not any(is_kind(row[key], k) for k in kinds):
            want = " or ".join(KINDS[k] for k in kinds)
            raise AltError(f"{where}: '{key}' must be {want}, got {row[key]!r}")


def prompt_key(path, line, row, seen):
    """A pool row's x identity for grouping: ("id", str(prompt_id)), else ("x", the prompt text), so that an id
    never meets a text. `seen` maps each id to the first (prompt, line): an id reused for another x is an error."""
    pid = row.get("prompt_id")
    if pid is None:
        return ("x", row["prompt"])
    first = seen.setdefault(str(pid), (row["prompt"], line))
    if first[0] != row["prompt"]:
        raise AltError(
            f"{path}:{line}: prompt_id {pid!r} was given to another prompt on line {first[1]}"
        )
    return ("id", str(pid))


# a --generations row's kinds (check_row); rows are grouped by prompt_id
GENERATION_ROW = {"prompt": (str,), "generation": (str,), "prompt_id": (int, str)}


def read_generations(path):
    """evaluate.py --generations: a generations JSONL -> flat rows, each validated; errors name the file and row.
    A row {"prompt_id", "prompt", "generation", ...}, or the DExperts/Quark release shape, one row per prompt:
    {"prompt": {"text"}, "generations": [{"text", "toxicity"} or a text, ...]}."""
    rows = []
    for i, r in enumerate(read_jsonl(path), 1):
        x = r["prompt"].get("text") if isinstance(r.get("prompt"), dict) else r.get("prompt")
        if isinstance(r.get("generations"), list):
            for k, g in enumerate(r["generations"]):
                g = g if isinstance(g, dict) else {"text": g}
                tox = {"toxicity": g["toxicity"]} if "toxicity" in g else {}
                row = {"prompt_id": r.get("id", i - 1), "sample_idx": k, "prompt": x}
                rows.append((i, {**row, "generation": g.get("text"), **tox}))
            continue
        for key in ("prompt_id", "prompt", "generation"):
            if key not in r:
                raise AltError(f"{path}: row {i}: missing key '{key}'")
        rows.append((i, {**r, "prompt": x}))
    if not rows:
        raise AltError(f"{path}: no generations")
    for i, r in rows:
        check_row(f"{path}: row {i}", r, GENERATION_ROW)
        t = r.get("toxicity")
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1
        ):
            raise AltError(
                f"{path}: row {i}: 'toxicity' must be a number in [0, 1] or null, got {t!r}"
            )
    return [r for _, r in rows]


# ----------------------------------------------------------------------------- sampling and scoring
def plan_batches(ids, batch_size, context, max_new_tokens, keep=None, stats=None):
    """Token ids per input -> (ids left-truncated to context - max_new_tokens, batches of input indices sorted by
    length: little padding, the longest first so that an OOM shows in the first batch). Truncation cuts the start
    of x but keeps all up to the token `keep` (f̂ + separator): a long prompt never loses its conditioning."""
    max_len = context - max_new_tokens
    if max_len < 1:
        raise AltError(
            f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the {context}-token context"
        )
    n_cut = 0
    for i, t in enumerate(ids):
        if not t:
            raise AltError(f"input {i} tokenizes to nothing (empty prompt without feedback)")
        if len(t) > max_len:
            head = t[: t.index(keep) + 1] if keep in t else []
            if len(head) >= max_len:
                raise AltError(
                    f"input {i}: the feedback alone ({len(head)} tokens) fills the {max_len}-token budget"
                )
            ids[i] = head + t[len(t) - (max_len - len(head)) :]
            n_cut += 1
    if n_cut:
        print(
            f"warning: {n_cut} of {len(ids)} inputs exceed {max_len} tokens (context {context} - "
            f"{max_new_tokens} new); their start was cut (left truncation, feedback kept)",
            file=sys.stderr,
        )
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    real = sum(map(len, ids))
    padded = sum(len(b) * len(ids[b[0]]) for b in batches)  # a batch is as wide as its first input
    if stats is not None:
        stats.update(
            prompts_truncated=n_cut,
            prompt_tokens=real,
            pad_tokens=padded - real,
            batches=len(batches),
            pad_share=(padded - real) / max(padded, 1),
        )
    return ids, batches


def pad_batch(seqs, pad, left=False):
    """Token id lists -> (ids, attention mask): (len(seqs), longest) long tensors, padded with `pad` on the right,
    or on the left (generation)."""
    import torch

    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, t in enumerate(seqs):
        cols = slice(width - len(t), width) if left else slice(0, len(t))
        ids[r, cols] = torch.tensor(t)
        mask[r, cols] = 1
    return ids, mask


def batch_seed(seed, b):
    """Seed of batch b: fixed by (seed, b) alone, so a resumed run redraws exactly what it skipped."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{b}".encode()).digest()[:8], "little") % 2**63


def run_batches(batches, step, n_items, done=None, on_batch=None, per_item=1, stats=None, **bar):
    """step(b, batch) -> one result per item of batch b (a list of item indices), for each b not in `done` ({b: its
    results}: a resumed run's), then on_batch(b, results) (to journal them) -> the results in item order. A tqdm
    bar (options `bar`) counts per_item units per item; `stats` (a dict) receives generations (units done now),
    seconds and batches_resumed."""
    from tqdm.auto import tqdm

    done, results, t0 = done or {}, [None] * n_items, time.time()
    initial = sum(len(idx) for b, idx in enumerate(batches) if b in done) * per_item
    with tqdm(
        total=n_items * per_item, initial=initial, unit="gen", dynamic_ncols=True, **bar
    ) as tq:
        for b, idx in enumerate(batches):
            res = done.get(b)
            if res is None:
                res = step(b, idx)
                if on_batch is not None:
                    on_batch(b, res)
                tq.update(len(idx) * per_item)
            for i, r in zip(idx, res):
                results[i] = r
    if stats is not None:
        stats.update(
            generations=n_items * per_item - initial,
            seconds=time.time() - t0,
            batches_resumed=sum(1 for b in range(len(batches)) if b in done),
        )
    return results


def score_chunks(score, texts, size, journal, done, tag, hide=False):
    """score(texts) in resumable chunks of `size`, each appended to `journal` as {"step": tag, "chunk", "scores"}
    when it holds a score (a chunk that failed whole is asked again); `done`: the journal's rows. NaN becomes
    null. A tqdm bar per text (hide: none)."""
    chunks = [list(range(b, min(b + size, len(texts)))) for b in range(0, len(texts), size)]

    def step(c, idx):
        scores = [None if v is None or v != v else float(v) for v in score([texts[i] for i in idx])]
        if len(scores) != len(idx):
            raise AltError(f"{tag}: the scorer returned {len(scores)} scores for {len(idx)} texts")
        return scores

    def log(c, scores):
        if any(v is not None for v in scores):
            append_jsonl(journal, {"step": tag, "chunk": c, "scores": scores})

    have = {r["chunk"]: r["scores"] for r in done if r.get("step") == tag}
    return run_batches(chunks, step, len(texts), have, log, desc=tag, disable=hide)


def parse_shard(text):
    """--shard i/n -> (i, n)."""
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"expected i/n with 0 <= i < n (e.g. 0/4), got '{text}'")
    return int(m.group(1)), int(m.group(2))


def shard_path(out, shard):
    """Where shard (i, n) of OUT is written: OUT.shard-i-of-n (OUT itself when shard is None)."""
    return out if shard is None else f"{out}.shard-{shard[0]}-of-{shard[1]}"


def merge_shards(out, overwrite=False):
    """sample.py --merge: join OUT.shard-i-of-n (i = 0..n-1) into OUT, ordered by prompt index then sample index."""
    if finished("sample.py --merge", out, {"overwrite": overwrite}):
        return
    folder, base = os.path.split(os.path.abspath(out))
    pat = re.compile(re.escape(base) + r"\.shard-(\d+)-of-(\d+)")
    found = {
        (int(m.group(1)), int(m.group(2)))
        for m in map(pat.fullmatch, os.listdir(folder) if os.path.isdir(folder) else [])
        if m
    }
    if not found:
        raise AltError(f"{out}: no shard files {base}.shard-I-of-N to merge")
    ns = sorted({n for _, n in found})
    if len(ns) > 1:
        raise AltError(
            f"{out}: shards of different splits ({', '.join(f'of-{n}' for n in ns)}); delete the stale ones"
        )
    n = ns[0]
    missing = [i for i in range(n) if (i, n) not in found]
    if missing:
        raise AltError(
            f"{out}: missing shard(s) {', '.join(map(str, missing))} of {n} "
            f"(run sample.py --shard i/{n} for each)"
        )
    rows = []
    for i in range(n):
        path = shard_path(out, (i, n))
        part = read_jsonl(path, required=("prompt_index", "sample_idx"), allow_empty=True)
        for line, r in enumerate(part, 1):
            if r["prompt_index"] % n != i:
                raise AltError(
                    f"{path}:{line}: prompt_index {r['prompt_index']} does not belong to shard {i}/{n}"
                )
        rows += part
    rows.sort(key=lambda r: (r["prompt_index"], r["sample_idx"]))
    keys = [(r["prompt_index"], r["sample_idx"]) for r in rows]
    if len(set(keys)) != len(keys):
        raise AltError(
            f"{out}: shards overlap (a (prompt, sample) pair appears twice); were they made from one file?"
        )
    for r in rows:
        del r["prompt_index"]  # only shards need it: the merged file is exactly an unsharded run's
    write_jsonl(out, rows)
    print(f"sample.py: merged {n} shards -> {len(rows)} rows in {out}")


def load_condition_pool(path):
    """--condition-pool (ALT_LMU): a JSON list of exemplar feedbacks f̂."""
    pool = read_json(path, kind=object)  # the shape is checked below, with its own message
    if (
        not isinstance(pool, list)
        or not pool
        or not all(isinstance(f, str) and f.strip() for f in pool)
    ):
        raise AltError(f"{path}: expected a non-empty JSON list of non-empty strings")
    return pool


def check_prompts(prompts, where, control, unique_ids=False, allow_none=False):
    """Prompts [{"id", "prompt"}] from `where` -> the indices of the non-empty x (an empty x has nothing to
    continue: skipped). No x may hold the `control` token; unique_ids: metrics group y by prompt id; allow_none:
    no x left is no error."""
    for i, p in enumerate(prompts):
        if control in p["prompt"]:
            raise AltError(f"{where}: row {i + 1}: prompt contains the control token {control}")
    if unique_ids and len({p["id"] for p in prompts}) < len(prompts):
        raise AltError(f"{where}: duplicate prompt ids")
    keep = [i for i, p in enumerate(prompts) if p["prompt"].strip()]
    if not keep and not allow_none:
        raise AltError(f"{where}: all {len(prompts)} prompts are empty")
    return keep


def format_table(result, metrics, baseline=None):
    """evaluate.py's table of eval.json `result`, a row per key of `metrics`, fixed width: metric, value [, the
    extra scorer's value] [, baseline, delta]."""

    def fmt(v, sign=""):  # sign "+" for a delta
        return "-" if v is None else f"{v:{sign}}" if isinstance(v, int) else f"{v:{sign}.4f}"

    def delta(k):
        a, b = result.get(k), baseline.get(k)
        return (
            fmt(a - b, "+") if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "-"
        )

    cols = [("metric", str), (f"value [{result['scorer']}]", lambda k: fmt(result.get(k)))]
    if result.get("extra"):
        cols.append((f"extra [{result['extra']['scorer']}]", lambda k: fmt(result["extra"].get(k))))
    if baseline is not None:
        cols += [("baseline", lambda k: fmt(baseline.get(k))), ("delta", delta)]
    cells = [[name for name, _ in cols]] + [[f(k) for _, f in cols] for k in metrics]
    widths = [max(len(row[c]) for row in cells) for c in range(len(cols))]
    lines = [
        "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    ]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


# ----------------------------------------------------------------------------- locks
_HELD = {}  # OUT.lock -> its fd: the outputs this process holds, until it exits


def hold_output(out):
    """Hold OUT.lock beside the output `out` (never inside a folder output) for the rest of this process; a second
    call on the same output in this process is a no-op."""
    path = os.path.abspath(out) + ".lock"
    if path not in _HELD:
        _HELD[path] = hold_lock(path)


def hold_lock(path):
    """An exclusive flock on `path` (created) for as long as the returned fd stays open (the kernel drops it when
    the process dies, so a stale file never blocks). Held elsewhere: AltError naming the holder's pid and host."""
    import fcntl
    import socket

    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise AltError(f"{path}: cannot open the lock file ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "a process"
        os.close(fd)
        raise AltError(f"{path} is held by {holder}: another run is using it") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd
