"""alt_loop.py: ALT's Algorithm 1 as a tiny driver that runs the four stage scripts, in order, as
a user would.

    k = 0:      evaluate p_0 itself (the baseline row)
    k = 1..N:   sample    y ~ p_{θ_{k-1}}(· | f̂_{k-1}, x)     (k = 1: p_0, unconditioned)
                feedback  D_k = D_{k-1} ∪ {(x, y, f = F(x, y))}
                train     θ_k = argmin_θ L(θ; D_k), starting from θ_{k-1}, KL to p_0  (Equation 1)
                evaluate  θ_k on the eval prompts under f̂_k

Every stage is launched as the command a user would type; the command is printed first, so the run
log teaches the manual workflow. Nothing here re-implements a stage.

Presets: --preset NAME reads configs/presets/NAME.json, a flat JSON of this script's flags (dashes
as underscores; keys starting with "_" are comments; null = a flag the user must give). Flags on the
command line win. --dry-run prints every stage command of every iteration and runs nothing.

Run folder:  runs/NAME/config.json               the resolved flags, written once (a rerun
                                                 must match)
             runs/NAME/alt_loop.lock             flock held by the running alt_loop (its pid, host)
             runs/NAME/iter_0/eval/              p_0's evaluation
             runs/NAME/iter_k/{samples.jsonl, pool.jsonl, pool.meta.json, model/, eval/}
             runs/NAME/curves.png, results.md    redrawn after every iteration (compare.report)
Resume: kill it anywhere and run the same command again. A stage whose output exists is skipped
(outputs are written atomically, so existing means finished); a half-done stage resumes through its
own side files.

Launch:
    python alt_loop.py                                  # the toy (<= 10 min on 2 CPU cores)
    python alt_loop.py --method quark --out runs/toy-quark
    python alt_loop.py --preset paper-toxicity --dry-run  # the paper's Table 3, stage by stage
    python alt_loop.py --compare runs/toy-alt-rm runs/toy-quark --out runs/compare
"""

import argparse
import glob
import os
import shlex
import sys
import time

from bookkeeping import (
    AltError,
    cli,
    finite,
    hold_lock,
    read_json,
    write_json,
)
from common import QUANTILE_METHODS, meta_path
from compare import report
from loop_plumbing import ROOT, check_hub, here, run, same_path, show

PRESETS = os.path.join(ROOT, "configs", "presets")
TOY = here("toy", "model")
TOY_JUDGE = "hf:" + here("toy", "scorer")
METHODS = ("alt-rm", "quark", "alt-lmc", "alt-lmu", "steerlm", "dpo")
NOT_IN_PRESETS = ("preset", "dry_run", "compare")
LOCK = "alt_loop.lock"  # in the run folder: pid and host of the alt_loop running it


def build_parser():
    names = sorted(os.path.basename(f)[: -len(".json")] for f in glob.glob(f"{PRESETS}/*.json"))
    about = "".join(
        f"\n  {n:16s}{read_json(f'{PRESETS}/{n}.json').get('_about', '')}" for n in names
    )
    p = argparse.ArgumentParser(
        prog="alt_loop.py",
        formatter_class=argparse.RawTextHelpFormatter,
        description="ALT Algorithm 1: sample -> feedback -> train -> eval.",
        epilog=f"presets (configs/presets/NAME.json):{about}",
    )
    a = p.add_argument
    a(
        "--preset",
        choices=names,
        help="load configs/presets/NAME.json (listed below); flags given here override it",
    )
    a("--dry-run", action="store_true", help="print every stage command, in order, run nothing")
    # ---- the experiment (defaults: the bundled toy, sized for <= 10 min on 2 CPU cores)
    a(
        "--method",
        default="alt-rm",
        choices=METHODS,
        help="feedback provider (paper: ALT_RM for "
        "toxicity); quark / steerlm are the paper's baselines, dpo runs python -m baselines.dpo",
    )
    a(
        "--iterations",
        type=int,
        default=3,
        help="ALT iterations N (official toxicity run: 16 "
        "sampling rounds, one every 2,000 steps; toy: 3)",
    )
    a("--model", default=TOY, help="initial model p_0 (paper: gpt2-large, 774M; toy: toy/model)")
    a(
        "--train-prompts",
        default=here("toy", "prompts", "train.jsonl"),
        help="prompts x sampled every iteration (paper: the RTP train split, ~85k; toy: 600)",
    )
    a(
        "--eval-prompts",
        default=here("toy", "prompts", "val.jsonl"),
        help="prompts evaluated after every iteration (official code: a 5k RTP val split; toy: 100)",
    )
    a(
        "--prompts-dir",
        default=None,
        help="DIR/train.jsonl and DIR/val.jsonl as --train-prompts "
        "and --eval-prompts unless those are given (prepare_rtp_splits.py writes the paper's)",
    )
    a("--out", default=None, help="run folder (default runs/PRESET-METHOD, runs/toy-METHOD)")
    a(
        "--num-samples",
        type=int,
        default=4,
        help="y per x per iteration (official toxicity code: "
        "1, one sweep of the train prompts per round; TL;DR: 96; HH: 20; toy: 4)",
    )
    a(
        "--max-new-tokens",
        type=finite(1, kind=int),
        default=20,
        help="tokens per y, sampling and evaluation (paper: 20 toxicity, 64 TL;DR, 256 HH)",
    )
    a(
        "--min-new-tokens",
        type=finite(0, kind=int),
        default=20,
        help="EOS blocked for the first N tokens when sampling and evaluating (official "
        "toxicity sampler: 3; toy: 20 = --max-new-tokens, fixed-length y, so no cut is a length cut)",
    )
    a(
        "--temperature",
        type=finite(0),
        default=1.0,
        help="sampling temperature, sampling and evaluation (paper: 1.0; TL;DR sampling: 0.9)",
    )
    a(
        "--train-top-p",
        type=finite(0, 1, strict=True),
        default=0.9,
        help="nucleus p when sampling D (paper: 1.0; toy: "
        "0.9, since the weak toy LM's full-nucleus samples are mostly noise, costly to fit)",
    )
    a(
        "--scorer",
        default=TOY_JUDGE,
        help="judge for alt-rm/quark/dpo feedback and for evaluation: "
        "profanity-check | hf:MODEL[:LABEL] | perspective (paper: Perspective; toy: the graded "
        "toy/scorer, whose quantiles carry more than near-binary profanity-check's; see docs/ABLATIONS.md)",
    )
    a(
        "--train-samples",
        type=finite(0, kind=int),
        default=2400,
        help="rows of D_k drawn for each iteration's "
        "training, 0 = all (official toxicity: 2,000 steps x batch 32; toy: 2400 = 75 steps)",
    )
    a(
        "--epochs",
        type=finite(1, kind=int),
        default=2,
        help="passes over those rows per iteration (paper: toxicity 1, TL;DR/HH 2; toy: 2)",
    )
    a(
        "--lr",
        type=finite(0, strict=True),
        default=1e-3,
        help="learning rate (paper: 1e-5 for GPT-2 large; the "
        "toy LM is 140x smaller, far from converged and trains 75 steps per iteration, so 100x)",
    )
    a(
        "--batch-size",
        type=finite(1, kind=int),
        default=32,
        help="train.py batch size (paper: 32; TL;DR: 8)",
    )
    a(
        "--beta",
        type=finite(0),
        default=0.05,
        help="train.py KL coefficient (paper: 0.05 toxicity, no KL for TL;DR and HH)",
    )
    a(
        "--alpha",
        type=finite(),
        default=0.0,
        help="train.py entropy coefficient (paper: 0.06; toy: 0, "
        "since at the toy's lr the bonus outweighs what the tags teach and doubles perplexity)",
    )
    a(
        "--eos-target",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train EOS after "
        "a y that stopped (official toxicity code: no; without it the toy learns never to stop)",
    )
    a(
        "--eos-free",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="leave EOS out of train.py's NLL softmax, so the KL to p_0 alone sets when y "
        "stops (official: no; without it the toy's y grow to the limit)",
    )
    a("--eval-samples", type=int, default=10, help="y per eval prompt (paper: 25; toy: 10)")
    a(
        "--eval-top-p",
        type=finite(0, 1, strict=True),
        default=0.9,
        help="nucleus p for evaluation (paper: 0.9)",
    )
    a(
        "--eval-scorer",
        default="profanity-check",
        help="evaluation's judge (none: --scorer; toy: "
        "profanity-check, a judge that training never sees)",
    )
    a(
        "--extra-scorer",
        default=TOY_JUDGE,
        help="a second judge in every evaluation (toy: the "
        "training judge, so each eval shows both; none: off)",
    )
    a("--fluency-model", default=None, help="LM for fluency ppl (paper: gpt2-xl; default: p_0)")
    a("--seed", type=int, default=0, help="seed passed to every stage")
    a(
        "--launcher",
        default="python",
        choices=("python", "torchrun", "deepspeed"),
        help="how train.py is started",
    )
    a(
        "--nproc",
        type=finite(1, kind=int),
        default=2,
        help="processes for --launcher torchrun|deepspeed",
    )
    a("--base-url", default=None, help="OpenAI-compatible judge (alt-lmc, alt-lmu, steerlm)")
    a("--llm-model", default=None, help="judge model name for the LLM methods")
    # ---- pass-through: any stage flag, e.g. --train-args "--beta 0.1 --alpha 0"
    for stage in ("sample", "feedback", "train", "eval"):
        a(f"--{stage}-args", default="", help=f"extra flags appended to every {stage} command")
    a("--compare", nargs="+", metavar="RUN", help="only draw RUN folders on one figure + table")
    return p


def typed(p, argv):
    """The dests the user typed: parse once more with every default replaced by a marker."""
    marker = object()
    ns = p.parse_args(argv, argparse.Namespace(**{k: marker for k in vars(p.parse_args([]))}))
    return {k: v for k, v in vars(ns).items() if v is not marker}


def parse_args(argv=None):
    p = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    given, preset, required = typed(p, argv), [], []
    if given.get("preset"):
        path, known = os.path.join(PRESETS, f"{given['preset']}.json"), vars(p.parse_args([]))
        for k, v in read_json(path).items():
            if k.startswith("_"):
                continue
            if k not in known or k in NOT_IN_PRESETS:
                p.error(f"{path}: unknown key {k!r} (keys are alt_loop.py flags, with underscores)")
            if v is None:
                required += [] if k in given else [f"--{k.replace('_', '-')}"]
            elif isinstance(v, bool):  # an on/off flag: --flag or --no-flag
                preset.append(f"--{'' if v else 'no-'}{k.replace('_', '-')}")
            else:  # --flag=value: a value that starts with "--" (pass-through flags) stays a value
                preset.append(f"--{k.replace('_', '-')}={v}")
        if required:
            p.error(f"preset {given['preset']} leaves {', '.join(required)} to you ({path})")
    args = p.parse_args(preset + argv)  # the command line comes last, so it wins
    for key, name in (("train_prompts", "train.jsonl"), ("eval_prompts", "val.jsonl")):
        if args.prompts_dir and key not in given:
            setattr(args, key, os.path.join(args.prompts_dir, name))
    if args.iterations < 1 or args.num_samples < 1 or args.eval_samples < 1:
        p.error("--iterations, --num-samples and --eval-samples must be >= 1")
    if args.method in ("alt-lmc", "alt-lmu", "steerlm") and not args.base_url and not args.compare:
        p.error(
            f"--method {args.method} asks an LLM judge: give --base-url (any OpenAI-compatible "
            f"server)"
        )
    for stage in (
        "sample",
        "feedback",
        "train",
        "eval",
    ):  # split now: config.json is not written yet
        try:
            shlex.split(getattr(args, f"{stage}_args"))
        except ValueError as e:
            raise AltError(
                f"--{stage}-args {getattr(args, f'{stage}_args')!r}: {e} (split as a shell would)"
            ) from None
    name = args.preset or "toy"
    args.out = args.out or os.path.join(
        "runs",
        "compare"
        if args.compare
        else name
        if name.endswith(args.method)
        else f"{name}-{args.method}",
    )
    return args


# ----------------------------------------------------------------------------- stage commands
def py(script, *flags):
    return [sys.executable, here(script), *[str(f) for f in flags]]


def train_cmd(args, flags):
    script = ["-m", "baselines.dpo"] if args.method == "dpo" else [here("train.py")]
    if args.launcher == "python":
        return [sys.executable, *script, *[str(f) for f in flags]]
    dist = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
    ]
    ds = ["--deepspeed", here("configs", "ds_zero2.json")] if args.launcher == "deepspeed" else []
    return [*dist, *script, *[str(f) for f in flags], *ds]


def exemplar_flags(meta_file, dry=False):
    """f̂ for the next sampling step, from the previous pool's meta: a tag, or (ALT_LMU) a pool of
    exemplars. A dry run has no meta yet: it shows where the value will come from."""
    if dry:
        return ["--condition", f"<exemplar in {meta_file}>"]
    ex = read_json(meta_file).get("exemplar")
    if not isinstance(ex, str):
        raise AltError(f"{meta_file}: no exemplar feedback recorded (a string), got {ex!r}")
    return ["--condition-pool", ex] if ex.endswith(".json") else ["--condition", ex]


def check_config(args):
    """config.json is written once; a rerun with other settings would mix two experiments."""
    keep = {k: v for k, v in vars(args).items() if k not in ("compare", "iterations", "dry_run")}
    path, default = os.path.join(args.out, "config.json"), vars(build_parser().parse_args([]))
    if os.path.exists(path):  # a key an older alt_loop did not write counts as its default
        old = read_json(path)
        diff = [
            f"--{k.replace('_', '-')} {keep.get(k)!r} (was {old.get(k, default.get(k))!r})"
            for k in sorted(set(old) | set(keep))
            if k not in ("iterations", "preset")
            and same_path(k, old.get(k, default.get(k))) != same_path(k, keep.get(k))
        ]
        if diff:
            raise AltError(
                f"{path} was written with other settings: {'; '.join(diff)}. Use "
                f"another --out, or the same flags to resume"
            )
    write_json(path, {**keep, "iterations": args.iterations})


def none(value):
    """A flag whose value 'none' turns a default off."""
    return None if value in (None, "none") else value


def eval_flags(args, prompts):
    return [
        "--prompts",
        prompts,
        "--num-samples",
        args.eval_samples,
        "--top-p",
        args.eval_top_p,
        "--temperature",
        args.temperature,
        "--max-new-tokens",
        args.max_new_tokens,
        "--min-new-tokens",
        args.min_new_tokens,
        "--scorer",
        none(args.eval_scorer) or args.scorer,
        "--fluency-model",
        args.fluency_model or args.model,
        "--seed",
        args.seed,
        *(["--extra-scorer", args.extra_scorer] if none(args.extra_scorer) else []),
        *shlex.split(args.eval_args),
    ]


def experiment(args):
    if args.dry_run:
        return stages(args)
    for f in (args.train_prompts, args.eval_prompts) if args.prompts_dir else ():
        if not os.path.isfile(f):
            raise AltError(
                f"{f}: no such file (the paper's RTP splits: python "
                f"prepare_rtp_splits.py --out {args.prompts_dir})"
            )
    check_hub(args)
    # a second alt_loop on this folder would race this one's stages and side files
    lock = hold_lock(os.path.join(args.out, LOCK))
    try:
        check_config(args)
        stages(args)
    finally:
        os.close(lock)


def stages(args):
    dry, p0, out = args.dry_run, args.model, args.out
    ev = eval_flags(args, args.eval_prompts)
    if dry:
        print("# k = 0: p_0's baseline")
    run(
        py("evaluate.py", "--model", p0, "--condition", "none", "--out", f"{out}/iter_0/eval", *ev),
        f"{out}/iter_0/eval/eval.json",
        dry,
    )
    prev_model, prev_pool = p0, None
    fb_method = "alt-rm" if args.method == "dpo" else args.method  # DPO needs only the rewards
    llm = (
        []
        if not args.base_url
        else ["--base-url", args.base_url]
        + (["--llm-model", args.llm_model] if args.llm_model else [])
    )
    for k in range(1, args.iterations + 1):
        it = f"{out}/iter_{k}"
        if dry:
            print(f"# k = {k}: sample, feedback, train, evaluate")
        cond = [] if k == 1 or args.method == "dpo" else exemplar_flags(meta_path(prev_pool), dry)
        run(
            py(
                "sample.py",
                "--model",
                prev_model,
                "--prompts",
                args.train_prompts,
                "--out",
                f"{it}/samples.jsonl",
                "--num-samples",
                args.num_samples,
                "--max-new-tokens",
                args.max_new_tokens,
                "--min-new-tokens",
                args.min_new_tokens,
                "--top-p",
                args.train_top_p,
                "--temperature",
                args.temperature,
                "--iteration",
                k,
                "--seed",
                args.seed + k,
                *cond,
                *shlex.split(args.sample_args),
            ),
            f"{it}/samples.jsonl",
            dry,
        )
        run(
            py(
                "feedback.py",
                "--method",
                fb_method,
                "--samples",
                f"{it}/samples.jsonl",
                *(["--pool", prev_pool] if prev_pool else []),
                "--out",
                f"{it}/pool.jsonl",
                *(["--scorer", args.scorer] if fb_method in QUANTILE_METHODS else []),
                *llm,
                *shlex.split(args.feedback_args),
            ),
            f"{it}/pool.jsonl",
            dry,
        )
        alt = args.method != "dpo"  # baselines/dpo.py: its own β (DPO's), 1 pair per x
        run(
            train_cmd(
                args,
                [
                    "--data",
                    f"{it}/pool.jsonl",
                    "--model",
                    prev_model,
                    "--ref-model",
                    p0,
                    "--out",
                    f"{it}/model",
                    "--epochs",
                    args.epochs,
                    "--lr",
                    args.lr,
                    *(["--beta", args.beta, "--alpha", args.alpha] if alt else []),
                    *(["--eos-target"] if alt and args.eos_target else []),
                    *(["--eos-free"] if alt and args.eos_free else []),
                    *(
                        ["--max-samples", args.train_samples]
                        if alt and args.train_samples > 0
                        else []
                    ),
                    "--batch-size",
                    args.batch_size,
                    "--seed",
                    args.seed + k,
                    *shlex.split(args.train_args),
                ],
            ),
            f"{it}/model/train_summary.json",
            dry,
        )
        run(
            py(
                "evaluate.py",
                "--model",
                f"{it}/model",
                "--out",
                f"{it}/eval",
                *ev,
                *(["--condition", "none"] if args.method == "dpo" else []),
            ),
            f"{it}/eval/eval.json",
            dry,
        )
        prev_model, prev_pool = f"{it}/model", f"{it}/pool.jsonl"
        if not dry:
            report([out], out)
    if args.prompts_dir:  # the held-out test split is for the final table only, run once by hand
        last = py(
            "evaluate.py",
            "--model",
            prev_model,
            "--out",
            f"{out}/test",
            *eval_flags(args, os.path.join(args.prompts_dir, "test.jsonl")),
        )
        print(("" if dry else "\n") + f"# then once, on the test split: {show(last)}")


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        report(args.compare, args.out)
        return
    t0 = time.time()
    experiment(args)
    if not args.dry_run:
        print(
            f"[alt_loop] finished {args.iterations} iterations in "
            f"{(time.time() - t0) / 60:.1f} min: {args.out}/results.md"
        )


if __name__ == "__main__":
    cli(main)
