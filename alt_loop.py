"""alt_loop.py: ALT's Algorithm 1 as a tiny driver that runs the four stage scripts, in order, as a user would.

    k = 0:      evaluate p_0 itself (the baseline row)
    k = 1..N:   sample    y ~ p_{θ_{k-1}}(· | f̂_{k-1}, x)     (k = 1: p_0, unconditioned)
                feedback  D_k = D_{k-1} ∪ {(x, y, f = F(x, y))}
                train     θ_k = argmin_θ L(θ; D_k), starting from θ_{k-1}, KL to p_0   (Equation 1)
                evaluate  θ_k on the eval prompts under f̂_k

Every stage is launched as the command a user would type; the command is printed first, so the run log teaches the
manual workflow. Nothing here re-implements a stage.

Run folder:  runs/NAME/config.json                       the loop's flags, written once (a rerun must match)
             runs/NAME/iter_0/eval/                      p_0's evaluation
             runs/NAME/iter_k/{samples.jsonl, pool.jsonl, pool.meta.json, model/, eval/}
             runs/NAME/curves.png, results.md            redrawn after every iteration
Resume: kill it anywhere and run the same command again. A stage whose output exists is skipped (outputs are
written atomically, so existing means finished); a half-done stage resumes through its own side files.

Launch:
    python alt_loop.py                                  # the toy experiment, all defaults (<= 10 min on 2 CPU cores)
    python alt_loop.py --method quark --out runs/toy-quark
    python alt_loop.py --compare runs/toy-alt-rm runs/toy-quark --out runs/compare
"""
import argparse
import glob
import os
import shlex
import subprocess
import sys
import time

import common
from common import AltError
from feedback import meta_path

ROOT = os.path.dirname(os.path.abspath(__file__))


def here(*parts):
    """A repo path, relative to the caller's folder, so printed commands stay short and copy-pasteable."""
    return os.path.relpath(os.path.join(ROOT, *parts))


TOY = here("toy", "model")
METHODS = ("alt-rm", "quark", "alt-lmc", "alt-lmu", "steerlm", "dpo")
CURVES = (("avg_max_toxicity", "avg-max toxicity"), ("toxicity_prob", "toxicity prob"),
          ("fluency_ppl", "fluency ppl (p_0)"), ("dist_3", "dist-3"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="alt_loop.py", description="ALT Algorithm 1: sample -> feedback -> train -> eval.")
    a = p.add_argument
    # ---- the experiment (defaults: the bundled toy, sized to finish in <= 10 min on 2 CPU cores)
    a("--method", default="alt-rm", choices=METHODS, help="feedback provider (paper: ALT_RM for toxicity); quark / "
      "steerlm are the paper's baselines, dpo runs baselines/dpo.py in the same loop")
    a("--iterations", type=int, default=3,
      help="ALT iterations N (official toxicity run: 16 sampling stages, one every 2,000 steps; toy: 3)")
    a("--model", default=TOY, help="the initial model p_0 (paper: GPT-2 large, 774M; toy: toy/model, 5.3M)")
    a("--train-prompts", default=here("toy", "prompts", "train.jsonl"),
      help="prompts x sampled every iteration (paper: the RealToxicityPrompts train split; toy: 600)")
    a("--eval-prompts", default=here("toy", "prompts", "val.jsonl"),
      help="held-out prompts evaluated after every iteration (official code: a 5k RTP val split; toy: 100)")
    a("--out", default=None, help="run folder (default runs/toy-METHOD)")
    a("--num-samples", type=int, default=4,
      help="y per x per iteration (official code: one sweep of all train prompts per sampling stage; toy: 4)")
    a("--eval-samples", type=int, default=10, help="y per eval prompt (paper: 25; toy: 10 during the loop)")
    a("--train-samples", type=int, default=2400, help="rows of D_k drawn for each iteration's training (official code: "
      "2,000 steps x batch 32 between sampling stages; toy: 2400 rows = 75 steps)")
    a("--epochs", type=int, default=2, help="train.py passes over those rows per iteration (toy: 2)")
    a("--train-top-p", type=float, default=0.9, help="nucleus p when sampling D (paper: 1.0; toy: 0.9, since the weak toy "
      "LM's full-nucleus samples are mostly noise and fitting them costs fluency)")
    a("--lr", type=float, default=1e-3, help="train.py learning rate (paper: 1e-5 for GPT-2 large; the toy LM is 140x "
      "smaller, far from converged and trains 75 steps per iteration, so 100x)")
    a("--batch-size", type=int, default=32, help="train.py batch size (paper: 32)")
    a("--seed", type=int, default=0, help="seed passed to every stage")
    a("--launcher", default="python", choices=("python", "torchrun", "deepspeed"), help="how train.py is started")
    a("--nproc", type=int, default=2, help="processes for --launcher torchrun|deepspeed")
    a("--base-url", default=None, help="OpenAI-compatible judge server (needed by alt-lmc, alt-lmu, steerlm)")
    a("--llm-model", default=None, help="judge model name for the LLM methods")
    # ---- pass-through: any stage flag, e.g. --train-args "--beta 0.1 --alpha 0"
    for stage in ("sample", "feedback", "train", "eval"):
        a(f"--{stage}-args", default="", help=f"extra flags appended to every {stage} command (a quoted string)")
    a("--compare", nargs="+", metavar="RUN", help="only draw RUN folders on one figure + table (into --out)")
    args = p.parse_args(argv)
    if args.iterations < 1 or args.num_samples < 1 or args.eval_samples < 1:
        p.error("--iterations, --num-samples and --eval-samples must be >= 1")
    if args.method in ("alt-lmc", "alt-lmu", "steerlm") and not args.base_url and not args.compare:
        p.error(f"--method {args.method} asks an LLM judge: give --base-url (any OpenAI-compatible server)")
    args.out = args.out or os.path.join("runs", "compare" if args.compare else f"toy-{args.method}")
    return args


# ----------------------------------------------------------------------------- running stages
def run(cmd, done_path):
    """Print the command a user would type, then run it, unless its atomic output already exists."""
    shown = " ".join("python" if c == sys.executable else shlex.quote(c) for c in cmd)
    if os.path.exists(done_path):
        print(f"[alt_loop] skip (done): {shown}", flush=True)
        return
    print(f"\n[alt_loop] $ {shown}", flush=True)
    t0 = time.time()
    if subprocess.run(cmd).returncode != 0:
        raise AltError(f"stage failed: {shown}")
    if not os.path.exists(done_path):
        raise AltError(f"stage exited 0 but wrote no {done_path}: {shown}")
    print(f"[alt_loop] ({time.time() - t0:.0f} s)", flush=True)


def py(script, *flags):
    return [sys.executable, here(script), *[str(f) for f in flags]]


def train_cmd(args, flags):
    script = os.path.join("baselines", "dpo.py") if args.method == "dpo" else "train.py"
    if args.launcher == "python":
        return py(script, *flags)
    dist = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    ds = ["--deepspeed", here("configs", "ds_zero2.json")] if args.launcher == "deepspeed" else []
    return [*dist, here(script), *[str(f) for f in flags], *ds]


def exemplar_flags(meta_file):
    """f̂ for the next sampling step, from the previous pool's meta: a tag, or (ALT_LMU) a pool of exemplars."""
    ex = common.read_json(meta_file).get("exemplar")
    if ex is None:
        raise AltError(f"{meta_file}: no exemplar feedback recorded")
    return ["--condition-pool", ex] if ex.endswith(".json") else ["--condition", ex]


def check_config(args):
    """config.json is written once; a rerun with other settings would mix two experiments in one folder."""
    keep = {k: v for k, v in vars(args).items() if k not in ("compare", "iterations")}
    path = os.path.join(args.out, "config.json")
    if os.path.exists(path):
        old = {k: v for k, v in common.read_json(path).items() if k != "iterations"}
        diff = [f"--{k.replace('_', '-')} {keep.get(k)!r} (was {old.get(k)!r})" for k in sorted(set(old) | set(keep))
                if old.get(k) != keep.get(k)]
        if diff:
            raise AltError(f"{path} was written with other settings: {'; '.join(diff)}. Use another --out, or the "
                           f"same flags to resume")
    common.write_json(path, {**keep, "iterations": args.iterations})


def experiment(args):
    check_config(args)
    p0, out = args.model, args.out
    ev = ["--prompts", args.eval_prompts, "--num-samples", args.eval_samples, "--seed", args.seed,
          "--fluency-model", p0, *shlex.split(args.eval_args)]
    run(py("evaluate.py", "--model", p0, "--condition", "none", "--out", f"{out}/iter_0/eval", *ev),
        f"{out}/iter_0/eval/eval.json")
    prev_model, prev_pool = p0, None
    fb_method = "alt-rm" if args.method == "dpo" else args.method  # DPO needs only the rewards
    llm = ["--base-url", args.base_url] + (["--llm-model", args.llm_model] if args.llm_model else []) \
        if args.base_url else []
    for k in range(1, args.iterations + 1):
        it = f"{out}/iter_{k}"
        cond = [] if k == 1 or args.method == "dpo" else exemplar_flags(meta_path(prev_pool))
        run(py("sample.py", "--model", prev_model, "--prompts", args.train_prompts, "--out", f"{it}/samples.jsonl",
               "--num-samples", args.num_samples, "--top-p", args.train_top_p, "--iteration", k,
               "--seed", args.seed + k, *cond,
               *shlex.split(args.sample_args)), f"{it}/samples.jsonl")
        run(py("feedback.py", "--method", fb_method, "--samples", f"{it}/samples.jsonl",
               *(["--pool", prev_pool] if prev_pool else []), "--out", f"{it}/pool.jsonl", *llm,
               *shlex.split(args.feedback_args)), f"{it}/pool.jsonl")
        run(train_cmd(args, ["--data", f"{it}/pool.jsonl", "--model", prev_model, "--ref-model", p0,
                             "--out", f"{it}/model", "--epochs", args.epochs, "--lr", args.lr,
                             *([] if args.method == "dpo" else ["--max-samples", args.train_samples]),  # DPO: 1 pair/x
                             "--batch-size", args.batch_size, "--seed", args.seed + k,
                             *shlex.split(args.train_args)]), f"{it}/model/train_summary.json")
        run(py("evaluate.py", "--model", f"{it}/model", "--out", f"{it}/eval", *ev,
               *(["--condition", "none"] if args.method == "dpo" else [])), f"{it}/eval/eval.json")
        prev_model, prev_pool = f"{it}/model", f"{it}/pool.jsonl"
        report([out], out)


# ----------------------------------------------------------------------------- curves and table
def collect(run_dir):
    """[(k, eval.json, generations sampled so far)] for every finished iteration of a run folder."""
    rows, sampled = [], 0
    for k in range(0, 1000):
        it = os.path.join(run_dir, f"iter_{k}")
        if not os.path.isdir(it):
            break
        summary = os.path.join(it, "model", "train_summary.json")
        summary = common.read_json(summary) if os.path.exists(summary) else {}
        if "generations_sampled" in summary:  # online methods (PPO) count their own rollouts
            sampled = summary["generations_sampled"]
        elif os.path.exists(os.path.join(it, "samples.jsonl")):
            sampled += len(common.read_jsonl(os.path.join(it, "samples.jsonl"), allow_empty=True))
        if os.path.exists(os.path.join(it, "eval", "eval.json")):
            rows.append((k, common.read_json(os.path.join(it, "eval", "eval.json")), sampled))
    return rows


def report(runs, out):
    """Draw curves.png and write results.md for `runs` (the current run plus its siblings under the same parent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(runs) == 1:  # one line per method run under runs/: draw the siblings too
        parent = os.path.dirname(os.path.abspath(runs[0]))
        runs = sorted({os.path.abspath(r) for r in [*runs, *glob.glob(os.path.join(parent, "*"))]
                       if os.path.isdir(os.path.join(r, "iter_0"))})
    data = {os.path.basename(os.path.normpath(r)): collect(r) for r in runs}
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.3))
    for ax, (key, title) in zip(axes, CURVES):
        for name, rows in data.items():
            pts = [(k, e.get(key)) for k, e, _ in rows if e.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    with common.atomic_open(os.path.join(out, "curves.png"), "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    lines = ["| run | iter | avg-max tox | tox prob | fluency ppl | dist-3 | generations sampled |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, rows in data.items():
        for k, e, sampled in rows:
            f = lambda v: "n/a" if v is None else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"  # noqa: E731
            lines.append(f"| {name} | {k} | {f(e.get('avg_max_toxicity'))} | {f(e.get('toxicity_prob'))} | "
                         f"{f(e.get('fluency_ppl'))} | {f(e.get('dist_3'))} | {sampled} |")
    with common.atomic_open(os.path.join(out, "results.md")) as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"[alt_loop] wrote {out}/curves.png and {out}/results.md")


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        missing = [r for r in args.compare if not os.path.isdir(os.path.join(r, "iter_0"))]
        if missing:
            raise AltError(f"not a run folder (no iter_0/): {', '.join(missing)}")
        report(args.compare, args.out)
        return
    t0 = time.time()
    experiment(args)
    print(f"[alt_loop] finished {args.iterations} iterations in {(time.time() - t0) / 60:.1f} min: "
          f"{args.out}/results.md")


if __name__ == "__main__":
    common.cli(main)
