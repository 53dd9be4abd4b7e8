"""compare.py: headline numbers with honest statistics. Mean over seeds, 95% bootstrap intervals over prompts.

Input: NAME=DIR[,DIR...] arguments, each DIR an evaluate.py output folder (DIR/generations.jsonl); the DIRs of one
       NAME are seeds of one method, evaluated on the same prompts. The first NAME is the baseline (usually p_0).
Output: a markdown table on stdout (and --out FILE): per NAME and metric, the seed mean [95% CI], and for the
        toxicity and fluency metrics the change against the baseline [95% CI].
Launch:
    python compare.py p0=runs/s0/iter_0/eval alt-rm=runs/s0/iter_3/eval,runs/s1/iter_3/eval,runs/s2/iter_3/eval

Rule: one bootstrap draw resamples the prompt ids x with replacement (the same draw for every NAME and seed, so a
change against the baseline is a paired comparison); each seed's metric is computed on the drawn prompts and the
seeds are averaged. The interval is the 2.5 and 97.5 percentiles over --draws draws. The metrics are evaluate.py's
(eval.json), with the same drops: null scores, ppl >= 1e4.

Run folders: report(runs, out) draws alt_loop.py's curves.png and results.md, one line per run folder
against the generations sampled so far (alt_loop.py calls it after every iteration and for --compare).
"""

import argparse
import glob
import math
import os
import sys

import numpy as np

import bookkeeping
from bookkeeping import AltError
from evaluate import PPL_MAX, TOXIC_ABOVE

METRICS = (  # key, label, change against the baseline shown as a ratio
    ("avg_max_toxicity", "avg-max tox", True),
    ("toxicity_prob", "tox prob", True),
    ("toxic_share", "share > 0.5", True),
    ("extra_avg_max_toxicity", "avg-max tox (2nd judge)", True),
    ("extra_toxic_share", "share > 0.5 (2nd judge)", True),
    ("fluency_ppl", "fluency ppl", True),
    ("dist_3", "dist-3", True),
    ("mean_length", "length", True),
)


def per_prompt(path, ids):
    """DIR -> {part: array over `ids`}: the per-prompt sums each metric is a ratio or mean of (NaN: no data)."""
    groups = {}
    for r in bookkeeping.read_jsonl(path):
        groups.setdefault(str(r["prompt_id"]), []).append(r)
    if ids is not None and set(groups) != set(ids):
        raise AltError(f"{path}: evaluated on other prompts than the first folder")
    ids = ids or sorted(groups)
    names = "max toxic scored xmax xtoxic xscored ppl ppl_n dist_3 tokens n".split()  # x: 2nd judge
    parts = {k: np.full(len(ids), np.nan) for k in names}
    for i, pid in enumerate(ids):
        g = groups[pid]
        for key, pre in (("toxicity", ""), ("extra_toxicity", "x")):
            s = [
                r[key] for r in g if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])
            ]
            if s:
                parts[pre + "max"][i] = max(s)
            parts[pre + "toxic"][i] = sum(v > TOXIC_ABOVE for v in s)
            parts[pre + "scored"][i] = len(s)
        ppl = [r["ppl"] for r in g if isinstance(r.get("ppl"), (int, float)) and r["ppl"] < PPL_MAX]
        parts["ppl"][i], parts["ppl_n"][i] = sum(ppl), len(ppl)
        words = [r["generation"].split(" ") for r in g]
        parts["dist_3"][i] = len(
            {tuple(w[j : j + 3]) for w in words for j in range(len(w) - 2)}
        ) / sum(map(len, words))
        parts["tokens"][i], parts["n"][i] = sum(r.get("num_tokens") or 0 for r in g), len(g)
    return ids, parts


def metrics(p, idx):
    """Every METRICS value of one seed on the prompts `idx` (a bootstrap draw, or all)."""
    q = {k: v[idx] for k, v in p.items()}
    ratio = lambda a, b: a.sum() / b.sum() if b.sum() else np.nan  # noqa: E731
    return {
        "avg_max_toxicity": np.nanmean(q["max"]),
        "toxicity_prob": np.nanmean(q["max"] > TOXIC_ABOVE),
        "toxic_share": ratio(q["toxic"], q["scored"]),
        "extra_avg_max_toxicity": np.nanmean(q["xmax"])
        if not np.isnan(q["xmax"]).all()
        else np.nan,
        "extra_toxic_share": ratio(q["xtoxic"], q["xscored"]),
        "fluency_ppl": ratio(q["ppl"], q["ppl_n"]),
        "dist_3": q["dist_3"].mean(),
        "mean_length": ratio(q["tokens"], q["n"]),
    }


# ------------------------------------------------------------------------ run folders: curves and table
CURVES = (
    ("avg_max_toxicity", "avg-max toxicity"),
    ("toxicity_prob", "toxicity prob"),
    ("fluency_ppl", "fluency ppl (p_0)"),
    ("dist_3", "dist-3"),
)


def collect(run_dir):
    """[(k, eval.json, generations sampled so far)] for every finished iteration of a run folder."""
    rows, sampled = [], 0
    for k in range(1000):
        it = os.path.join(run_dir, f"iter_{k}")
        if not os.path.isdir(it):
            break
        summary = os.path.join(it, "model", "train_summary.json")
        summary = bookkeeping.read_json(summary) if os.path.exists(summary) else {}
        if "generations_sampled" in summary:  # online methods (PPO) count their own rollouts
            sampled = summary["generations_sampled"]
        elif os.path.exists(os.path.join(it, "samples.jsonl")):
            sampled += len(
                bookkeeping.read_jsonl(os.path.join(it, "samples.jsonl"), allow_empty=True)
            )
        if os.path.exists(os.path.join(it, "eval", "eval.json")):
            rows.append((k, bookkeeping.read_json(os.path.join(it, "eval", "eval.json")), sampled))
    return rows


def report(runs, out):
    """Draw curves.png and write results.md for `runs` (the current run plus its siblings under
    the same parent)."""
    missing = [r for r in runs if not os.path.isdir(os.path.join(r, "iter_0"))]
    if missing:
        raise AltError(f"not a run folder (no iter_0/): {', '.join(missing)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(runs) == 1:  # one line per method run under runs/: draw the siblings too
        parent = os.path.dirname(os.path.abspath(runs[0]))
        runs = sorted(
            {
                os.path.abspath(r)
                for r in [*runs, *glob.glob(os.path.join(parent, "*"))]
                if os.path.isdir(os.path.join(r, "iter_0"))
            }
        )
    data = {os.path.basename(os.path.normpath(r)): collect(r) for r in runs}
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.3))
    for ax, (key, title) in zip(axes, CURVES):
        for name, rows in data.items():
            pts = [(n, e.get(key)) for _, e, n in rows if e.get(key) is not None]  # equal budget
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_title(title)
        if key == "fluency_ppl":  # a collapsed run (ppl in the thousands) would flatten the rest
            ax.set_yscale("log")
        ax.set_xlabel("generations sampled")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    with bookkeeping.atomic_open(os.path.join(out, "curves.png"), "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    lines = [
        "| run | iter | avg-max tox | tox prob | fluency ppl | dist-3 | generations sampled |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in data.items():
        for k, e, sampled in rows:
            f = lambda v: "n/a" if v is None else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"  # noqa: E731
            cells = [
                f(e.get(m)) for m in ("avg_max_toxicity", "toxicity_prob", "fluency_ppl", "dist_3")
            ]
            lines.append(f"| {name} | {k} | {' | '.join(cells)} | {sampled} |")
    with bookkeeping.atomic_open(os.path.join(out, "results.md")) as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"[alt_loop] wrote {out}/curves.png and {out}/results.md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "runs",
        nargs="+",
        metavar="NAME=DIR[,DIR...]",
        help="evaluate.py folders; the first is the base",
    )
    ap.add_argument("--draws", type=int, default=1000, help="bootstrap draws over prompts")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed")
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    if args.draws < 10:
        ap.error("--draws must be >= 10")
    named, ids = [], None
    for spec in args.runs:
        name, _, dirs = spec.partition("=")
        if not name or not dirs:
            ap.error(f"expected NAME=DIR[,DIR...], got {spec!r}")
        seeds = []
        for d in dirs.split(","):
            ids, parts = per_prompt(f"{d.rstrip('/')}/generations.jsonl", ids)
            seeds.append(parts)
        named.append((name, seeds))
    rng = np.random.default_rng(args.seed)
    draws = [rng.integers(0, len(ids), len(ids)) for _ in range(args.draws)]
    point = {
        n: {k: np.mean([metrics(p, slice(None))[k] for p in s]) for k, _, _ in METRICS}
        for n, s in named
    }
    boot = {
        n: [{k: np.mean([metrics(p, d)[k] for p in s]) for k, _, _ in METRICS} for d in draws]
        for n, s in named
    }
    base = named[0][0]
    keys = [m for m in METRICS if not math.isnan(point[base][m[0]])]
    head = (
        f"n_prompts {len(ids)}, {args.draws} bootstrap draws over prompts; cells: seed mean [95% CI]; "
        f"Δ: change against {base} [95% CI]"
    )
    lines = [
        head,
        "",
        "| method | seeds | " + " | ".join(label for _, label, _ in keys) + " |",
        "|---|---:|" + "---:|" * len(keys),
    ]
    for n, s in named:
        cells = []
        for k, _, rel in keys:
            v = np.array([b[k] for b in boot[n]])
            cell = f"{point[n][k]:.3g} [{np.nanpercentile(v, 2.5):.3g}, {np.nanpercentile(v, 97.5):.3g}]"
            if n != base and rel:
                with np.errstate(divide="ignore", invalid="ignore"):
                    # a draw whose base is 0: NaN, skipped
                    d = np.array([b[k] / b0[k] - 1 for b, b0 in zip(boot[n], boot[base])])
                cell += (
                    f"<br>Δ {point[n][k] / point[base][k] - 1:+.0%} [{np.nanpercentile(d, 2.5):+.0%}, "
                    f"{np.nanpercentile(d, 97.5):+.0%}]"
                )
            cells.append(cell)
        lines.append(f"| {n} | {len(s)} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    sys.stdout.write(table)
    if args.out:
        with bookkeeping.atomic_open(args.out) as fh:
            fh.write(table)


if __name__ == "__main__":
    bookkeeping.cli(main)
