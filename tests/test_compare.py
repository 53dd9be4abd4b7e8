"""compare.py: metrics against a hand-computed table, seed averaging, paired bootstrap intervals."""

import math

import pytest

import bookkeeping
import compare
from bookkeeping import AltError


def gens(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    bookkeeping.write_jsonl(
        path / "generations.jsonl",
        [
            {
                "prompt_id": pid,
                "generation": g,
                "toxicity": t,
                "extra_toxicity": x,
                "ppl": p,
                "num_tokens": n,
            }
            for pid, g, t, x, p, n in rows
        ],
    )
    return str(path)


ROWS = [
    ("a", "you are so", 0.9, 0.6, 10.0, 3),
    ("a", "you are nice", 0.1, None, 20000.0, 3),
    ("b", "a b", 0.2, 0.1, 30.0, 2),
    ("b", "c", 0.3, 0.7, 50.0, 1),
]


def test_metrics_match_a_hand_computed_table(tmp_path):
    ids, parts = compare.per_prompt(gens(tmp_path / "r", ROWS) + "/generations.jsonl", None)
    m = compare.metrics(parts, slice(None))
    assert ids == ["a", "b"]
    assert m["avg_max_toxicity"] == pytest.approx((0.9 + 0.3) / 2)
    assert m["toxicity_prob"] == pytest.approx(0.5)  # a's max 0.9 > 0.5, b's 0.3 is not
    assert m["toxic_share"] == pytest.approx(1 / 4)
    # a null extra score is ignored
    assert m["extra_avg_max_toxicity"] == pytest.approx((0.6 + 0.7) / 2)
    assert m["extra_toxic_share"] == pytest.approx(2 / 3)
    # ppl >= 1e4 dropped, as evaluate.py
    assert m["fluency_ppl"] == pytest.approx((10 + 30 + 50) / 3)
    # dist-3: a has the trigrams (you, are, so), (you, are, nice) over 6 words; b has none over 3 words
    assert m["dist_3"] == pytest.approx((2 / 6 + 0 / 3) / 2)
    assert m["mean_length"] == pytest.approx(9 / 4)


def test_table_averages_seeds_and_gives_paired_intervals(tmp_path, capsys):
    base = gens(tmp_path / "base", ROWS)
    same = gens(tmp_path / "same", ROWS)
    clean = gens(tmp_path / "clean", [(p, g, t / 3, x, q, n) for p, g, t, x, q, n in ROWS])
    out = tmp_path / "table.md"
    compare.main(
        [f"p0={base}", f"copy={same}", f"alt={clean},{base}", "--draws", "200", "--out", str(out)]
    )
    table = capsys.readouterr().out
    assert out.read_text() == table
    row = {
        line.split(" | ")[0].strip("| "): line
        for line in table.splitlines()
        if line.startswith("| ")
    }
    # the same prompts in every draw: an identical run changes nothing
    assert "Δ +0% [+0%, +0%]" in row["copy"]
    alt_avg_max = ((0.9 + 0.3) / 2 / 3 + (0.9 + 0.3) / 2) / 2  # mean of the two seeds
    assert row["alt"].split(" | ")[2].startswith(f"{alt_avg_max:.3g} [")
    assert f"Δ {alt_avg_max / 0.6 - 1:+.0%}" in row["alt"]


def test_other_prompts_and_bad_specs_are_errors(tmp_path):
    base = gens(tmp_path / "base", ROWS)
    other = gens(tmp_path / "other", [("c", *r[1:]) for r in ROWS])
    with pytest.raises(AltError, match="other prompts"):
        compare.main([f"p0={base}", f"x={other}"])
    with pytest.raises(SystemExit):
        compare.main(["no-equals-sign"])
    assert not math.isnan(
        compare.metrics(compare.per_prompt(base + "/generations.jsonl", None)[1], [0, 0])[
            "avg_max_toxicity"
        ]
    )
