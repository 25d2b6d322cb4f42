"""Ablation of the dasymetric network at 100 m on the generated kinds: what each part buys.

Rows (each adds to the one above, except the first two):
- ``mix``: the fitted layer mix alone (``prior`` preset, no point sites);
- ``prior``: the mix with the listed points' surplus on their sites (``prior`` preset);
- ``mass``: + the per-pixel mass correction, gated on validation (``mass``: `train`'s default);
- ``head``: + the pointwise head (3x3 aux MLP);
- ``context``: + the context path (the ``base`` U-Net, features constant over the shared block), T = 1;
- ``temporal``: + the temporal scan over T = 3 years.

For each region, the held-out 100 m Nonzero-MAE of the selected checkpoint (``best_model.pth``:
the prior unless validation improved) and of the last trained state, as ratios to the best
built-in baseline of the same region (:mod:`accuracy`'s protocol: ``demo`` schedule, 48 km).

Run all rows: ``python benchmarks/ablation.py --device cuda``; rows on several devices in
parallel, then one table::

    python benchmarks/ablation.py --configs mix,prior,mass,head --device cpu --jsonl rows.jsonl &
    python benchmarks/ablation.py --configs context,temporal --device cuda --jsonl rows.jsonl
    python benchmarks/ablation.py --table rows.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import run_one, summarise  # noqa: E402

#: Row name -> (label, TrainConfig overrides). ``model_overrides`` go to the preset's ModelConfig.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "mix": ("fitted mix (no sites)", {"preset": "prior", "model_overrides": {"point_sites": False}}),
    "prior": ("prior: mix + sites", {"preset": "prior"}),
    "mass": ("+ mass correction (default)", {"preset": "mass"}),
    "head": ("+ pointwise head", {"preset": "mass", "model_overrides": {"use_pointwise": True}}),
    "context": ("+ context (U-Net, T=1)", {"preset": "base", "years_window": 1,
                                          "model_overrides": {"prior_kind": "mass", "use_temporal": False}}),
    "temporal": ("+ temporal (T=3)", {"preset": "base", "years_window": 3,
                                      "model_overrides": {"prior_kind": "mass", "use_temporal": True}}),
}


def _geomean(values: list[float]) -> float:
    vals = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def print_table(rows: list[dict[str, Any]]) -> None:
    """Geometric mean over seeds of each row's ratio per kind (selected / last trained state),
    the count of regions above 1.0 and the largest spread over training seeds."""
    kinds = sorted({r["kind"] for r in rows}, key=["points", "traffic", "urban"].index)
    print(f"{'configuration':30s} " + " ".join(f"{k + ' sel / last (n>1.0)':>28s}" for k in kinds) + "   max seed spread")
    for name, (label, _) in CONFIGS.items():
        mine = [r for r in rows if r.get("config") == name]
        if not mine:
            continue
        cells = []
        for kind in kinds:
            rk = [r for r in mine if r["kind"] == kind]
            if not rk:
                cells.append(f"{'-':>28s}")
                continue
            sel, last = _geomean([r["ratio"] for r in rk]), _geomean([r["last_ratio"] for r in rk])
            above = sum(r["ratio"] > 1.0 for r in rk)
            cells.append(f"{sel:>9.3f} / {last:<7.3f} ({above}/{len(rk)})")
        spreads = [r["train_spread"] for r in mine if math.isfinite(r.get("train_spread", float("nan")))]
        spread = f"{100 * max(spreads):.1f} %" if spreads else "-"
        print(f"{label:30s} " + " ".join(f"{c:>28s}" for c in cells) + f"   {spread}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default="points,traffic,urban")
    ap.add_argument("--seeds", default="1", help="region seeds, comma-separated")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"rows to run, of {','.join(CONFIGS)}")
    ap.add_argument("--size-km", type=int, default=48)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (CPU rows)")
    ap.add_argument("--train-seeds", type=int, default=1, help="train each region this many times (the spread)")
    ap.add_argument("--jsonl", help="append each row to this file as it finishes")
    ap.add_argument("--table", help="only print the table of the rows in this JSONL file")
    args = ap.parse_args()
    if args.table:
        print_table([json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()])
        return
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose of {list(CONFIGS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            over = copy.deepcopy(CONFIGS[name][1])
            if args.device != "cpu":
                over["batch_size"] = 16
            if args.threads:
                over["threads"] = args.threads
            for kind in args.kinds.split(","):
                for seed in (int(s) for s in args.seeds.split(",")):
                    r = run_one(kind, seed, Path(tmp) / name, size_km=args.size_km, overrides=dict(over),
                                device=args.device, train_seeds=args.train_seeds)
                    row = {"config": name, "device": args.device, **summarise(kind, seed, r)}
                    rows.append(row)
                    line = json.dumps(row)
                    print(line, flush=True)
                    if args.jsonl:
                        with open(args.jsonl, "a", encoding="utf-8") as fh:
                            fh.write(line + "\n")
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
