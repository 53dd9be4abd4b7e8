"""common.py: the one contract the ALT stages share. JSONL I/O, the conditioning template, policy loading.

Prompt file (input of sample.py / evaluate.py), one JSON object per line:
    {"prompt": "text"}  or the RealToxicityPrompts shape  {"prompt": {"text": "..."}},  optional "id"
    (when "id" is missing, the id is the 0-based line index). An HF dataset name works too (load_prompts).

Datapool row, one JSON object per (x, y). D grows across iterations; every stage reads/writes this shape:
    prompt_id   int|str     id of x in its prompt file
    sample_idx  int         index of y among the samples drawn for x in that iteration
    prompt      str         the raw prompt x, never with feedback
    generation  str         the continuation y
    condition   str|null    the exemplar feedback f̂ prepended while sampling (null: unconditioned, iteration 1)
    iteration   int         the ALT iteration k that sampled y
    truncated   bool        y hit max_new_tokens without EOS
    num_tokens  int         number of generated tokens
  added by feedback.py:
    reward      float|null  scalar reward of (x, y) (1 - toxicity for the toxicity task; null: scorer failed)
    feedback    str|null    the textual feedback f (null: none could be given; train.py skips the row)

Conditioning template (the single source, used by sample, train and evaluate):
    condition(x, f) = f + "<|separator|>" + x        (x alone when f is None)
"""

import argparse
import contextlib
import functools
import json
import math
import os
import random
import sys
import tempfile

SEPARATOR = "<|separator|>"
# os.umask reads it only by setting it: once, here, as later it would race with threads making files
UMASK = os.umask(0)
os.umask(UMASK)


def quantile_token(k):  # Quark's k-th reward-quantile control token (k=0: the best quantile)
    return f"<|quantile_{k}|>"


class AltError(Exception):
    """A user-facing error: printed as one line (no traceback) and the stage exits with code 2."""


def cli(main):
    """Run a stage's main(); turn AltError into a one-line message and exit code 2."""
    try:
        main()
    except AltError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)


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


# ----------------------------------------------------------------------------- JSONL I/O
def malformed_json(where, e):
    # some of json's messages end in " at" ("Unterminated string starting at"): the column completes them
    return AltError(f"{where}: malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})")


def read_jsonl(path, required=(), allow_empty=False, partial_ok=False):
    """Read a JSONL file; errors name file:line and the key. partial_ok drops a torn last line (append logs)."""
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
        rows.append(row)
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
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
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


def append_jsonl(fh, row):
    """Append one row to an open log and make it durable now (side files, LLM caches); read back with partial_ok."""
    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def load_prompts(spec, split="train", field=None):
    """Prompts as [{"id", "prompt"}] from a local JSONL file or, with `field` (dotted, e.g. prompt.text), any
    `datasets` source: an HF dataset name, or a local JSON/JSONL file through datasets' json loader."""
    if os.path.isfile(spec) and field is None:
        rows = read_jsonl(spec, required=("prompt",))
    else:
        import datasets  # only when needed: it is slow to import

        try:
            rows = (
                datasets.load_dataset("json", data_files=spec, split=split)
                if os.path.isfile(spec)
                else datasets.load_dataset(spec, split=split)
            )
        except Exception as e:  # offline Hub, unknown name, bad split: one clear line
            raise AltError(
                f"cannot load prompts '{spec}' (split {split}): {type(e).__name__}: {e}"
            ) from None
    out = []
    for i, row in enumerate(rows):
        text = row
        for part in (field or "prompt").split("."):
            text = text.get(part) if isinstance(text, dict) else None
        # the RTP shape {"prompt": {"text": ...}}
        text = text.get("text") if isinstance(text, dict) else text
        if not isinstance(text, str):
            raise AltError(
                f"{spec}: row {i + 1}: no string at '{field or 'prompt'}' (nor at its 'text')"
            )
        pid = row.get("id", i)
        if isinstance(pid, bool) or not isinstance(pid, (int, str)):
            raise AltError(
                f"{spec}: row {i + 1}: 'id' must be an int or a string, got {type(pid).__name__}"
            )
        out.append({"id": pid, "prompt": text})
    if not out:
        raise AltError(f"{spec}: no prompts")
    return out


# ----------------------------------------------------------------------------- conditioning
def prompt_key(path, line, row, seen):
    """A pool row's x identity for grouping: prompt_id (int or str), else the prompt text. `seen` maps each id to
    the first (prompt, line), so an id reused for another x is an error, not a silently merged group."""
    pid = row.get("prompt_id")
    if pid is None:
        return row["prompt"]
    if isinstance(pid, bool) or not isinstance(pid, (int, str)):
        raise AltError(f"{path}:{line}: 'prompt_id' must be an int or a string, got {pid!r}")
    first = seen.setdefault(str(pid), (row["prompt"], line))
    if first[0] != row["prompt"]:
        raise AltError(
            f"{path}:{line}: prompt_id {pid!r} was given to another prompt on line {first[1]}"
        )
    return str(pid)


def condition(prompt, feedback):
    """The model input for x under feedback f: f, the separator token, then x. p_0 (feedback None) sees x alone."""
    return prompt if feedback is None else f"{feedback}{SEPARATOR}{prompt}"


def strip_condition(text):
    """Inverse of condition(): (feedback or None, prompt)."""
    feedback, sep, prompt = text.partition(SEPARATOR)
    return (feedback, prompt) if sep else (None, text)


# ----------------------------------------------------------------------------- models
def default_device_dtype():
    import torch

    return ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")


def control_token_ids(tokenizer):
    """Ids of the tokens ALT adds (separator, Quark quantiles): sampling must never generate them."""
    return sorted(
        i for t, i in tokenizer.get_vocab().items() if t == SEPARATOR or t.startswith("<|quantile_")
    )


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


def load_policy(name_or_path, device=None, dtype=None, extra_tokens=(), trust_remote_code=False):
    """Any HF causal LM by Hub name or local path -> (model, tokenizer): left padding, a pad token, and the
    separator (plus `extra_tokens`, e.g. Quark's) added as special tokens with new embedding rows set to EOS's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev, dt = default_device_dtype()
    device, dtype = device or dev, dtype or dt
    local = hub_unreachable([name_or_path])  # cached, Hub unreachable: load without retries
    try:
        tok = AutoTokenizer.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, local_files_only=local
        )
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=getattr(torch, dtype),
            trust_remote_code=trust_remote_code,
            local_files_only=local,
        )
    except Exception as e:
        # OSError, ValueError, or UnpicklingError for a folder with only a pickled .bin
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise AltError(
            f"cannot load model '{name_or_path}': not a local model folder and not loadable from the "
            f"Hub{offline}: {str(e).splitlines()[0]}"
        ) from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    new = [t for t in (SEPARATOR, *extra_tokens) if t not in tok.get_vocab()]
    if new:
        tok.add_tokens(new, special_tokens=True)
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        new_ids = tok.convert_tokens_to_ids(new)
        with torch.no_grad():
            for emb in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:
                emb.weight[new_ids] = emb.weight[tok.eos_token_id].clone()
    model.config.pad_token_id = tok.pad_token_id
    return model.to(device), tok


def seed_everything(seed):
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


# ---- numbers (validation)
def finite_number(value):
    """A JSON/CLI number that fits a float (a bool is none): math.isfinite overflows on a huge int."""
    try:
        return type(value) in (int, float) and math.isfinite(value)
    except OverflowError:
        return False


# ---- locks (bookkeeping)
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
