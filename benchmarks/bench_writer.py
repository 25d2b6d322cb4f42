"""Benchmark: stream a large child-grid output through RasterWriter by tile rows.

Writes a ``size x size`` float32 raster (default 20,000 x 20,000 child cells = 200 x 200 km at
100 m, 1.6 GB uncompressed) in bands of ``--rows`` child rows (one row of 120-cell tiles), the
way ``carbonsr downscale`` does, and prints the time and the peak resident memory of the
process (``resource.getrusage``). Target: peak RSS < 1.5 GB at the default size.

Usage:
    python benchmarks/bench_writer.py                 # 20,000 x 20,000, deflate
    python benchmarks/bench_writer.py --size 4000 --cog --bands 3

The writer runs on the CPU only (GDAL); ``--device`` is accepted for symmetry with the other
benchmarks and ignored.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20


def _current_rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _rss_mb()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a small table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20_000, help="child cells per side (default 20000)")
    ap.add_argument("--bands", type=int, default=1, help="bands (years) (default 1)")
    ap.add_argument("--rows", type=int, default=120, help="child rows per write (one tile row; default 120)")
    ap.add_argument("--compress", default="deflate", help="deflate|lzw|zstd|none (default deflate)")
    ap.add_argument("--cog", action="store_true", help="write a COG (adds the COG copy step)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: a temp dir, removed)")
    ap.add_argument("--device", default="cpu", help="ignored (GDAL writes on the CPU)")
    args = ap.parse_args(argv)

    from rasterio.crs import CRS
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from carbonsr_cli.grids import ParentGrid
    from carbonsr_cli.writer import RasterWriter

    factor = 10
    parent_n = -(-args.size // factor)
    grid = ParentGrid(CRS.from_epsg(32633), from_origin(300000.0, 5000000.0, 1000.0, 1000.0),
                      parent_n, parent_n, -1.0, tuple(str(2000 + b) for b in range(args.bands)))
    child = grid.child(factor)
    h = w = child.width
    tmpdir = Path(tempfile.mkdtemp(prefix="bench_writer_", dir=args.out))
    dest = tmpdir / "bench.tif"
    rss0 = _current_rss_mb()
    rng = np.random.default_rng(0)
    col_profile = (1.0 + np.sin(np.arange(w, dtype=np.float32) / 97.0)).astype(np.float32)
    t0 = time.perf_counter()
    try:
        with RasterWriter(dest, child, count=args.bands, nodata=-1.0, compress=args.compress, cog=args.cog,
                          units="t CO2 / cell / yr", tags={"benchmark": "bench_writer"}) as writer:
            for r in range(0, h, args.rows):
                hh = min(args.rows, h - r)
                row_profile = (1.0 + np.cos(np.arange(r, r + hh, dtype=np.float32) / 53.0)).astype(np.float32)
                band = np.outer(row_profile, col_profile)
                band *= rng.random((hh, w), dtype=np.float32) < 0.9  # some exact zeros
                block = np.broadcast_to(band, (args.bands, hh, w))
                writer.write(block, Window(0, r, w, hh))
        elapsed = time.perf_counter() - t0
        size_mb = dest.stat().st_size / 2**20
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    raw_mb = args.bands * h * w * 4 / 2**20
    rows = [
        ("output (child cells)", f"{h} x {w} x {args.bands} band(s) float32"),
        ("uncompressed size", f"{raw_mb:,.0f} MiB"),
        ("file size", f"{size_mb:,.0f} MiB ({args.compress}{', COG' if args.cog else ''})"),
        ("write time", f"{elapsed:,.1f} s ({raw_mb / max(elapsed, 1e-9):,.0f} MiB/s uncompressed)"),
        ("RSS before writing", f"{rss0:,.0f} MiB"),
        ("peak RSS", f"{_rss_mb():,.0f} MiB (target < 1536 MiB)"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'bench_writer':<{width}}  result")
    print(f"{'-' * width}  {'-' * 40}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0 if _rss_mb() < 1536 else 1


if __name__ == "__main__":
    raise SystemExit(main())
