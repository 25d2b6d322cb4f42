"""What one reader process pays per strip: the whole aux stack and each source alone.

A downscale reader process (``carbonsr_cli/downscale/readers.py``) reads full-width strips of
80 child rows (one tile-row stride), every ``N``-th strip when ``N`` readers share the rows, with
GDAL's block cache at the readers' 32 MB and layers in another CRS pre-warped first. This script
does the same in one process on a sample-data folder and prints milliseconds per strip::

    python benchmarks/reader_strip_costs.py DATA [--every 3] [--offset 0]
    GDAL_NUM_THREADS=4 python benchmarks/reader_strip_costs.py DATA    # GDAL's block decoding threads

Run ``--every 3`` three times at once with offsets 0, 1, 2 to see the cost when the readers
share the host (issue 20, session 18: 83 ms per strip alone, 104 ms three at once, 1,000 km).
The per-source rows read each source again over the same strips (its blocks may then be in
GDAL's cache), so they show where the time goes rather than add up to the total.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

#: The reader processes' GDAL block cache (``readers.WORKER_GDAL_CACHE_MB``), set before GDAL starts.
os.environ.setdefault("GDAL_CACHEMAX", "32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="a sample-data folder (emissions_1km.tif, aux/)")
    ap.add_argument("--every", type=int, default=3, help="read every N-th strip (N readers)")
    ap.add_argument("--offset", type=int, default=0, help="first strip (the reader's place among N)")
    args = ap.parse_args()

    import shutil

    from rasterio.windows import Window

    from carbonsr_cli.aux import AuxStack, discover_aux
    from carbonsr_cli.grids import ParentGrid

    grid = ParentGrid.from_raster(args.data / "emissions_1km.tif", warn=False)
    child = grid.child(10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stack = AuxStack(discover_aux([args.data / "aux"]), child, list(grid.band_names))
    folder = Path(tempfile.mkdtemp(prefix="carbonsr-strip-costs-"))
    try:
        if stack.warp_targets():
            stack.materialize_warps(folder, threads=os.cpu_count() or 1)
        stack.read(Window(0, 0, 8, 8))  # opens datasets, builds the vector indexes
        h, w = child.height, child.width
        strips = range(args.offset, h // 80, max(1, args.every))
        t0 = time.perf_counter()
        for k in strips:
            stack.read(Window(0, k * 80, w, 80))
        n = max(1, len(strips))
        print(f"GDAL_NUM_THREADS={os.environ.get('GDAL_NUM_THREADS', '-')} every={args.every}: {len(strips)} strips of "
              f"{w} x 80, {1e3 * (time.perf_counter() - t0) / n:.1f} ms per strip")
        for slot in (s for g in stack._groups for s in g.per_t):  # noqa: SLF001 - a benchmark looks inside
            t0 = time.perf_counter()
            for k in strips:
                stack._read_slot(slot, 0, k * 80, w, 80)  # noqa: SLF001
            print(f"  {Path(slot.source.path).name:28s} {slot.op:12s} {1e3 * (time.perf_counter() - t0) / n:7.1f} ms per strip")
    finally:
        stack.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
