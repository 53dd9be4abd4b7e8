"""alt_loop.py: ALT's Algorithm 1 as a tiny driver that runs the four stage scripts, in order, as
a user would.

    k = 0:      evaluate p_0 itself (the baseline row)
    k = 1..N:   sample    y ~ p_{θ_{k-1}}(· | f̂_{k-1}, x)     (k = 1: p_0, unconditioned)
                feedback  D_k = D_{k-1} ∪ {(x, y, f = F(x, y))}
                train     θ_k = argmin_θ L(θ; D_k) from θ_{k-1}, KL to p_0  (Equation 1)
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

from bookkeeping import AltError, cli, finite, hold_lock, read_json, write_json
from common import QUANTILE_METHODS, meta_path
from compare import report
from loop_plumbing import ROOT, check_hub, here, run, same_path, show

PRESETS = os.path.join(ROOT, "configs", "presets")
TOY = here("toy", "model")
TOY_TRAIN, TOY_VAL = here("toy", "prompts", "train.jsonl"), here("toy", "prompts", "val.jsonl")
TOY_JUDGE = "hf:" + here("toy", "scorer")
METHODS = ("alt-rm", "quark", "alt-lmc", "alt-lmu", "steerlm", "dpo")
LAUNCHERS = ("python", "torchrun", "deepspeed")
STAGES = ("sample", "feedback", "train", "eval")  # --STAGE-args: extra flags for each command
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
        description="ALT Algorithm 1: sample -> feedback -> train -> eval.\ndefaults: the toy; "
        "why each differs from the paper: configs/presets/toy.json",
        epilog=f"presets (configs/presets/NAME.json):{about}",
    )
    a, onoff = p.add_argument, argparse.BooleanOptionalAction
    n1, n0, p01 = finite(1, kind=int), finite(0, kind=int), finite(0, 1, strict=True)
    a("--preset", choices=names, help="load configs/presets/NAME.json (below); flags given win")
    a("--dry-run", action="store_true", help="print every stage command, in order, run nothing")
    # ---- the experiment (defaults: the toy, <= 10 min on 2 CPUs; why: configs/presets/toy.json)
    a("--method", default="alt-rm", choices=METHODS, help="feedback F (paper: ALT_RM for toxicity)")
    a("--iterations", type=n1, default=6, help="iterations N (official toxicity: 16 x 2,000 steps)")
    a("--model", default=TOY, help="initial model p_0 (paper: gpt2-large, 774M; toy: toy/model)")
    a("--train-prompts", default=TOY_TRAIN, help="x to sample (paper: RTP train, ~85k; toy: 600)")
    a("--eval-prompts", default=TOY_VAL, help="x to evaluate (official: 5k RTP val; toy: 100)")
    a("--prompts-dir", help="DIR/{train,val}.jsonl unless given (prepare_rtp_splits.py)")
    a("--out", help="run folder (default runs/PRESET-METHOD, runs/toy-METHOD)")
    a("--num-samples", type=n1, default=2, help="y per x (official: 1; TL;DR: 96; HH: 20; toy: 2)")
    a("--max-new-tokens", type=n1, default=20, help="tokens (paper: 20 toxicity, 64 TL;DR, 256 HH)")
    a("--min-new-tokens", type=n0, default=20, help="no EOS for N tokens (official: 3; toy: 20)")
    a("--temperature", type=finite(0), default=1.0, help="sample and eval (paper: 1.0; TL;DR: 0.9)")
    a("--train-top-p", type=p01, default=0.9, help="nucleus p sampling D (paper: 1.0; toy: 0.9)")
    a(
        "--scorer",
        default=TOY_JUDGE,
        help="feedback and eval judge: profanity-check | hf:MODEL[:LABEL] | perspective (paper)",
    )
    a("--train-samples", type=n0, default=2400, help="D_k rows per iteration, 0: all (paper: 64k)")
    a("--epochs", type=n1, default=2, help="passes per iteration (paper: toxicity 1, TL;DR/HH 2)")
    a("--lr", type=finite(0, strict=True), default=1e-3, help="(paper: 1e-5 for GPT-2 large)")
    a("--batch-size", type=n1, default=32, help="train.py batch size (paper: 32; TL;DR: 8)")
    a("--beta", type=finite(0), default=0.05, help="KL weight β (paper: 0.05; TL;DR, HH: 0)")
    a("--alpha", type=finite(), default=0.0, help="entropy coefficient α (paper: 0.06; toy: 0)")
    a("--eos-target", action=onoff, default=False, help="EOS after a stopped y (official: no)")
    a("--eos-free", action=onoff, default=False, help="EOS out of the NLL softmax (official: no)")
    a("--eval-samples", type=n1, default=10, help="y per eval prompt (paper: 25; toy: 10)")
    a("--eval-top-p", type=p01, default=0.9, help="nucleus p for evaluation (paper: 0.9)")
    a("--eval-scorer", default="profanity-check", help="eval's judge (none: --scorer)")
    a("--extra-scorer", default=TOY_JUDGE, help="second eval judge (toy: training's; none: off)")
    a("--fluency-model", help="LM for fluency ppl (paper: gpt2-xl; default: p_0)")
    a("--seed", type=int, default=0, help="seed passed to every stage")
    a("--launcher", default="python", choices=LAUNCHERS, help="how train.py is started")
    a("--nproc", type=n1, default=2, help="processes for --launcher torchrun|deepspeed")
    a("--base-url", help="OpenAI-compatible judge (alt-lmc, alt-lmu, steerlm)")
    a("--llm-model", help="judge model name for the LLM methods")
    for stage in STAGES:  # pass-through, e.g. --train-args "--beta 0.1 --alpha 0"
        a(f"--{stage}-args", default="", help=f"extra flags appended to every {stage} command")
    a("--compare", nargs="+", metavar="RUN", help="only draw RUN folders on one figure + table")
    return p


def parse_args(argv=None):
    p = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    given = typed(p, argv)
    preset = preset_flags(p, given["preset"], given) if given.get("preset") else []
    args = p.parse_args(preset + argv)  # the command line comes last, so it wins
    for key, name in (("train_prompts", "train.jsonl"), ("eval_prompts", "val.jsonl")):
        if args.prompts_dir and key not in given:
            setattr(args, key, os.path.join(args.prompts_dir, name))
    if args.method in ("alt-lmc", "alt-lmu", "steerlm") and not args.base_url and not args.compare:
        p.error(
            f"--method {args.method} asks an LLM judge: give --base-url "
            "(any OpenAI-compatible server)"
        )
    for stage in STAGES:  # split now: config.json is not written yet
        value = getattr(args, f"{stage}_args")
        try:
            shlex.split(value)
        except ValueError as e:
            raise AltError(f"--{stage}-args {value!r}: {e} (split as a shell would)") from None
    name = args.preset or "toy"
    name = name if name.endswith(args.method) else f"{name}-{args.method}"
    args.out = args.out or os.path.join("runs", "compare" if args.compare else name)
    return args


# ----------------------------------------------------------------------------- Algorithm 1
def flags(**kw):
    """Keyword arguments as a stage's flags: top_p=0.9 -> --top-p 0.9; None and False are left out,
    True is a bare flag."""
    out = []
    for key, value in kw.items():
        if value is not None and value is not False:
            out += [dash(key)] + ([] if value is True else [str(value)])
    return out


def py(script, *argv):
    return [sys.executable, here(script), *argv]


def stages(args):
    """k = 0: evaluate p_0; k = 1..N: sample, feedback, train, evaluate. Each command is printed,
    then run unless its output exists."""
    dry, p0, out = args.dry_run, args.model, args.out
    extra = {stage: shlex.split(getattr(args, f"{stage}_args")) for stage in STAGES}
    ev = eval_flags(args, args.eval_prompts)
    if dry:
        print("# k = 0: p_0's baseline")
    cmd = py("evaluate.py", *flags(model=p0, condition="none", out=f"{out}/iter_0/eval"), *ev)
    run(cmd, f"{out}/iter_0/eval/eval.json", dry)
    prev_model, prev_pool = p0, None
    fb_method = "alt-rm" if args.method == "dpo" else args.method  # DPO needs only the rewards
    alt = args.method != "dpo"  # baselines/dpo.py: its own β (DPO's), 1 pair per x
    llm = flags(base_url=args.base_url, llm_model=args.llm_model or None) if args.base_url else []
    for k in range(1, args.iterations + 1):
        it = f"{out}/iter_{k}"
        if dry:
            print(f"# k = {k}: sample, feedback, train, evaluate")
        # y ~ p_{θ_{k-1}}(· | f̂_{k-1}, x); k = 1 (and DPO): p_0 bare
        cond = [] if k == 1 or not alt else exemplar_flags(meta_path(prev_pool), dry)
        sample = flags(
            model=prev_model,
            prompts=args.train_prompts,
            out=f"{it}/samples.jsonl",
            num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens,
            top_p=args.train_top_p,
            temperature=args.temperature,
            iteration=k,
            seed=args.seed + k,
        )
        run(py("sample.py", *sample, *cond, *extra["sample"]), f"{it}/samples.jsonl", dry)
        # D_k = D_{k-1} ∪ {(x, y, f)}
        fb = flags(
            method=fb_method,
            samples=f"{it}/samples.jsonl",
            pool=prev_pool,
            out=f"{it}/pool.jsonl",
            scorer=args.scorer if fb_method in QUANTILE_METHODS else None,
        )
        run(py("feedback.py", *fb, *llm, *extra["feedback"]), f"{it}/pool.jsonl", dry)
        # θ_k = argmin_θ L(θ; D_k) from θ_{k-1}, KL to p_0 (Equation 1)
        train = flags(
            data=f"{it}/pool.jsonl",
            model=prev_model,
            ref_model=p0,
            out=f"{it}/model",
            epochs=args.epochs,
            lr=args.lr,
            beta=args.beta if alt else None,
            alpha=args.alpha if alt else None,
            eos_target=alt and args.eos_target,
            eos_free=alt and args.eos_free,
            max_samples=args.train_samples if alt and args.train_samples > 0 else None,
            batch_size=args.batch_size,
            seed=args.seed + k,
        )
        run(train_cmd(args, train + extra["train"]), f"{it}/model/train_summary.json", dry)
        # θ_k under f̂_k (DPO: bare, as it was trained)
        cmd = py("evaluate.py", *flags(model=f"{it}/model", out=f"{it}/eval"), *ev)
        run(cmd + ([] if alt else ["--condition", "none"]), f"{it}/eval/eval.json", dry)
        prev_model, prev_pool = f"{it}/model", f"{it}/pool.jsonl"
        if not dry:
            report([out], out)
    if args.prompts_dir:  # the held-out test split is for the final table only, run once by hand
        test = eval_flags(args, os.path.join(args.prompts_dir, "test.jsonl"))
        last = py("evaluate.py", *flags(model=prev_model, out=f"{out}/test"), *test)
        print(("" if dry else "\n") + f"# then once, on the test split: {show(last)}")


def eval_flags(args, prompts):
    """evaluate.py's settings, the same at every k."""
    return flags(
        prompts=prompts,
        num_samples=args.eval_samples,
        top_p=args.eval_top_p,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        scorer=none(args.eval_scorer) or args.scorer,
        fluency_model=args.fluency_model or args.model,
        seed=args.seed,
        extra_scorer=none(args.extra_scorer),
    ) + shlex.split(args.eval_args)


def exemplar_flags(meta_file, dry=False):
    """f̂ for the next sampling step, from the previous pool's meta: a tag, or (ALT_LMU) a pool of
    exemplars. A dry run has no meta yet: it shows where the value will come from."""
    if dry:
        return ["--condition", f"<exemplar in {meta_file}>"]
    ex = read_json(meta_file).get("exemplar")
    if not isinstance(ex, str):
        raise AltError(f"{meta_file}: no exemplar feedback recorded (a string), got {ex!r}")
    return ["--condition-pool", ex] if ex.endswith(".json") else ["--condition", ex]


def train_cmd(args, argv):
    script = ["-m", "baselines.dpo"] if args.method == "dpo" else [here("train.py")]
    if args.launcher == "python":
        return [sys.executable, *script, *argv]
    dist = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    ds = ["--deepspeed", here("configs", "ds_zero2.json")] if args.launcher == "deepspeed" else []
    return [sys.executable, *dist, *script, *argv, *ds]


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        return report(args.compare, args.out)
    if args.dry_run:
        return stages(args)
    t0 = time.time()
    for f in (args.train_prompts, args.eval_prompts) if args.prompts_dir else ():
        if not os.path.isfile(f):
            raise AltError(
                f"{f}: no such file (the paper's RTP splits: python prepare_rtp_splits.py "
                f"--out {args.prompts_dir})"
            )
    check_hub(args)
    lock = hold_lock(os.path.join(args.out, LOCK))  # a second alt_loop here would race this one
    try:
        check_config(args)
        stages(args)
    finally:
        os.close(lock)
    took = f"{(time.time() - t0) / 60:.1f} min"
    print(f"[alt_loop] finished {args.iterations} iterations in {took}: {args.out}/results.md")


# ------------------------------------------------------------------- plumbing: presets, config.json
def dash(key):
    return f"--{key.replace('_', '-')}"


def none(value):
    """A flag whose value 'none' turns a default off."""
    return None if value in (None, "none") else value


def typed(p, argv):
    """The dests the user typed: parse once more with every default replaced by a marker."""
    marker = object()
    ns = p.parse_args(argv, argparse.Namespace(**{k: marker for k in vars(p.parse_args([]))}))
    return {k: v for k, v in vars(ns).items() if v is not marker}


def preset_flags(p, name, given):
    """configs/presets/NAME.json as command-line flags; null: a flag the user must give."""
    path = os.path.join(PRESETS, f"{name}.json")
    known, out, required = vars(p.parse_args([])), [], []
    for k, v in read_json(path).items():
        if k.startswith("_"):
            continue
        if k not in known or k in NOT_IN_PRESETS:
            p.error(f"{path}: unknown key {k!r} (keys are alt_loop.py flags, with underscores)")
        if v is None:
            required += [] if k in given else [dash(k)]
        elif isinstance(v, bool):  # an on/off flag: --flag or --no-flag
            out.append(dash(k if v else f"no_{k}"))
        else:  # --flag=value: a value that starts with "--" (pass-through flags) stays a value
            out.append(f"{dash(k)}={v}")
    if required:
        p.error(f"preset {name} leaves {', '.join(required)} to you ({path})")
    return out


def check_config(args):
    """config.json is written once; a rerun with other settings would mix two experiments."""
    keep = {k: v for k, v in vars(args).items() if k not in ("compare", "iterations", "dry_run")}
    path, default = os.path.join(args.out, "config.json"), vars(build_parser().parse_args([]))
    if os.path.exists(path):  # a key an older alt_loop did not write counts as its default
        old = read_json(path)
        diff = [
            f"{dash(k)} {keep.get(k)!r} (was {old.get(k, default.get(k))!r})"
            for k in sorted(set(old) | set(keep))
            if k not in ("iterations", "preset")
            and same_path(k, old.get(k, default.get(k))) != same_path(k, keep.get(k))
        ]
        if diff:
            raise AltError(
                f"{path} was written with other settings: {'; '.join(diff)}. Use another --out, "
                "or the same flags to resume"
            )
    write_json(path, {**keep, "iterations": args.iterations})


if __name__ == "__main__":
    cli(main)
