"""Where a downscale run's memory is at its peak: each process of the tree, the C heap, GDAL's cache.

Runs one ``downscale()`` in this process (like ``run.py``'s in-process rows) while a thread
samples every process of the tree every 0.1 s (``/proc/PID/smaps_rollup``) and keeps the sample
with the largest total PSS. At that sample it also reads glibc's heap totals of this process
(``mallinfo2``: in use and free inside the heaps) and GDAL's block cache (used and maximum).
Prints one table; ``--json`` keeps every figure. Linux only.

Example (1,000 km sample, ``base`` checkpoint, GPU host)::

    python benchmarks/memory_peak.py --data REGION --checkpoint base.pth --device cuda
    CARBONSR_READ_PROCS=3 python benchmarks/memory_peak.py --data REGION --checkpoint base.pth --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_ROLLUP_KEYS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem")


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc; just ``pid`` elsewhere)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            continue
    return out


def _rollup_kb(pid: int) -> dict[str, int]:
    """``smaps_rollup`` figures of ``pid`` in kB (empty when the process is gone)."""
    d: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in _ROLLUP_KEYS:
                    d[key] = int(value.split()[0])
    except OSError:
        pass
    return d


def _mib(figures: dict[str, int]) -> dict[str, int]:
    return {k: v // 1024 for k, v in figures.items()}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_mb() -> dict[str, int]:
    """glibc heap totals of this process over all arenas, MiB: in use, free inside the heaps, mmapped."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
        fn.restype = _MallInfo2
        m = fn()
    except (OSError, AttributeError):  # not glibc >= 2.33
        return {}
    return {"in_use": m.uordblks >> 20, "free_in_heaps": m.fordblks >> 20, "mmapped": m.hblkhd >> 20}


_GDAL: list[Any] = []


def _gdal_cache_mb() -> dict[str, int]:
    """GDAL's block cache of this process, MiB: used and maximum (empty before GDAL is loaded)."""
    if not _GDAL:
        with open("/proc/self/maps") as fh:
            path = next((line.split()[-1] for line in fh if "libgdal" in line), None)
        if path is None:
            return {}
        lib = ctypes.CDLL(path)
        lib.GDALGetCacheUsed64.restype = lib.GDALGetCacheMax64.restype = ctypes.c_int64
        _GDAL.append(lib)
    return {"used": _GDAL[0].GDALGetCacheUsed64() >> 20, "max": _GDAL[0].GDALGetCacheMax64() >> 20}


class PeakSampler:
    """Samples the process tree every ``every`` seconds in a thread; the peak after ``stop()``.

    ``stop()`` returns ``{"total_pss_mb": ...}`` (the largest total PSS of this process and its
    descendants, MiB; 0 where ``/proc/PID/smaps_rollup`` does not exist) and, with ``details``,
    at that sample: ``main`` and ``children`` (their ``smaps_rollup`` figures, MiB), ``heap_mb``
    (this process's C heap) and ``gdal_cache_mb``. ``benchmarks/run.py`` uses it for its memory
    row (``details=False``: no heap or GDAL calls while it times the run).
    """

    def __init__(self, every: float = 0.1, details: bool = True) -> None:
        self.every = every
        self.details = details
        self.best: dict[str, Any] = {"total_pss_mb": 0.0}
        self._best_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.enabled = os.path.exists(f"/proc/{os.getpid()}/smaps_rollup")
        if self.enabled:
            self._thread.start()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.wait(self.every):
            procs = {p: _rollup_kb(p) for p in tree_pids(me)}
            total = sum(v.get("Pss", 0) for v in procs.values())
            if total > self._best_kb:
                self._best_kb = total
                best: dict[str, Any] = {"total_pss_mb": total / 1024}
                if self.details:
                    best.update(main=_mib(procs.get(me, {})),
                                children=[_mib(v) for p, v in procs.items() if p != me and v],
                                heap_mb=_heap_mb(), gdal_cache_mb=_gdal_cache_mb())
                self.best = best

    def stop(self) -> dict[str, Any]:
        if self.enabled:
            self._stop.set()
            self._thread.join()
        return self.best


def _table(res: dict[str, Any]) -> str:
    peak = res["peak"]
    main = peak["main"]
    kids = peak["children"]
    heap, gdal = peak["heap_mb"], peak["gdal_cache_mb"]
    rows = [
        ("process tree PSS at the peak", f"{peak['total_pss_mb']:,.0f}"),
        ("  main process PSS", f"{main.get('Pss', 0):,}"),
        ("    anonymous / files / shared memory", f"{main.get('Pss_Anon', 0):,} / {main.get('Pss_File', 0):,} / "
                                                   f"{main.get('Pss_Shmem', 0):,}"),
        ("    C heap in use / free inside the heaps", f"{heap.get('in_use', 0):,} / {heap.get('free_in_heaps', 0):,}"),
        ("    GDAL block cache used / max", f"{gdal.get('used', 0):,} / {gdal.get('max', 0):,}"),
        (f"  other processes ({len(kids)})", " ".join(f"{k.get('Pss', 0):,}" for k in kids) or "-"),
        ("run seconds (downscale() call, check included)", f"{res['wall_s']:.2f}"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b:>22}" for a, b in [("figure (MiB)", "value"), *rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="a sample-data folder (emissions_1km.tif, aux/)")
    ap.add_argument("--main", type=Path, default=None, help="the 1 km raster (instead of --data)")
    ap.add_argument("--aux", type=Path, default=None, help="the aux folder (instead of --data)")
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=None, help="output raster (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    main_path = args.main or (args.data / "emissions_1km.tif" if args.data else None)
    aux_dir = args.aux or (args.data / "aux" if args.data else None)
    if main_path is None or aux_dir is None:
        ap.error("give --data, or --main and --aux")

    from carbonsr_cli.downscale import downscale

    out = args.out or Path(tempfile.mkdtemp(prefix="carbonsr_mem_")) / "out.tif"
    sampler = PeakSampler()
    t0 = time.perf_counter()
    downscale(main_path, [aux_dir], out, method="model", checkpoint=args.checkpoint,
              device=args.device, overwrite=True, progress=False, check=True)
    res = {"wall_s": time.perf_counter() - t0, "peak": sampler.stop(),
           "read_procs": os.environ.get("CARBONSR_READ_PROCS", "default")}
    print(_table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
