"""Write the README's demo table from a real ``carbonsr demo`` run (so the README cannot drift).

The table between ``<!-- demo-table -->`` and ``<!-- /demo-table -->`` in README.md is replaced by
the rows of the demo's ``results.json`` and the measured run time. ``--check`` compares instead
of writing (exit 1 when the README differs beyond rounding), which is what the test suite does.

Run: ``python benchmarks/readme_demo.py`` (runs the demo in a temporary folder, about 2 minutes on
2 CPU cores) or ``python benchmarks/readme_demo.py --results carbonsr-demo/results.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

START, END = "<!-- demo-table -->", "<!-- /demo-table -->"
COLUMNS = (("nonzero-mae", "Nonzero-MAE"), ("balanced-mae", "Bal. MAE"), ("top1-mae", "Top-1%"), ("r2", "R2"))


from carbonsr_cli.commands.demo import _f as _num  # noqa: E402  (the CLI table's number format)


def table(results: dict[str, Any]) -> str:
    """The README block: a fenced plain-text table and the run time."""
    head = f"{'region':9s} {'method':28s} " + " ".join(f"{label:>11s}" for _, label in COLUMNS) + f" {'cons. err':>9s} {'ratio':>6s}"
    lines = [head]
    last = None
    for r in results["rows"]:
        region = ("held-out" if r["region"] == "held-out" else "all") if r["region"] != last else ""
        last = r["region"]
        cells = " ".join(f"{_num(r[k], 'r2' if k == 'r2' else ''):>11s}" for k, _ in COLUMNS)
        lines.append(f"{region:9s} {r['method']:28s} {cells} {_num(r['max_rel_err'], 'rel'):>9s} {_num(r['ratio'], 'ratio'):>6s}")
    secs = results.get("seconds", {})
    total = secs.get("total")
    note = (f"Measured by `python benchmarks/readme_demo.py` (the demo took {total:.0f} s on this machine's "
            f"{results.get('cpus', 2)} CPU cores; training {secs.get('training', 0):.0f} s).") if total else ""
    return "\n".join([START, "```", *lines, "```", note, END])


def replace_block(readme: str, block: str) -> str:
    """README text with the demo block replaced.

    Raises:
        SystemExit: the markers are missing.
    """
    pat = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pat.search(readme):
        raise SystemExit(f"README.md has no {START} ... {END} block")
    return pat.sub(lambda _: block, readme)


def numbers(block: str) -> list[float]:
    """The table's numbers (for comparison within rounding)."""
    body = block.split("```")[1] if "```" in block else block
    return [float(x) for x in re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?", body)]


def run_demo_results(quicklook_to: Path | None = None) -> dict[str, Any]:
    """Run ``carbonsr demo`` in a temporary folder and return its results.json (and copy its
    quick-look PNG to ``quicklook_to``)."""
    import shutil

    from carbonsr_cli.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        res = run_demo(Path(tmp) / "demo", log=lambda m: None)
        data = json.loads(res.results_json.read_text())
        if quicklook_to is not None:
            shutil.copyfile(res.quicklook, quicklook_to)
    import os

    data["cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", help="results.json of a demo run (default: run the demo now)")
    ap.add_argument("--check", action="store_true", help="compare with README.md instead of writing it")
    ap.add_argument("--rtol", type=float, default=0.02, help="relative tolerance of --check (rounding, thread order)")
    args = ap.parse_args()
    if args.results:
        results = json.loads(Path(args.results).read_text())
    else:
        results = run_demo_results(None if args.check else ROOT / "docs" / "demo.png")
    block = table(results)
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text()
    if args.check:
        cur = re.search(re.escape(START) + r".*?" + re.escape(END), readme, re.S)
        if cur is None:
            print(f"README.md has no {START} block", file=sys.stderr)
            return 1
        a, b = numbers(cur.group(0)), numbers(block)
        ok = len(a) == len(b) and all(abs(x - y) <= args.rtol * max(abs(x), abs(y), 1e-9) for x, y in zip(a, b))
        print(block)
        print("README demo table: " + ("matches" if ok else "DIFFERS from this run"))
        return 0 if ok else 1
    readme_path.write_text(replace_block(readme, block))
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
