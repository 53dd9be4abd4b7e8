"""prepare_rtp_splits.py: the paper's RealToxicityPrompts (RTP) splits, built as the official ALT
code builds them, in the prompt schema every stage reads ({"id", "prompt"}, common.load_prompts).

    test  = DExperts' 10k non-toxic prompts (nontoxic_prompts-10k.jsonl, a local copy): 10,000
    val   = --val-size rows (paper: 5,000) of the other RTP prompts, random.seed(42), shuffled
    train = the rest: about 84k with the full RTP (99,442 prompts - 10,000 test - 5,000 val)

"The other RTP prompts" are those whose text is not a test prompt's, so no test prompt reaches
train or val, even when RTP holds the same text twice. train and val keep RTP's order; ids are
"rtp-N" (N: the row in RTP) and "test-N" (the row in the 10k file). Each file is written atomically
(bookkeeping.write_jsonl): a crash never leaves half a file.

Launch:
    python prepare_rtp_splits.py --test nontoxic_prompts-10k.jsonl --out data/rtp
    python prepare_rtp_splits.py --rtp rtp.jsonl --test nontoxic_prompts-10k.jsonl --out data/rtp
    python alt_loop.py --preset paper-toxicity --prompts-dir data/rtp
"""

import argparse
import os
import random

import bookkeeping
import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--rtp",
        default="allenai/real-toxicity-prompts",
        help="all RTP prompts: a `datasets` name (paper: allenai/real-toxicity-prompts) "
        'or a local JSONL of RTP rows {"prompt": {"text": ...}}',
    )
    p.add_argument("--split", default="train", help="dataset split when --rtp is a `datasets` name")
    p.add_argument(
        "--test",
        required=True,
        help="DExperts' nontoxic_prompts-10k.jsonl (RTP rows), the paper's test set",
    )
    p.add_argument(
        "--out",
        default=os.path.join("data", "rtp"),
        help="folder for train.jsonl, val.jsonl, test.jsonl",
    )
    p.add_argument("--val-size", type=int, default=5000, help="val prompts (official code: 5,000)")
    p.add_argument(
        "--seed", type=int, default=42, help="random.seed of the val draw (official code: 42)"
    )
    args = p.parse_args(argv)
    if args.val_size < 1:
        p.error(f"--val-size must be >= 1, got {args.val_size}")
    return args


def main(argv=None):
    args = parse_args(argv)
    test = common.load_prompts(args.test)
    local = os.path.isfile(args.rtp)  # a `datasets` source needs the dotted field, a file does not
    rtp = common.load_prompts(args.rtp, split=args.split, field=None if local else "prompt")
    held_out = {r["prompt"] for r in test}
    rest = [(i, r["prompt"]) for i, r in enumerate(rtp) if r["prompt"] not in held_out]
    if len(rest) <= args.val_size:
        raise bookkeeping.AltError(
            f"{args.rtp}: {len(rest)} prompts outside the test set, not more "
            f"than --val-size {args.val_size}"
        )
    random.seed(args.seed)  # the official recipe: seed the global RNG, shuffle, take the first rows
    order = list(range(len(rest)))
    random.shuffle(order)
    val_idx = set(order[: args.val_size])
    splits = {
        "train": [r for j, r in enumerate(rest) if j not in val_idx],
        "val": [r for j, r in enumerate(rest) if j in val_idx],
        "test": list(enumerate(r["prompt"] for r in test)),
    }
    for name, rows in splits.items():
        tag = "test" if name == "test" else "rtp"
        bookkeeping.write_jsonl(
            os.path.join(args.out, f"{name}.jsonl"),
            [{"id": f"{tag}-{i}", "prompt": text} for i, text in rows],
        )
    dropped = len(rtp) - len(rest)
    print(
        f"wrote {args.out}/{{train,val,test}}.jsonl: {len(splits['train'])} + "
        f"{len(splits['val'])} + {len(splits['test'])} prompts ({dropped} RTP rows are test "
        f"prompts, left out of train and val)"
    )


if __name__ == "__main__":
    bookkeeping.cli(main)
