"""common.py: the one contract the ALT stages share: row schema, conditioning template, prompt
and policy loading. The plumbing (JSONL I/O, errors, resume journals, checkpoints): bookkeeping.py.

Prompt file (input of sample.py / evaluate.py), one JSON object per line:
    {"prompt": "text"}  or the RealToxicityPrompts shape  {"prompt": {"text": "..."}},
    optional "id" (missing: the 0-based line index). An HF dataset name works too (load_prompts).

Datapool row, one JSON object per (x, y). D grows across iterations; every stage reads/writes it:
    prompt_id   int|str     id of x in its prompt file
    sample_idx  int         index of y among the samples drawn for x in that iteration
    prompt      str         the raw prompt x, never with feedback
    generation  str         the continuation y
    condition   str|null    exemplar feedback f̂ prepended in sampling (null: x alone, iteration 1)
    iteration   int         the ALT iteration k that sampled y
    truncated   bool        y hit max_new_tokens without EOS
    num_tokens  int         number of generated tokens
  added by feedback.py:
    reward      float|null  reward of (x, y) (toxicity task: 1 - toxicity; null: scorer failed)
    feedback    str|null    the textual feedback f (null: none given; train.py skips the row)

Conditioning template (the single source, used by sample, train and evaluate):
    condition(x, f) = f + "<|separator|>" + x        (x alone when f is None)
"""

import os

from bookkeeping import AltError, default_device_dtype, hub_unreachable, load_error, read_jsonl

SEPARATOR = "<|separator|>"
# a pool row's field kinds, for bookkeeping.check_row (prompt_id null: grouped by prompt text)
POOL_ROW = {
    "prompt_id": (int, str, None),
    "prompt": (str,),
    "generation": (str,),
    "feedback": (str, None),
    "reward": (float, None),
}
# the feedback methods whose f is the tag of y's reward quantile (feedback.py writes their pools)
QUANTILE_METHODS = ("alt-rm", "quark")


def quantile_token(k):  # Quark's k-th reward-quantile control token (k=0: the best quantile)
    return f"<|quantile_{k}|>"


def meta_path(pool):
    """The sidecar of a pool: OUT minus .jsonl plus .meta.json."""
    return pool[: -len(".jsonl")] + ".meta.json"


def condition(prompt, feedback):
    """The input for x under feedback f: f, the separator, then x. p_0 (f None) sees x alone."""
    return prompt if feedback is None else f"{feedback}{SEPARATOR}{prompt}"


def control_token_ids(tokenizer):
    """Ids of the tokens ALT adds (separator, Quark quantiles): sampling must never emit them."""
    return sorted(
        i for t, i in tokenizer.get_vocab().items() if t == SEPARATOR or t.startswith("<|quantile_")
    )


def load_prompts(spec, split="train", field=None):
    """Prompts as [{"id", "prompt"}] from a local JSONL file or, with `field` (dotted, e.g.
    prompt.text), any `datasets` source: an HF dataset name, a folder of datasets' save_to_disk, or
    a local JSON/JSONL file through datasets' json loader. Any other folder is an error
    (load_dataset would build a cache of it under ~/.cache)."""
    saved = os.path.isdir(spec)
    if saved and not {"state.json", "dataset_dict.json"} & set(os.listdir(spec)):
        raise AltError(
            f"{spec}: a folder, neither a prompt file nor a saved HF dataset (save_to_disk)"
        )
    if os.path.isfile(spec) and field is None:
        rows = read_jsonl(spec, required=("prompt",))
    else:
        import datasets  # only when needed: it is slow to import

        try:
            if saved:  # memory-mapped where it lies: no cache written
                rows = datasets.load_from_disk(spec)
                rows = rows[split] if isinstance(rows, datasets.DatasetDict) else rows
            elif os.path.isfile(spec):
                rows = datasets.load_dataset("json", data_files=spec, split=split)
            else:
                rows = datasets.load_dataset(spec, split=split)
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


def load_policy(name_or_path, device=None, dtype=None, extra_tokens=(), trust_remote_code=False):
    """Any HF causal LM by Hub name or local path -> (model, tokenizer): left padding, a pad token,
    and the separator (plus `extra_tokens`, e.g. Quark's) added as special tokens, their new
    embedding rows set to EOS's."""
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
    except Exception as e:  # OSError, ValueError, SafetensorError, UnpicklingError (a pickled .bin)
        raise load_error("model", name_or_path, e) from None
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
