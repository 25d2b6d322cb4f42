"""Benchmark: reading an aligned aux stack by 120 x 120 windows vs by full-width row bands.

Reads every aux layer of the sample region (``carbonsr sample-data``; generated into a
temporary directory unless ``--data`` is given) on a 1000 x 1000 child-cell region
(``--size-km 100``) and prints a table: windows read, seconds, ms per window and million
child cells x channels x years per second. ``--device cuda`` also copies every window to the
GPU (``torch.from_numpy(...).to(device)``) to show the host-to-device cost; reading itself is
CPU work (GDAL warping, numpy).

``--per-layer`` instead times each aux source alone (``AuxStack._read_slot``, one year):
ms per 120 x 120 window (stride 80, as the model tiles) and per 120-row full-width band,
each measurement on a fresh stack.

Example:
    python benchmarks/bench_aux.py --size-km 100 --repeat 2
    nice python benchmarks/bench_aux.py --size-km 200 --years 1 --per-layer
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np


def _windows(height: int, width: int, tile: int, stride: int) -> Iterator[tuple[int, int, int, int]]:
    """``(col, row, w, h)`` of tiles of ``tile`` cells every ``stride`` cells, overlap centred."""
    pad = (tile - stride) // 2
    for r in range(0, height, stride):
        for c in range(0, width, stride):
            yield c - pad, r - pad, tile, tile


def _rows(height: int, band: int, stride: int) -> Iterator[tuple[int, int]]:
    pad = (band - stride) // 2
    for r in range(0, height, stride):
        yield r - pad, band


def _time(fn: Callable[[], int], repeat: int) -> tuple[float, int]:
    best, n = float("inf"), 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = fn()
        best = min(best, time.perf_counter() - t0)
    return best, n


def _per_layer(make_stack: Callable[[], object], h: int, w: int, repeat: int) -> None:
    """Print ms per 120 x 120 window (stride 80, 2-cell overlap) and per 120-row band, per aux source.

    Every (source, mode, repeat) uses a fresh stack, so GDAL's block cache of the warped
    output (kept per WarpedVRT) does not carry over between measurements.
    """
    probe = make_stack()
    keys = []
    for g in probe._groups:  # type: ignore[attr-defined]
        for s in g.per_t:
            k = (s.source.path, s.op)
            if k not in keys:
                keys.append(k)
    probe.close()  # type: ignore[attr-defined]
    wins = list(_windows(h, w, 120, 80))
    bands = list(_rows(h, 120, 80))
    print(f"\n{'layer (source, op)':<40} {'ms/window':>10} {'ms/band':>10}   ({len(wins)} windows, {len(bands)} bands)")
    tot_w = tot_b = 0.0

    def measure(key: tuple[Path, str], items: list[tuple[int, int, int, int]]) -> float:
        best = float("inf")
        for _ in range(repeat):
            stack = make_stack()
            slot = next(s for g in stack._groups for s in g.per_t if (s.source.path, s.op) == key)  # type: ignore[attr-defined]
            stack._read_slot(slot, 0, 0, 8, 8)  # type: ignore[attr-defined]  # opens the dataset, builds indexes
            t0 = time.perf_counter()
            for c, r, ww, hh in items:
                stack._read_slot(slot, c, r, ww, hh)  # type: ignore[attr-defined]
            best = min(best, (time.perf_counter() - t0) / len(items))
            stack.close()  # type: ignore[attr-defined]
        return best

    for key in keys:
        tw = measure(key, wins)
        tb = measure(key, [(0, r, w, hh) for r, hh in bands])
        tot_w += tw
        tot_b += tb
        print(f"{key[0].name + ' ' + key[1]:<40} {tw * 1e3:>10.2f} {tb * 1e3:>10.1f}")
    print(f"{'total (one year)':<40} {tot_w * 1e3:>10.2f} {tot_b * 1e3:>10.1f}")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="existing sample-data directory (has aux/)")
    parser.add_argument("--size-km", type=int, default=100, help="side of the generated region in km (default 100)")
    parser.add_argument("--repeat", type=int, default=2, help="repeats per mode; the best time is shown")
    parser.add_argument("--device", default="cpu", help="copy each window to this torch device (cpu, cuda)")
    parser.add_argument("--years", type=int, default=3, help="years in the generated region (default 3)")
    parser.add_argument(
        "--per-layer", action="store_true",
        help="only time each aux source separately (ms per 120x120 window and per 120-row band)",
    )
    args = parser.parse_args(argv)

    from rasterio.windows import Window

    from carbonsr_cli.aux import AuxStack, discover_aux
    from carbonsr_cli.grids import ParentGrid

    tmp = None
    data = args.data
    if data is None:
        from carbonsr_cli.sample_data import generate_sample_data

        tmp = tempfile.TemporaryDirectory(prefix="carbonsr-bench-aux-")
        data = Path(tmp.name) / "data"
        t0 = time.perf_counter()
        generate_sample_data(data, seed=0, size_km=args.size_km, years=tuple(range(2019, 2019 + args.years)))
        print(f"generated sample data ({args.size_km} km) in {time.perf_counter() - t0:.1f} s")

    copy: Callable[[np.ndarray], object] = lambda a: a  # noqa: E731
    if args.device != "cpu":
        import torch

        dev = torch.device(args.device)

        def copy(a: np.ndarray) -> object:
            t = torch.from_numpy(a).to(dev, non_blocking=False)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return t

    grid = ParentGrid.from_raster(data / "emissions_1km.tif", warn=False)
    child = grid.child(10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        sources = discover_aux([data / "aux"])
        t_disc = time.perf_counter() - t0
        t0 = time.perf_counter()
        stack = AuxStack(sources, child, list(grid.band_names))
        t_open = time.perf_counter() - t0
    h, w = child.height, child.width
    c_aux, t_years = stack.channels, len(grid.band_names)
    print(f"child grid {h} x {w} cells, {c_aux} aux channels x {t_years} years; "
          f"discover {t_disc * 1e3:.0f} ms, open + coverage {t_open * 1e3:.0f} ms")
    stack.read(Window(0, 0, 8, 8))  # warm-up: opens VRTs, builds vector indexes
    if args.per_layer:
        def make() -> AuxStack:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return AuxStack(sources, child, list(grid.band_names))

        _per_layer(make, h, w, args.repeat)
        stack.close()
        if tmp is not None:
            tmp.cleanup()
        return

    def by_windows(tile: int, stride: int) -> Callable[[], int]:
        def run() -> int:
            n = 0
            for c, r, ww, hh in _windows(h, w, tile, stride):
                copy(stack.read(Window(c, r, ww, hh)))
                n += 1
            return n

        return run

    def by_rows(band: int, stride: int) -> Callable[[], int]:
        def run() -> int:
            n = 0
            for r, hh in _rows(h, band, stride):
                copy(stack.read_rows(Window(0, r, w, hh)))
                n += 1
            return n

        return run

    modes = [
        ("windows 120x120, no overlap", by_windows(120, 120)),
        ("windows 160x160, stride 120 (2 parent cells overlap)", by_windows(160, 120)),
        ("row bands 120 rows", by_rows(120, 120)),
        ("row bands 160 rows, stride 120", by_rows(160, 120)),
    ]
    rows = []
    for name, fn in modes:
        secs, n = _time(fn, args.repeat)
        rows.append((name, n, secs))
    base = rows[0][2]
    print()
    print(f"{'mode':<54} {'reads':>6} {'seconds':>8} {'ms/read':>8} {'Mvals/s':>8} {'vs first':>8}")
    for name, n, secs in rows:
        mvals = h * w * c_aux * t_years / secs / 1e6
        print(f"{name:<54} {n:>6} {secs:>8.2f} {secs / n * 1e3:>8.1f} {mvals:>8.1f} {base / secs:>7.2f}x")
    print(f"(best of {args.repeat}; device for copies: {args.device}; Mvals = child cells x channels x years)")
    stack.close()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
