"""Interleaved A/B of one ``carbonsr downscale`` command over variants (a tree and environment
variables each), N runs per variant, then the outputs compared with the first variant's.

Each variant is ``LABEL=TREE[,KEY=VALUE...]``; a ``KEY`` of ``CARBONSR_CACHE_DIR`` with the
value ``{run}`` gets an empty folder per run (a first run on the inputs). Example (session 17:
the warp cache and the reader count, 1,000 km, ``base``)::

    python benchmarks/command_variants.py --data R --checkpoint base.pth --work /tmp/w --runs 5 \\
        --variant old=../old-tree --variant new=. --variant "new 5 readers=.,CARBONSR_READ_PROCS=5"

Every variant runs once first (bytecode, page cache, per-input caches). Prints each run's
wall and stages (``command_stages.run_once``), the medians, and whether each output equals the
first variant's (NaN = NaN); ``--json`` keeps the runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from command_stages import commands, run_once  # noqa: E402


def parse_variant(text: str) -> tuple[str, Path, dict[str, str]]:
    """``LABEL=TREE[,KEY=VALUE...]`` -> (label, tree, environment)."""
    label, _, rest = text.partition("=")
    tree, *pairs = rest.split(",")
    env = dict(p.split("=", 1) for p in pairs if p)
    return label, Path(tree).resolve(), env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a sample-data folder (emissions_1km.tif, aux/)")
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--variant", action="append", required=True, help="LABEL=TREE[,KEY=VALUE...] (repeatable)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    work = args.work.resolve()

    def folder_of(label: str) -> Path:
        return work / label.replace(" ", "_")

    def cmd_env(label: str, env: dict[str, str], run: int) -> tuple[list[str], dict[str, str]]:
        folder = folder_of(label)
        folder.mkdir(parents=True, exist_ok=True)
        cmd = commands(args.data.resolve(), folder, args.checkpoint.resolve(), ["model"], args.device)["model"]
        env = {k: (str(folder / f"cache-{run}") if v == "{run}" else v) for k, v in env.items()}
        return cmd, env

    for label, tree, env in variants:  # bytecode, page cache, per-input caches
        cmd, e = cmd_env(label, env, -1)
        run_once(tree, cmd, sys.executable, e)
    results: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in variants}
    for r in range(args.runs):
        for label, tree, env in variants:
            cmd, e = cmd_env(label, env, r)
            out = run_once(tree, cmd, sys.executable, e)
            results[label].append(out)
            print(f"{label} run {r + 1}: wall {out['wall']:.2f} s, loop {out['loop']:.2f}, model wait {out['model']:.2f}", flush=True)
            if "{run}" in env.values():
                shutil.rmtree(folder_of(label) / f"cache-{r}", ignore_errors=True)
    for label, runs in results.items():
        print(f"{label:16s} wall median {statistics.median(o['wall'] for o in runs):.2f} s, loop median "
              f"{statistics.median(o['loop'] for o in runs):.2f} s, runs {' '.join('%.2f' % o['wall'] for o in runs)}")
    import numpy as np
    import rasterio

    arrays = {}
    for label, _, _ in variants:
        with rasterio.open(folder_of(label) / "out_model.tif") as ds:
            arrays[label] = ds.read()
    first = variants[0][0]
    for label, a in arrays.items():
        print(f"output {label} vs {first}: identical={bool(np.array_equal(a, arrays[first], equal_nan=True))}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
