"""Row bands of the output: how a band of children is finished and written (every method), and
the row loop of the baselines (uniform, dasymetric, points), which need no tiles.

A baseline fills every parent block on its own, so its raster is cut into bands of whole
parent rows (:func:`baseline_bands`, up to half the output's 512-row blocks) that
:func:`baseline_workers` threads prepare at once: each reads the band's totals and aux layers
(own dataset handles), fills it (:func:`baseline_fill`: numpy for uniform and dasymetric, so
that such a run never imports torch) and finishes it (:func:`finish_band`); the main thread
hands the finished bands, in order, to one writer thread.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from carbonsr_cli import units
from carbonsr_cli.devices import HostResult
from carbonsr_cli.downscale.plan import plan_stack, read_totals
from carbonsr_cli.downscale.predict import BandData
from carbonsr_cli.downscale.progress import _advance
from carbonsr_cli.rasters import open_raster

if TYPE_CHECKING:  # pragma: no cover
    from carbonsr_cli.downscale.plan import Plan
    from carbonsr_cli.downscale.summary import DownscaleSummary

__all__ = ["BAND_BYTES", "BASELINE_BAND_ROWS", "MAX_PENDING_WRITES", "baseline_bands", "baseline_fill",
           "baseline_workers", "finish_band", "row_window", "run_baseline_bands", "write_band"]


#: Child rows of a baseline band at most (half the output's 512-row blocks).
BASELINE_BAND_ROWS = 256
#: Arrays of one baseline band while it is filled, at most (bytes; a band is one parent row at least).
BAND_BYTES = 64 << 20
#: Bytes per child cell and year while a band is filled: the raw float32 layer, the float64
#: children and their block copy, the float32 output.
_CELL_BYTES = 24
#: Pending writes allowed before the main thread waits for the writer.
MAX_PENDING_WRITES = 3


def write_band(writer: Any, band: Any, window: Any) -> None:
    """Writer-thread job: ``band`` is an array, or a callable that makes it (waiting for the GPU)."""
    writer.write(band() if callable(band) else band, window)


def row_window(plan: Plan, r0: int, r1: int) -> Any:
    """The output window of child rows ``[r0, r1)`` (full width)."""
    from rasterio.windows import Window

    return Window(0, r0, plan.child.width, r1 - r0)


def finish_band(children: Any, totals: np.ndarray, plan: Plan, r0: int, out_dtype: str) -> np.ndarray:
    """Cast, convert to density if needed and put nodata where the parent is nodata.

    ``children`` is an array ``[Y, h, w]`` or a :class:`~carbonsr_cli.devices.HostResult`.
    """

    f = plan.factor
    out = children.numpy() if isinstance(children, HostResult) else children
    if plan.unit is not None:
        from rasterio.windows import Window

        areas = units.cell_areas_m2(plan.child, Window(0, r0, plan.child.width, out.shape[-2]))
        out = np.asarray(units.from_totals(out.astype(np.float64), plan.unit, areas))
    out = out.astype(out_dtype, copy=False)
    nd = np.isnan(totals)
    if nd.any():
        mask = np.repeat(np.repeat(nd, f, axis=-2), f, axis=-1)
        if out.base is not None or not out.flags.writeable:
            out = out.copy()
        out[mask] = plan.nodata_out
    return out


def baseline_fill(data: BandData, plan: Plan) -> np.ndarray:
    """Children of a baseline for a band ``[Y, h, W]`` (float64, NaN = nodata).

    Methods with a numpy fill (uniform, dasymetric: bit for bit their torch fill) never import
    torch (~1-3 s); the others fill with torch. Baselines are computed in float64; their
    children are all >= 0, so the cast to float32 (done by the caller) changes every block sum
    by at most ~6e-8 relative.
    """
    f = plan.factor
    method = plan.method.method
    if method.numpy_fill:
        return method.fill_array(data.totals, data.weights, f)
    import torch

    t = torch.from_numpy(np.ascontiguousarray(data.totals))[None, None]
    layers = None if data.weights is None else torch.from_numpy(data.weights)[:, None, None]  # [L, 1, 1, Y, h, W]
    x = method.fill(t, layers, f)
    return x[0, 0].numpy()


def baseline_bands(plan: Plan) -> list[tuple[int, int]]:
    """Child-row bands ``(r0, r1)`` of a baseline run, top to bottom: whole parent rows, at most
    :data:`BASELINE_BAND_ROWS` tall and :data:`BAND_BYTES` of arrays while being filled."""
    from carbonsr_cli.tiling import TileLayout, align_rows

    f, h = plan.factor, plan.child.height
    per_parent_row = _CELL_BYTES * max(1, len(plan.out_bands)) * plan.child.width * f
    limit = max(1, min(BASELINE_BAND_ROWS // f, BAND_BYTES // per_parent_row))
    # a band height that divides the torchrun part alignment, so that every part reads the same
    # windows as one process (a warped aux read depends on its window: up to 719 t apart)
    unit = align_rows(TileLayout(plan.grid.height, plan.grid.width, f, plan.tile_child, plan.overlap_parent))
    rows = max(d for d in range(1, min(limit, unit) + 1) if unit % d == 0) * f
    return [(r0, min(r0 + rows, h)) for r0 in range(0, h, rows)]


def baseline_workers() -> int:
    """Threads that prepare (read, fill, finish) baseline bands: half the usable CPUs, 1..4
    (GDAL's compression in the writer thread uses every CPU; on 2 CPUs one thread was fastest)."""
    from carbonsr_cli import cpus

    return min(4, max(1, cpus.available_cpus() // 2))


class _RowReader:
    """Reads the totals and aux layers of a baseline band; used from one thread only, which owns
    its dataset handles (rasterio datasets are not thread-safe)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._ds: Any = None
        self._aux: Any = None
        self._aux_order: list[int] | None = None  # None: the stack's order

    def read(self, r0: int, r1: int) -> BandData:
        """Totals ``[Y, (r1 - r0) / f, w]`` and layers ``[L, Y, r1 - r0, W]`` of child rows ``[r0, r1)``."""
        plan = self.plan
        if self._ds is None:
            self._ds = open_raster(plan.main_path)
            if plan.aux_names:
                self._aux = plan_stack(plan).subset(plan.aux_names)  # handles of this thread
                names = list(self._aux.names)
                order = [names.index(n) for n in plan.aux_names]
                self._aux_order = None if order == list(range(len(names))) else order
        f = plan.factor
        data = BandData(i=-1, out_rows=(r0, r1), totals=read_totals(self._ds, plan, r0 // f, r1 // f, plan.out_bands))
        if self._aux is not None:
            raw = self._aux.read(row_window(plan, r0, r1))  # [L, Y, h, W] float32
            if self._aux_order is not None:
                raw = raw[self._aux_order]
            if plan.method.method.numpy_fill:  # cleaned by the fill itself
                data.weights = raw
            else:
                w = np.nan_to_num(raw.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
                data.weights = np.maximum(w, 0.0)
        return data

    def close(self) -> None:
        """Close the handles (call from the reading thread, or once it has stopped)."""
        for h in (self._aux, self._ds):
            if h is not None:
                with contextlib.suppress(Exception):
                    h.close()
        self._aux = self._ds = None


def run_baseline_bands(plan: Plan, writer: Any, summary: DownscaleSummary, prog: Any, dtype: str,
                       n_tiles: int) -> tuple[float, float]:
    """Row loop of a baseline: write every band of ``plan`` through ``writer``.

    Args:
        plan: A baseline run's plan.
        writer: Open :class:`~carbonsr_cli.writer.RasterWriter`.
        summary: ``tiles`` is increased by ``n_tiles``.
        prog: Progress bar (or None), advanced in tiles.
        dtype: Output dtype.
        n_tiles: Tiles the run counts (tiles x output bands, as the model counts them).

    Returns:
        ``(seconds the main thread waited for prepared bands, seconds of the loop)``.
    """
    bands = baseline_bands(plan)
    local = threading.local()
    readers: list[_RowReader] = []

    def prepare(r0: int, r1: int) -> np.ndarray:
        rd = getattr(local, "reader", None)
        if rd is None:
            rd = local.reader = _RowReader(plan)
            readers.append(rd)
        data = rd.read(r0, r1)
        return finish_band(baseline_fill(data, plan), data.totals, plan, r0, dtype)

    n = baseline_workers()
    ahead = n + 1  # bands being prepared (or prepared) beyond the one handed over
    t_start = time.perf_counter()
    wait, done = 0.0, 0
    prep_ex = cf.ThreadPoolExecutor(max_workers=n, thread_name_prefix="carbonsr-prepare")
    write_ex = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="carbonsr-write")
    futures: dict[int, cf.Future] = {}
    writes: collections.deque[cf.Future] = collections.deque()
    try:
        for k in range(min(ahead, len(bands))):
            futures[k] = prep_ex.submit(prepare, *bands[k])
        for k, (r0, r1) in enumerate(bands):
            if k + ahead < len(bands):
                futures[k + ahead] = prep_ex.submit(prepare, *bands[k + ahead])
            tw = time.perf_counter()
            out = futures.pop(k).result()
            wait += time.perf_counter() - tw
            writes.append(write_ex.submit(write_band, writer, out, row_window(plan, r0, r1)))
            del out
            now = n_tiles * r1 // plan.child.height
            _advance(prog, now - done)
            done = now
            while len(writes) > MAX_PENDING_WRITES:
                writes.popleft().result()
        while writes:
            writes.popleft().result()
        summary.tiles += n_tiles
        return wait, time.perf_counter() - t_start
    finally:
        for fut in list(futures.values()) + list(writes):
            fut.cancel()
        prep_ex.shutdown(wait=True, cancel_futures=True)
        for rd in readers:  # no preparing thread is running any more
            rd.close()
        write_ex.shutdown(wait=True, cancel_futures=True)
