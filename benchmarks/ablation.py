"""Ablation of the dasymetric network at 100 m on the generated kinds: what each part buys.

Rows: the fitted layer mix alone (no point sites); prior only (the surface mix, trainable, with
the listed points' surplus on their sites); + local head (3x3 aux MLP); + context
(U-Net features constant over the shared block, T=1); + temporal (T=3 windows, temporal scan).
For each, the held-out 100 m Nonzero-MAE of the selected checkpoint (``best_model.pth``: the
prior unless validation improved) and of the last trained state, as ratios to the best
built-in baseline of the same region. Run: ``python benchmarks/ablation.py --device cuda``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import run_one, summarise  # noqa: E402

CONFIGS = {
    "mix (no sites)": {"use_pointwise": False, "use_context": False, "point_sites": False},
    "prior only": {"use_pointwise": False, "use_context": False},
    "+ local head": {"use_context": False},
    "+ context": {"use_temporal": False},
    "+ temporal (T=3)": {"use_temporal": True, "_years_window": 3},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default="points,traffic,urban")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size-km", type=int, default=48)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="base")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, mo in CONFIGS.items():
            mo = dict(mo)
            over = {"preset": args.preset, "model_overrides": {k: v for k, v in mo.items() if not k.startswith("_")}}
            if args.device != "cpu":
                over["batch_size"] = 16
            if "_years_window" in mo:
                over["years_window"] = mo["_years_window"]
            for kind in args.kinds.split(","):
                root = Path(tmp) / label.replace(" ", "_").replace("+", "p").replace("(", "").replace(")", "").replace("=", "")
                r = run_one(kind, args.seed, root, size_km=args.size_km, overrides=dict(over), device=args.device)
                row = {"config": label, **summarise(kind, args.seed, r)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(f"{'config':18s} " + " ".join(f"{k + ' sel/last':>22s}" for k in args.kinds.split(",")))
    for label in CONFIGS:
        cells = []
        for kind in args.kinds.split(","):
            r = next(x for x in rows if x["config"] == label and x["kind"] == kind)
            cells.append(f"{r['ratio']:>10.3f} / {r['last_ratio']:<9.3f}")
        print(f"{label:18s} " + " ".join(f"{c:>22s}" for c in cells))


if __name__ == "__main__":
    main()
