"""The README's accuracy table (Markdown) from rows of ``benchmarks/accuracy.py``.

Reads the one-row-per-region JSON lines that ``accuracy.py`` prints (or
``accuracy_parallel.sh`` collects into ``OUT.jsonl``) and prints the table between the
``<!-- accuracy-table -->`` markers of README.md, then one line per kind with the geometric mean
of model / best baseline. Run: ``python benchmarks/accuracy_table.py OUT.jsonl [MORE.jsonl]
[--seeds 1,2,3]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carbonsr_cli.train.validation import gate_strength  # noqa: E402


def load_rows(paths: list[str]) -> dict[tuple[str, int], dict[str, Any]]:
    """``(kind, seed) -> row`` from JSON lines (lines not starting with ``{`` are skipped)."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                rows[(r["kind"], int(r["seed"]))] = r
    return rows


def _g(x: float) -> str:
    return f"{x:.4g}"


def table(rows: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """Markdown lines: one row per region; the mass correction's strength (0 = dropped, 1 = kept in
    full); the R2 of the model and of the best baseline when the rows have it (accuracy.py rows
    since session 10)."""
    with_r2 = any("r2" in r for r in rows.values())
    out = ["| kind | seed | model | fitted | points first | best one layer | uniform | floor | model / best baseline | Top-1% ratio | "
           + ("R2 model / baseline | " if with_r2 else "") + "correction strength |",
           "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if with_r2 else "")]
    for (kind, seed), r in sorted(rows.items()):
        gate = r.get("mass_gate") or {}
        strength = gate_strength(gate) if gate else float("nan")
        r2 = f"{r.get('r2', float('nan')):.3f} / {r.get('r2_baseline', float('nan')):.3f} | " if with_r2 else ""
        out.append(f"| {kind} | {seed} | {_g(r['model'])} | {_g(r['fitted'])} | {_g(r['points'])} | {_g(r['dasymetric'])} | "
                   f"{_g(r['uniform'])} | {_g(r['floor'])} | {r['ratio']:.3f} ({r['best_baseline']}) | {r['top1_ratio']:.3f} | {r2}{strength:.2f} |")
    return out


def summary(rows: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """Per kind and overall: regions, geometric mean and maximum of model / best baseline, regions above 1.0."""
    lines = []
    for kind in sorted({k for k, _ in rows}) + [None]:
        ratios = [r["ratio"] for (k, _), r in rows.items() if kind is None or k == kind]
        worse_r2 = [r["r2"] < r["r2_baseline"] for (k, _), r in rows.items() if (kind is None or k == kind) and "r2" in r]
        lines.append(f"{kind or 'all'}: {len(ratios)} regions, geometric mean {statistics.geometric_mean(ratios):.3f}, "
                     f"max {max(ratios):.3f}, above 1.0: {sum(x > 1.0 for x in ratios)}"
                     + (f", R2 below the best baseline's: {sum(worse_r2)} of {len(worse_r2)}" if worse_r2 else ""))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl", nargs="+")
    ap.add_argument("--seeds", help="only these seeds in the table (the summary counts every row)")
    args = ap.parse_args()
    rows = load_rows(args.jsonl)
    shown = rows if not args.seeds else {k: v for k, v in rows.items() if k[1] in {int(s) for s in args.seeds.split(",")}}
    print("\n".join(table(shown)))
    print()
    print("\n".join(summary(rows)))


if __name__ == "__main__":
    main()
