"""Build the bundled toy toxicity scorer: a small GPT-2 sequence classifier distilled from Perspective API scores.

The second, independent judge for evaluation ("train with one judge, evaluate with two"): the training reward is
alt-profanity-check (bag-of-words, linear); this one is a small transformer fitted to Google Perspective's TOXICITY
probability, so a policy that games one judge's vocabulary shows up in the other's numbers.

Input (development only, never copied into the repo): ../shared/data/rtp/rtp_dev4k.jsonl, RealToxicityPrompts rows
    {"prompt": {"text", "toxicity"}, "continuation": {"text", "toxicity"}}; the toxicity fields are Perspective
    scores in [0, 1]. A text whose score is null is skipped (counted).
Output: --out (toy/scorer): save_pretrained safetensors + tokenizer + config (num_labels=1, problem_type
    multi_label_classification: feedback.py's hf scorer applies a sigmoid), and build_summary.json (split sizes,
    held-out agreement). Use it as `scorers.make_scorer("hf:toy/scorer")` or `--scorer hf:toy/scorer`.

Launch from the repo root (about 3 min on 1 CPU thread; the epoch with the lowest val BCE is kept):
    HF_HUB_OFFLINE=1 python -m toy.build_toy_scorer --data ../shared/data --out toy/scorer

Objective: soft-label binary cross-entropy against the Perspective probability t(y) of each text y,
    -[t log σ(s(y)) + (1 - t) log(1 - σ(s(y)))],   s(y) = the classifier's logit at y's last token.
Split by RTP row (a prompt and its continuation stay together): --holdout of the rows is never seen in training and
gives the agreement figures (Pearson r, ROC-AUC at Perspective > 0.5), for this scorer and for alt-profanity-check;
--val of the remaining rows picks the epoch.
"""

import argparse
import math
import os
import random
import time

RTP = "rtp/rtp_dev4k.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="build_toy_scorer.py", description=__doc__.splitlines()[0])
    # ---- data
    p.add_argument("--data", default="../shared/data", help="folder holding rtp/rtp_dev4k.jsonl")
    p.add_argument("--out", default="toy/scorer", help="output classifier folder")
    p.add_argument(
        "--overwrite", action="store_true", help="rebuild even if --out already holds a model"
    )
    p.add_argument(
        "--tokenizer",
        default="toy/model",
        help="reuse this folder's tokenizer (the toy LM's 8k BPE); "
        "when absent, train a BPE on the training texts with toy.build_toy_model.train_tokenizer",
    )
    p.add_argument(
        "--vocab-size", type=int, default=8192, help="BPE size when a tokenizer must be trained"
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=0.15,
        help="share of RTP rows held out for the agreement figures",
    )
    p.add_argument(
        "--val", type=float, default=0.10, help="share of the other rows that picks the best epoch"
    )
    # ---- model (GPT-2 for sequence classification, one logit)
    p.add_argument("--n-layer", type=int, default=2, help="transformer blocks")
    p.add_argument("--n-embd", type=int, default=128, help="hidden size")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument(
        "--block", type=int, default=128, help="n_positions: longer texts are truncated when scored"
    )
    p.add_argument(
        "--dropout",
        type=float,
        default=0.2,
        help="residual, embedding and attention dropout (6k texts: "
        "a 1.5M-parameter model overfits from epoch 3)",
    )
    # ---- optimisation
    p.add_argument(
        "--epochs",
        type=int,
        default=4,
        help="passes over the training texts (cut by --max-minutes)",
    )
    p.add_argument("--batch", type=int, default=32, help="texts per step")
    p.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="peak AdamW learning rate (linear warmup, cosine decay)",
    )
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument(
        "--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)"
    )
    p.add_argument(
        "--max-minutes", type=float, default=5.0, help="wall-clock budget of the training loop"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (the machine is shared)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the split, shuffling and init")
    return p.parse_args(argv)


def load_labelled(path):
    """RTP rows -> [[(text, perspective_toxicity), ...] per row], skipping null scores; plus the skip count."""
    from bookkeeping import AltError, read_jsonl

    if not os.path.isfile(path):
        raise AltError(f"{path}: missing (see ../shared/data/README.md)")
    rows, skipped = [], 0
    for i, row in enumerate(read_jsonl(path, required=("prompt",)), 1):
        items = []
        for part in ("prompt", "continuation"):
            obj = row.get(part)
            if not isinstance(obj, dict):
                continue
            tox, text = obj.get("toxicity"), obj.get("text")
            if tox is None or not isinstance(text, str) or not text.strip():
                skipped += 1
                continue
            if not isinstance(tox, (int, float)) or not 0.0 <= tox <= 1.0:
                raise AltError(
                    f"{path}:{i}: {part}.toxicity must be a number in [0, 1], got {tox!r}"
                )
            items.append((text, float(tox)))
        rows.append(items)
    return rows, skipped


def split_rows(rows, holdout, val, seed):
    """(train, val, held-out) lists of (text, t): rows shuffled by seed, then cut; a row's texts stay together."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_hold = int(round(len(rows) * holdout))
    n_val = int(round((len(rows) - n_hold) * val))
    flat = lambda idx: [item for i in idx for item in rows[i]]  # noqa: E731
    return flat(order[n_hold + n_val :]), flat(order[n_hold : n_hold + n_val]), flat(order[:n_hold])


def pearson(a, b):
    import numpy as np

    return float(np.corrcoef(np.asarray(a, float), np.asarray(b, float))[0, 1])


def roc_auc(labels, scores):
    """P(score of a random positive > score of a random negative), ties counting 1/2 (Mann-Whitney U)."""
    import numpy as np

    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    start = 0
    for end in np.r_[np.flatnonzero(s[1:] != s[:-1]) + 1, len(s)]:
        # average rank over each run of tied scores
        ranks[order[start:end]] = (start + end + 1) / 2.0
        start = end
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def agreement(perspective, scores):
    return {
        "pearson": round(pearson(perspective, scores), 4),
        "roc_auc": round(roc_auc([t > 0.5 for t in perspective], scores), 4),
    }


def main():
    args = parse_args()
    from bookkeeping import AltError, write_json

    if os.path.isfile(os.path.join(args.out, "model.safetensors")) and not args.overwrite:
        print(f"done: {args.out} already holds a scorer (--overwrite rebuilds it)")
        return
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from scorers import make_scorer
    from toy.build_toy_model import train_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rows, skipped = load_labelled(os.path.join(args.data, RTP))
    train, val, held = split_rows(rows, args.holdout, args.val, args.seed)
    if min(len(train), len(val), len(held)) == 0:
        raise AltError(
            f"{os.path.join(args.data, RTP)}: too few labelled rows for the train / val / held-out split"
        )
    print(
        f"data: {len(rows)} RTP rows, {len(train)} train / {len(val)} val / {len(held)} held-out texts "
        f"({skipped} null scores skipped)",
        flush=True,
    )

    if os.path.isfile(os.path.join(args.tokenizer, "tokenizer.json")):
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        tok_source = args.tokenizer
    else:  # only training texts, so the held-out split stays unseen
        tok = train_tokenizer([t for t, _ in train], args.vocab_size)
        tok_source = f"trained on the {len(train)} training texts"
    tok.pad_token = tok.eos_token  # GPT-2 pools at the last token that is not pad_token_id
    tok.padding_side = "right"
    tok.model_max_length = args.block
    print(f"tokenizer: {len(tok)} tokens ({tok_source})", flush=True)

    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=args.block,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=args.dropout,
        embd_pdrop=args.dropout,
        attn_pdrop=args.dropout,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        num_labels=1,
        id2label={0: "toxicity"},
        label2id={"toxicity": 0},
        problem_type="multi_label_classification",  # -> BCE, sigmoid
    )
    model = GPT2ForSequenceClassification(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: GPT-2 classifier {args.n_layer}x{args.n_embd}, {n_params / 1e6:.2f}M params",
        flush=True,
    )

    def encode(items):
        return [tok(t, truncation=True, max_length=args.block)["input_ids"] for t, _ in items]

    train_ids, val_ids = encode(train), encode(val)
    train_t = [t for _, t in train]

    def batch(ids, targets=None):
        width = max(len(x) for x in ids)
        inp = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)  # [B, width]
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, x in enumerate(ids):
            inp[r, : len(x)], mask[r, : len(x)] = torch.tensor(x), 1
        out = {"input_ids": inp, "attention_mask": mask}
        if targets is not None:
            # [B, 1] soft labels
            out["labels"] = torch.tensor(targets, dtype=torch.float).unsqueeze(1)
        return out

    def val_loss():
        model.eval()
        tot = 0.0
        with torch.no_grad():
            for s in range(0, len(val_ids), 256):
                b = batch(val_ids[s : s + 256], [t for _, t in val[s : s + 256]])
                tot += model(**b).loss.item() * len(b["input_ids"])
        model.train()
        return tot / len(val_ids)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
    )
    steps_per_epoch = math.ceil(len(train_ids) / args.batch)
    total = steps_per_epoch * args.epochs
    rng = random.Random(args.seed)
    best, best_state, best_epoch, step, t0 = float("inf"), None, 0, 0, time.time()
    model.train()
    for epoch in range(1, args.epochs + 1):
        order = list(range(len(train_ids)))
        rng.shuffle(order)
        for s in range(0, len(order), args.batch):
            idx = order[s : s + args.batch]
            warm = (step + 1) / args.warmup
            cos = 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
            for g in opt.param_groups:
                g["lr"] = args.lr * min(warm, cos)
            loss = model(**batch([train_ids[i] for i in idx], [train_t[i] for i in idx])).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
        vl, minutes = val_loss(), (time.time() - t0) / 60
        if vl < best:
            best, best_epoch = vl, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        print(
            f"epoch {epoch} | step {step} | train loss {loss.item():.4f} | val BCE {vl:.4f}"
            f"{' (best)' if epoch == best_epoch else ''} | {minutes:.1f} min",
            flush=True,
        )
        if minutes * (epoch + 1) / epoch > args.max_minutes:
            # the next epoch would overrun the budget
            break
    train_minutes = (time.time() - t0) / 60
    model.load_state_dict(best_state)
    model.eval()
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)

    # agreement with Perspective on the held-out split, read back through the path evaluate.py uses
    texts, persp = [t for t, _ in held], [t for _, t in held]
    ours = make_scorer(f"hf:{args.out}")(texts)
    prof = make_scorer("profanity-check")(texts)
    summary = {
        "held_out_texts": len(held),
        "held_out_positive": sum(t > 0.5 for t in persp),
        "toy_scorer": agreement(persp, ours),
        "profanity_check": agreement(persp, prof),
        "train_texts": len(train),
        "val_texts": len(val),
        "null_scores_skipped": skipped,
        "best_epoch": best_epoch,
        "val_bce": round(best, 4),
        "train_minutes": round(train_minutes, 2),
        "params": n_params,
        "tokenizer": tok_source,
        "config": {k: v for k, v in vars(args).items() if k not in ("data", "out", "overwrite")},
    }
    write_json(os.path.join(args.out, "build_summary.json"), summary)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out)) / 2**20
    print(
        f"held-out agreement with Perspective ({len(held)} texts, {summary['held_out_positive']} with "
        f"Perspective > 0.5):"
    )
    for name, key in (("toy scorer", "toy_scorer"), ("profanity-check", "profanity_check")):
        print(
            f"  {name:16s} Pearson {summary[key]['pearson']:.3f}  ROC-AUC {summary[key]['roc_auc']:.3f}"
        )
    print(
        f"final: best epoch {best_epoch}, {train_minutes:.1f} min training, {size:.1f} MB in {args.out}"
    )


if __name__ == "__main__":
    from bookkeeping import cli

    cli(main)
