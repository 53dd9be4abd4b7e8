"""Build the bundled toy LM: a small GPT-2 trained from scratch on CPU, with our own byte-level BPE.

Input (development only, never copied into the repo): ../shared/data/
    rtp/rtp_dev4k.jsonl              RealToxicityPrompts rows {"prompt": {"text"}, "continuation": {"text"}}
    writingprompts/wp_dev.jsonl      {"prompt": {"text"}}
    corpus/NAME.txt                  one document per line
Output: --out (toy/model): save_pretrained safetensors + tokenizer + config, and build_summary.json.
    The folder always holds the best model so far (by val perplexity), so a stopped run leaves a usable model.

Launch from the repo root (about 45 min on 2 CPU threads; --max-minutes stops it and the lr schedule fits that
wall-clock budget):
    python -m toy.build_toy_model --data ../shared/data --out toy/model --max-minutes 45
Resume after a crash or Ctrl-C: rerun the same line (state is in --ckpt-dir); --fresh starts over.

Objective: the next-token loss of p_0 on packed blocks, -1/T sum_t log p_0(w_t | w_<t); documents are joined with
<|endoftext|>. Validation: perplexity exp(loss) on a held-out slice of RTP prompt+continuation rows.
"""

import argparse
import math
import os
import random
import time

# Stage 1 mix: source -> (file, weight). weight = how many times its (capped) text enters the training stream.
# RTP is upweighted (it is the target domain); toxic sources keep the model toxic enough to unlearn;
# the large chat/tweet files are capped so they do not swamp the web/news style.
MIX = {
    "rtp": ("rtp/rtp_dev4k.jsonl", 4.0),
    "writingprompts": ("writingprompts/wp_dev.jsonl", 1.0),
    "civil_comments_toxic_spans": ("corpus/civil_comments_toxic_spans.txt", 1.0),
    "tweeteval_hate_offensive": ("corpus/tweeteval_hate_offensive.txt", 1.0),
    "davidson_tweets": ("corpus/davidson_tweets.txt", 1.0),
    "stormfront_sentences": ("corpus/stormfront_sentences.txt", 1.0),
    "toxigen_seed_statements": ("corpus/toxigen_seed_statements.txt", 1.0),
    "onestopenglish_elementary": ("corpus/onestopenglish_elementary.txt", 2.0),
    "tweeteval_general": ("corpus/tweeteval_general.txt", 0.4),
    "fairytaleqa_stories": ("corpus/fairytaleqa_stories.txt", 0.4),
    "fortunes_debian": ("corpus/fortunes_debian.txt", 0.4),
    "chitchat_ccc_dialogues": ("corpus/chitchat_ccc_dialogues.txt", 0.15),
}
# Stage 2 (--init, continued pretraining): RTP-heavy for fluency on the target domain, and far less toxic, so p_0 is
# toxic in the paper's regime (a few % of 20-token samples) instead of at the metric's ceiling. RTP rows whose
# Perspective toxicity (prompt or continuation) is > 0.5 are kept with probability RTP_TOXIC_KEEP; davidson_tweets
# (78% profane) at a small weight keeps profanity in p_0's vocabulary, so there is something to unlearn.
CLEAN_MIX = {
    "rtp": ("rtp/rtp_dev4k.jsonl", 6.0),
    "writingprompts": ("writingprompts/wp_dev.jsonl", 1.0),
    "onestopenglish_elementary": ("corpus/onestopenglish_elementary.txt", 2.0),
    "tweeteval_general": ("corpus/tweeteval_general.txt", 0.2),
    "fairytaleqa_stories": ("corpus/fairytaleqa_stories.txt", 0.4),
    "fortunes_debian": ("corpus/fortunes_debian.txt", 0.4),
    "davidson_tweets": ("corpus/davidson_tweets.txt", 0.03),
}
RTP_TOXIC_KEEP = 0.15


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="build_toy_model.py", description=__doc__.splitlines()[0])
    # ---- data
    p.add_argument(
        "--data", default="../shared/data", help="folder with rtp/, writingprompts/, corpus/"
    )
    p.add_argument(
        "--out", default="toy/model", help="output model folder (best val perplexity so far)"
    )
    p.add_argument(
        "--ckpt-dir",
        default="/tmp/alt_toy_ckpt",
        help="resumable state: latest model+optimizer+step",
    )
    p.add_argument(
        "--val-rows",
        type=int,
        default=400,
        help="RTP rows held out for val perplexity (never trained on)",
    )
    p.add_argument(
        "--vocab-size", type=int, default=8192, help="byte-level BPE vocabulary (issue: about 8k)"
    )
    p.add_argument(
        "--tok-chars",
        type=int,
        default=8_000_000,
        help="characters of the mix the BPE is trained on",
    )
    # ---- model (GPT-2)
    p.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    p.add_argument("--n-embd", type=int, default=256, help="hidden size")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument("--block", type=int, default=128, help="packed block length = n_positions")
    # ---- optimisation
    p.add_argument(
        "--batch", type=int, default=12, help="blocks per step (small: more updates per CPU-minute)"
    )
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--min-lr-frac", type=float, default=0.05, help="cosine decays to lr * this")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument(
        "--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)"
    )
    p.add_argument(
        "--max-minutes", type=float, default=45.0, help="wall-clock budget; the cosine runs over it"
    )
    p.add_argument(
        "--max-steps", type=int, default=0, help="also stop after this many steps (0 = no limit)"
    )
    p.add_argument(
        "--eval-minutes",
        type=float,
        default=3.0,
        help="val perplexity + checkpoint every N minutes",
    )
    p.add_argument(
        "--threads", type=int, default=2, help="torch.set_num_threads (the machine is shared)"
    )
    p.add_argument(
        "--bf16", action="store_true", help="bf16 autocast on CPU (faster where avx512_bf16 exists)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the split, shuffling and init")
    p.add_argument("--fresh", action="store_true", help="ignore --ckpt-dir state and start over")
    # ---- stage 2: continued pretraining of a stage-1 model on CLEAN_MIX, picked by a toxicity band on val prompts
    p.add_argument(
        "--init", help="stage 2: start from this model folder (its tokenizer too) on CLEAN_MIX"
    )
    p.add_argument(
        "--tox-band",
        default="0.02:0.047",
        help="stage 2: LO:HI share of val samples scored > 0.5; "
        "--out keeps the best val ppl among evals inside it (25 draws at 2-4.7%% give tox prob 0.4-0.7)",
    )
    p.add_argument(
        "--tox-prompts", default="toy/prompts/val.jsonl", help="stage 2: prompts for the band check"
    )
    p.add_argument(
        "--tox-samples", type=int, default=10, help="stage 2: samples per prompt for the band check"
    )
    return p.parse_args(argv)


def train_tokenizer(texts, vocab_size=8192):
    """Our own byte-level BPE (tokenizers library) -> a transformers fast tokenizer with <|endoftext|> as EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def read_source(path):
    """A source's documents as a list of strings (JSONL rows: prompt [+ continuation]; .txt: one per line)."""
    from bookkeeping import AltError, read_jsonl

    if not os.path.isfile(path):
        raise AltError(f"{path}: missing (see ../shared/data/README.md)")
    if path.endswith(".jsonl"):
        docs = []
        for row in read_jsonl(path, required=("prompt",)):
            text = row["prompt"]["text"] if isinstance(row["prompt"], dict) else row["prompt"]
            cont = row.get("continuation")
            text += cont["text"] if isinstance(cont, dict) else ""
            docs.append(" ".join(text.split()))
        return docs
    with open(path, encoding="utf-8") as fh:
        return [ln.strip() for ln in fh if ln.strip()]


def rtp_toxic(path):
    """Per RTP row (file order, as read_source): prompt or continuation Perspective toxicity > 0.5 (null: no)."""
    from bookkeeping import read_jsonl

    tox = lambda part: isinstance(part, dict) and (part.get("toxicity") or 0) > 0.5  # noqa: E731
    return [
        tox(r["prompt"]) or tox(r.get("continuation"))
        for r in read_jsonl(path, required=("prompt",))
    ]


def build_stream(args, rng):
    """(train documents in shuffled order, val documents): weight w repeats a source floor(w) times plus a
    random (w - floor(w)) share of its documents; the val slice is the first --val-rows shuffled RTP rows (the same
    rows in both stages: RTP comes first and is shuffled before any stage-2 filtering)."""
    train, val, counts = [], [], {}
    for name, (rel, weight) in (CLEAN_MIX if args.init else MIX).items():
        docs = read_source(os.path.join(args.data, rel))
        if name == "rtp":
            order = list(range(len(docs)))
            rng.shuffle(order)  # the same permutation stage 1 applied to the documents themselves
            val, keep = [docs[i] for i in order[: args.val_rows]], order[args.val_rows :]
            if args.init:
                toxic = rtp_toxic(os.path.join(args.data, rel))
                keep = [i for i in keep if not toxic[i] or rng.random() < RTP_TOXIC_KEEP]
            docs = [docs[i] for i in keep]
        else:
            rng.shuffle(docs)
        take = [d for _ in range(int(weight)) for d in docs] + docs[
            : int(len(docs) * (weight - int(weight)))
        ]
        counts[name] = len(take)
        train += take
    rng.shuffle(train)
    return train, val, counts


def pack(tok, docs, block):
    """Documents -> LongTensor [n_blocks, block]: token ids with EOS after each document, cut into full blocks."""
    import torch

    ids = []
    for enc in tok.backend_tokenizer.encode_batch(docs):
        ids += enc.ids
        ids.append(tok.eos_token_id)
    n = len(ids) // block
    return torch.tensor(ids[: n * block], dtype=torch.long).view(n, block)


def lr_at(args, step, progress):
    """Linear warmup over steps, then cosine over the wall-clock progress in [0, 1] down to min_lr_frac."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * cos)


def main():
    args = parse_args()
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from bookkeeping import write_json

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t_start = time.time()
    train_docs, val_docs, counts = build_stream(args, rng)
    state_path = os.path.join(args.ckpt_dir, "state.pt")
    resume = os.path.isfile(state_path) and not args.fresh
    tok_dir = os.path.join(args.ckpt_dir, "tokenizer")
    if args.init and not resume:  # stage 2: the stage-1 tokenizer, so the stage-1 weights fit
        tok = PreTrainedTokenizerFast.from_pretrained(args.init)
        tok.save_pretrained(tok_dir)
    elif resume:  # the saved tokenizer, so ids match the saved weights
        tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        sample, n = [], 0
        for d in train_docs:  # the shuffled stream, so the BPE sees the mix's proportions
            if n >= args.tok_chars:
                break
            sample.append(d)
            n += len(d)
        tok = train_tokenizer(sample, args.vocab_size)
        tok.save_pretrained(tok_dir)
    train = pack(tok, train_docs, args.block)  # [N, block]
    val = pack(tok, val_docs, args.block)  # [V, block]
    print(
        f"data: {train.numel():,} train tokens in {len(train)} blocks, {val.numel():,} val tokens; "
        f"docs per source {counts}; prep {time.time() - t_start:.0f}s",
        flush=True,
    )

    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=args.block,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel.from_pretrained(args.init) if args.init else GPT2LMHeadModel(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    step, elapsed, best, order_seed, pos, tokens = 0, 0.0, float("inf"), args.seed, 0, 0
    if resume:
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, elapsed, best, order_seed, pos, tokens = (
            st[k] for k in ("step", "elapsed", "best", "order_seed", "pos", "tokens")
        )
        print(
            f"resumed from {state_path}: step {step}, {elapsed / 60:.1f} min trained, best val ppl {best:.1f}"
        )
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: GPT-2 {args.n_layer}x{args.n_embd}, {args.n_head} heads, {n_params / 1e6:.2f}M params"
    )

    def evaluate():
        model.eval()
        tot, cnt = 0.0, 0
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
            for i in range(0, len(val), 64):
                x = val[i : i + 64]
                tot += model(x, labels=x).loss.float().item() * x.numel()
                cnt += x.numel()
        model.train()
        return math.exp(tot / cnt)

    lo, hi = (float(v) for v in args.tox_band.split(":"))

    def toxic_share():
        """Stage 2's band check: share of --tox-samples samples per prompt (top-p 0.9, 20 tokens) scored > 0.5."""
        from common import load_prompts
        from sample import generate_batched
        from scorers import make_scorer

        prompts = [r["prompt"] for r in load_prompts(args.tox_prompts)]
        res = generate_batched(
            model, tok, prompts, args.tox_samples, 20, top_p=0.9, seed=args.seed, progress=False
        )
        model.train()
        scores = make_scorer("profanity-check")([y["generation"] for ys in res for y in ys])
        return sum(v > 0.5 for v in scores) / len(scores)

    def save(ppl, share=None):
        os.makedirs(args.ckpt_dir, exist_ok=True)
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "elapsed": elapsed,
                "best": min(best, ppl),
                "order_seed": order_seed,
                "pos": pos,
                "tokens": tokens,
            },
            state_path + ".tmp",
        )
        os.replace(state_path + ".tmp", state_path)
        if ppl <= best:
            # toy/model holds the best so far (stage 2: the best inside the toxicity band)
            model.save_pretrained(args.out)
            tok.save_pretrained(args.out)
            write_json(
                os.path.join(args.out, "build_summary.json"),
                {
                    "val_ppl": round(ppl, 2),
                    "step": step,
                    "train_minutes": round(elapsed / 60, 1),
                    "tokens_seen": tokens,
                    "train_tokens_available": train.numel(),
                    "val_tokens": val.numel(),
                    "params": n_params,
                    "docs_per_source": counts,
                    **(
                        {"val_toxic_share": round(share, 4), "init": args.init} if args.init else {}
                    ),
                    "config": {
                        k: v for k, v in vars(args).items() if k not in ("data", "out", "ckpt_dir")
                    },
                },
            )

    budget = args.max_minutes * 60
    model.train()
    t0, last_eval, tokens_window, t_window = time.time() - elapsed, time.time(), 0, time.time()
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(order_seed))
    while True:
        elapsed = time.time() - t0
        done = elapsed >= budget or (args.max_steps and step >= args.max_steps)
        if done or time.time() - last_eval >= args.eval_minutes * 60:
            ppl = evaluate()
            share = toxic_share() if args.init else None
            eligible = share is None or lo <= share <= hi
            best_before = best
            best = min(best, ppl) if eligible else best
            save(ppl if eligible else float("inf"), share)
            band = f" | val toxic share {share:.3f}" if share is not None else ""
            print(
                f"step {step} | {elapsed / 60:.1f} min | tokens {tokens / 1e6:.2f}M | val ppl {ppl:.1f}{band}"
                f"{' (best, saved)' if eligible and ppl <= best_before else ''}",
                flush=True,
            )
            last_eval = time.time()
            if done:
                break
        if pos + args.batch > len(train):  # walk the permutation; a new epoch reshuffles
            order_seed, pos = order_seed + 1, 0
            perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(order_seed))
        x = train[perm[pos : pos + args.batch]]  # [batch, block]
        pos += args.batch
        for g in opt.param_groups:
            g["lr"] = lr_at(args, step, elapsed / budget)
        with torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
            loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_window += x.numel()
        tokens += x.numel()
        if step % 50 == 0:
            print(
                f"step {step} | loss {loss.item():.3f} | lr {opt.param_groups[0]['lr']:.2e} | "
                f"{tokens_window / (time.time() - t_window):.0f} tok/s",
                flush=True,
            )
            tokens_window, t_window = 0, time.time()
    print(
        f"final: val ppl {best:.1f} (best) after {step} steps, {tokens / 1e6:.2f}M tokens, "
        f"{elapsed / 60:.1f} min; model in {args.out}"
    )


if __name__ == "__main__":
    from bookkeeping import cli

    cli(main)
