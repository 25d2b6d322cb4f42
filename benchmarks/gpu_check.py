"""The new model on a GPU: train (base preset), score at 100 m, and downscale through the CUDA
pipeline (bf16 copy, CUDA graphs, dasymetric tiles) with model, fitted and auto.

Run on the GPU machine: ``python benchmarks/gpu_check.py [--kinds points,traffic,urban]``.
Prints one row per kind: train seconds, 100 m Nonzero-MAE of model / fitted / best baseline
on held-out cells, and for each downscale the precision chosen, seconds and the conservation.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import run_one, summarise  # noqa: E402

from carbonsr_cli.downscale import downscale  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default="points,traffic,urban")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size-km", type=int, default=48)
    ap.add_argument("--preset", default="base")
    args = ap.parse_args()
    over = {"preset": args.preset, "model_overrides": {}, "batch_size": 16, "precision": "bf16"}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            r = run_one(kind, args.seed, Path(tmp), size_km=args.size_km, overrides=dict(over), device="cuda")
            row = summarise(kind, args.seed, r)
            data = Path(tmp) / f"{kind}-{args.seed}"
            ckpt = Path(tmp) / "runs" / f"{kind}-{args.seed}" / "best_model.pth"
            aux = [str(p) for p in sorted((data / "aux").iterdir())] + [f"{data / 'plants.gpkg'}:co2_t_yr"]
            for method in ("model", "fitted", "auto"):
                t0 = time.perf_counter()
                s = downscale(data / "emissions_1km.tif", aux, Path(tmp) / f"{kind}-{method}.tif", method=method,
                              checkpoint=ckpt, device="cuda", progress=False)
                row[f"{method}_s"] = round(time.perf_counter() - t0, 2)
                row[f"{method}_ok"] = bool(s.conservation and s.conservation.ok)
                row[f"{method}_precision"] = s.precision
                row[f"{method}_notes"] = [n for n in s.notes if "auto" in n or "bf16" in n or "graph" in n]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
