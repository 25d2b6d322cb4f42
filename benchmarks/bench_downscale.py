"""Benchmark ``carbonsr downscale``: throughput (km2/s) and peak RSS, model vs uniform.

Each run is a separate process (so ``ru_maxrss`` is the peak of that run alone). Models are
untrained (random weights): speed does not depend on training.

Usage:
    # sample region of 100 x 100 km (10,000 km2), uniform + tiny + base models on the CPU
    python benchmarks/bench_downscale.py --size-km 100 --device cpu
    # on a GPU machine
    python benchmarks/bench_downscale.py --size-km 100 --device cuda --batch-size 64
    # memory check: a 20,000 x 20,000 child-cell output (2,000 x 2,000 parent cells)
    python benchmarks/bench_downscale.py --child-cells 20000 --methods uniform
    python benchmarks/bench_downscale.py --child-cells 20000 --methods uniform,tiny --device cuda

Prints one row per run (method, device, area, time, km2/s, peak RSS, conservation) and the
throughput ratio of each model to uniform (the I/O-bound reference). ``--json FILE`` saves them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def _make_checkpoint(path: Path, preset_name: str, aux_names: list[str], years_window: int) -> Path:
    import torch

    from carbonsr_cli.checkpoints import save_checkpoint
    from models.config import preset
    from models.network import DSTCarbonFormer, count_parameters

    cfg = preset(preset_name, len(aux_names))
    torch.manual_seed(0)
    net = DSTCarbonFormer(cfg)
    stats = {"aux": [{"name": n, "transform": "log1p", "mean": 1.0, "std": 1.0, "clip_lo": -10.0, "clip_hi": 30.0}
                     for n in aux_names]}
    save_checkpoint(path, {"model_config": cfg.to_dict(), "model_state": net.state_dict(), "aux_names": aux_names,
                           "stats": stats, "factor": 10, "years_window": years_window})
    print(f"# {preset_name}: {count_parameters(net):,} parameters, T={years_window}", file=sys.stderr)
    return path


def _synthetic_big(out: Path, parent: int, parent_rows: int | None = None) -> tuple[Path, Path]:
    """A ``parent_rows x parent`` 1 km main raster (1 year) and one 1 km aux layer, written by blocks."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    out.mkdir(parents=True, exist_ok=True)
    main, aux_dir = out / "big_main.tif", out / "aux"
    aux_dir.mkdir(exist_ok=True)
    aux = aux_dir / "lights.tif"
    rows = parent_rows or parent
    prof = dict(driver="GTiff", width=parent, height=rows, count=1, dtype="float32", crs="EPSG:32633",
                transform=from_origin(200_000.0, 6_000_000.0, 1000.0, 1000.0), tiled=True, blockxsize=256,
                blockysize=256, compress="deflate")
    rng = np.random.default_rng(0)
    with rasterio.open(main, "w", nodata=-9999.0, **prof) as m, rasterio.open(aux, "w", **prof) as a:
        m.set_band_description(1, "2020")
        for r0 in range(0, rows, 256):
            h = min(256, rows - r0)
            t = rng.gamma(0.6, 40.0, (h, parent)).astype("float32")
            t[rng.random((h, parent)) < 0.2] = 0.0
            m.write(t, 1, window=Window(0, r0, parent, h))
            a.write((t * 0.5 + rng.random((h, parent)) * 10).astype("float32"), 1, window=Window(0, r0, parent, h))
    return main, aux_dir


def worker(spec: dict) -> dict:
    """Run one downscale in this process and return its figures."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    from carbonsr_cli.downscale import downscale

    t0 = time.perf_counter()
    s = downscale(spec["main"], spec["aux"], spec["out"], method=spec["method"], checkpoint=spec.get("checkpoint"),
                  device=spec["device"], batch_size=spec.get("batch_size"), overwrite=True, progress=False,
                  check=spec.get("check", True))
    wall = time.perf_counter() - t0
    if s.device.startswith("cuda"):
        torch.cuda.synchronize()
    return {
        "label": spec["label"], "device": s.device, "precision": s.precision, "area_km2": s.area_km2,
        "years": len(s.years), "child_cells": s.child_cells, "tiles": s.tiles, "seconds": s.seconds,
        "wall_with_check": wall, "km2_per_s": s.km2_per_s, "peak_rss_mb": _peak_rss_mb(),
        "conservation_ok": s.conservation.ok, "max_rel_error": s.conservation.max_rel_error,
        "gpu_peak_mb": (torch.cuda.max_memory_allocated() / 2**20) if s.device.startswith("cuda") else None,
    }


def _run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run {spec['label']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse arguments, prepare data and checkpoints, run each configuration in a subprocess."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-km", type=int, default=100, help="edge of the sample region in km (default 100)")
    ap.add_argument("--child-cells", type=int, default=None,
                    help="memory mode: synthetic output of N x N child cells (e.g. 20000), 1 year, 1 aux layer")
    ap.add_argument("--child-rows", type=int, default=None,
                    help="with --child-cells: only this many child rows (a full-width strip; memory per "
                         "row band is the same, so a strip measures the model path's peak RSS quickly)")
    ap.add_argument("--methods", default="uniform,tiny,base",
                    help="comma list of uniform, dasymetric and model presets (tiny, base, large)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--years", type=int, default=3, help="years in the sample (bands)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-check", action="store_true", help="skip the conservation re-read")
    ap.add_argument("--workdir", type=Path, default=None, help="where to put data (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_downscale_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.child_cells:
        parent = args.child_cells // 10
        prow = (args.child_rows // 10) if args.child_rows else None
        main_path, aux_dir = _synthetic_big(work / f"big{parent}x{prow or parent}", parent, prow)
        aux_names = ["lights"]
        years = 1
    else:
        from carbonsr_cli.aux import discover_aux, layer_names
        from carbonsr_cli.sample_data import generate_sample_data

        years = args.years
        sd = generate_sample_data(work / f"sample{args.size_km}", size_km=args.size_km,
                                  years=tuple(range(2020 - years + 1, 2021)), overwrite=True)
        main_path, aux_dir = sd.emissions, sd.aux_dir
        aux_names = layer_names(discover_aux([aux_dir]))
    print(f"# data ready in {time.perf_counter() - t0:.1f} s: {main_path}", file=sys.stderr)

    rows = []
    for m in [x.strip() for x in args.methods.split(",") if x.strip()]:
        spec = {"label": m, "main": str(main_path), "aux": [str(aux_dir)], "out": str(work / f"out_{m}.tif"),
                "device": args.device, "batch_size": args.batch_size, "threads": args.threads,
                "check": not args.no_check}
        if m in ("uniform", "dasymetric"):
            spec["method"] = m
            if m == "uniform":
                spec["aux"] = []
        else:
            tw = 1 if m == "tiny" else min(3, years)
            spec["method"] = "model"
            spec["checkpoint"] = str(_make_checkpoint(work / f"{m}.pth", m, aux_names, tw))
        r = _run_child(spec)
        rows.append(r)
        print(f"# {m}: {r['seconds']:.1f} s", file=sys.stderr)

    head = f"{'method':<10} {'device':<7} {'prec':<7} {'km2':>9} {'years':>5} {'tiles':>7} {'time s':>8} " \
           f"{'km2/s':>9} {'RSS MB':>8} {'GPU MB':>8} {'conserved':>9}"
    print(head)
    for r in rows:
        gpu = f"{r['gpu_peak_mb']:.0f}" if r["gpu_peak_mb"] else "-"
        print(f"{r['label']:<10} {r['device']:<7} {r['precision']:<7} {r['area_km2']:>9,.0f} {r['years']:>5} "
              f"{r['tiles']:>7} {r['seconds']:>8.2f} {r['km2_per_s']:>9,.1f} {r['peak_rss_mb']:>8.0f} {gpu:>8} "
              f"{str(r['conservation_ok']):>9}")
    base = next((r for r in rows if r["label"] == "uniform"), None)
    if base:
        for r in rows:
            if r is not base:
                print(f"throughput ratio {r['label']}/uniform = {r['km2_per_s'] / base['km2_per_s']:.3f}")
    if args.child_cells:
        worst = max(r["peak_rss_mb"] for r in rows)
        print(f"peak RSS {worst:.0f} MB on a {args.child_rows or args.child_cells} x {args.child_cells} output: "
              f"{'OK (< 2048 MB)' if worst < 2048 else 'OVER 2 GB'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "") or str(os.cpu_count() or 1))
    main()
