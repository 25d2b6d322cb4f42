"""Row-band engine of ``carbonsr downscale``: read, predict, blend, water-fill, write.

The raster is processed one *row of tiles* at a time (:class:`~carbonsr_cli.tiling.TileLayout`):

1. A preparing thread reads the parent totals of the rows the current tile row finishes and,
   for the model, the main input (``log1p(total / factor**2)`` broadcast to the children) of
   the tile row, mirror-padded at raster edges, and assembles its aux inputs from row strips
   that reader threads or processes read once each, ahead of use
   (:mod:`carbonsr_cli.downscale.strips`; on CUDA the strips are copied to the device once and
   joined there). Each thread opens its own dataset handles (rasterio datasets are not
   thread-safe).
2. The main thread runs the model on batches of tiles (``[B, C_aux, T, H, W]``; on CUDA a
   bfloat16 copy of the model when a check on the first batch stays within :data:`~carbonsr_cli.downscale.predict.BF16_TOL`,
   full batches replayed from a CUDA graph), blends the
   overlapping raw predictions in the log domain (:class:`~carbonsr_cli.tiling.BlendStream`)
   and water-fills every parent cell in float64 on the device.
3. A writer thread writes each finished band of child rows through
   :class:`~carbonsr_cli.writer.RasterWriter` (temp file + rename: an error or Ctrl-C leaves no
   output).

Memory is bounded by the strip reader's slots (about ``readers + 2`` strips ahead plus the
strips of the current tile row), two prepared tile rows and one batch on the device.

Baselines need no tiles: their bands of rows are read, filled and finished in several threads
(:func:`carbonsr_cli.downscale.bands.run_baseline_bands`) and written by the same writer.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from carbonsr_cli.console import plural
from carbonsr_cli.devices import to_device
from carbonsr_cli.downscale import readers, strips
from carbonsr_cli.downscale.aux_prep import AuxPreparation
from carbonsr_cli.downscale.bands import MAX_PENDING_WRITES, finish_band, row_window, run_baseline_bands, write_band
from carbonsr_cli.downscale.plan import read_totals
from carbonsr_cli.downscale.predict import BandData, _current, _Predictor, _predict_row, _water_fill, unique_windows
from carbonsr_cli.downscale.progress import _progress
from carbonsr_cli.rasters import open_raster
from carbonsr_cli.tiling import BlendStream, TileLayout, pad_reflect
from carbonsr_cli.writer import RasterWriter

if TYPE_CHECKING:  # pragma: no cover
    from carbonsr_cli.downscale.plan import Plan
    from carbonsr_cli.downscale.summary import DownscaleSummary

__all__ = ["LAST_RUN_SECONDS", "run_pipeline"]


#: Target size of the raw aux inputs of one chunk of tiles (host memory per read, x2 with prefetch).
CHUNK_BYTES = 64 << 20


#: Seconds the main thread of the last :func:`run_pipeline` call spent waiting for inputs
#: (``"read_wait"``) and in total (``"total"``); for benchmarks.
LAST_RUN_SECONDS: dict[str, float] = {}


# --------------------------------------------------------------------------------------
# Reading (runs in the reader thread)
# --------------------------------------------------------------------------------------


class _BandReader:
    """Reads :class:`BandData`; used from one thread only, which owns its dataset handles."""

    def __init__(self, plan: Plan, layout: Any, chunks: list[tuple[int, int]]) -> None:
        self.plan = plan
        self.layout = layout
        self.chunks = chunks
        self._ds: Any = None

    def _open(self) -> None:
        self._ds = open_raster(self.plan.main_path)  # the aux layers come from the strip reader

    def out_rows(self, i: int) -> tuple[int, int]:
        """Child rows finished by tile row ``i`` (see ``TileLayout.ready_until``)."""
        r0 = self.layout.ready_until(i - 1) if i > 0 else 0
        return r0, max(r0, self.layout.ready_until(i))

    def read(self, i: int, j: int = 0) -> BandData:
        """Model: read the inputs of chunk ``j`` of tile row ``i`` (totals with chunk 0)."""
        if self._ds is None:
            self._open()

        plan = self.plan
        f = plan.factor
        r0, r1 = self.out_rows(i)
        totals = None
        if j == 0:
            totals = read_totals(self._ds, plan, r0 // f, r1 // f, plan.out_bands) if r1 > r0 else np.zeros(
                (len(plan.out_bands), 0, plan.grid.width)
            )
        data = BandData(i=i, out_rows=(r0, r1), totals=totals)
        self._read_model_inputs(i, *self.chunks[j], data)
        return data

    def _read_model_inputs(self, i: int, j0: int, j1: int, data: BandData) -> None:

        plan, lay = self.plan, self.layout
        f = plan.factor
        o, tp = lay.overlap_parent, lay.tile_parent
        ph, pw = lay.parent_height, lay.parent_width
        # Parent extent of tiles j0..j1-1 of row i (tiles of a row share their rows).
        er0 = i * lay.stride_parent - o
        er1 = er0 + tp
        ec0 = j0 * lay.stride_parent - o
        ec1 = (j1 - 1) * lay.stride_parent - o + tp
        rr0, rr1 = max(er0, 0), min(er1, ph)
        cc0, cc1 = max(ec0, 0), min(ec1, pw)
        pad = ((rr0 - er0, er1 - rr1), (cc0 - ec0, ec1 - cc1))
        tot = read_totals(self._ds, plan, rr0, rr1, plan.in_bands, c0=cc0, c1=cc1)
        main = np.log1p(np.nan_to_num(tot, nan=0.0) / (f * f)).astype(np.float32)
        main, _ = pad_reflect(main, pad)
        data.main = np.repeat(np.repeat(main, f, axis=-2), f, axis=-1)
        data.origin = (er0 * f, ec0 * f)
        # The aux inputs come from the strip reader (carbonsr_cli.downscale.strips).

    def close(self) -> None:
        """Close the handles (call from the reader thread)."""
        if self._ds is not None:
            with contextlib.suppress(Exception):
                self._ds.close()
            self._ds = None


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def run_pipeline(
    plan: Plan,
    dst: Path,
    summary: DownscaleSummary,
    *,
    loaded: Any,
    device: Any,
    batch_size: int,
    dtype: str,
    cog: bool,
    overwrite: bool,
    compress: str,
    uncertainty: Path | None,
    progress: bool,
    normalizer: Any = None,
    prep: AuxPreparation | None = None,
    extra_devices: Sequence[Any] = (),
    close_later: Callable[[Callable[[], Any]], None] | None = None,
) -> None:
    """Run the row-band pipeline and write ``dst`` (and ``uncertainty``) atomically.

    Args:
        plan: Validated run plan.
        dst: Output path (checked).
        summary: Updated in place (tiles, precision, notes).
        loaded: ``LoadedModel`` for the model method, else None.
        device: Torch device.
        batch_size: Tiles per batch.
        dtype: ``float32`` or ``float64``.
        cog: Write a COG.
        overwrite: Replace existing outputs.
        compress: Compression name.
        uncertainty: Optional per-pixel std output.
        progress: Show a progress bar.
        normalizer: ``AuxNormalizer`` of the model's aux channels (model only).
        prep: The aux stack prepared in the background (model only; see :func:`_open_strip_feed`).
        extra_devices: More GPUs for the model (copies of it, called in turn; ``device``
            blends and water-fills): see ``_Predictor``.
        close_later: Takes the strip feed's close (its reader processes' shutdown) to run
            after this returns, e.g. a :class:`~carbonsr_cli.background.DeferredCloses`
            (None: closed before this returns).
    """
    f = plan.factor
    is_model = plan.method.method.runs_model
    out_dtype: Any = None  # torch dtype of the model's water-fill (a baseline run needs no torch)
    if is_model:
        import torch

        out_dtype = torch.float64 if dtype == "float64" else torch.float32
    layout = TileLayout(plan.grid.height, plan.grid.width, f, plan.tile_child, plan.overlap_parent)
    n_years = len(plan.out_names)
    predictor = None
    if is_model:
        predictor = _Predictor(loaded.model, normalizer, device, batch_size, summary, block=plan.factor,
                               extra_devices=extra_devices)
    n_views = 8 if (is_model and uncertainty is not None) else 1
    tags = {
        "CARBONSR_UNITS": f"{summary.units} (cell = child cell, 1/{f * f} of a parent cell)" if plan.unit is None else summary.units,
        "CARBONSR_QUANTITY": "estimate (every factor x factor block sums to its parent total)",
        "CARBONSR_METHOD": plan.method.label,
        "CARBONSR_MODEL_SHA256": summary.model_sha256 or "",
        "CARBONSR_AUX_LAYERS": ",".join(plan.aux_names),
    }
    if plan.method.method.runs_model:
        t = len(plan.windows[0][0])
        tags["CARBONSR_TEMPORAL_WINDOW"] = (
            "1 band: each output band alone" if t == 1
            else f"{plural(t, 'band')} centred on each output band (shifted at the ends)"
        )
    if uncertainty is not None:
        tags["CARBONSR_UNCERTAINTY"] = os.path.basename(str(uncertainty))
    source = plan.source_name or plan.main_path.name
    writer_kw = dict(
        compress=compress, cog=cog, overwrite=overwrite, source=source, band_units=summary.units,
        creation_options=plan.creation_options, overviews=plan.overviews,
        read_room=_writer_read_room(plan, is_model, writers=2 if uncertainty is not None else 1),
    )

    chunks = _tile_chunks(layout, plan, batch_size) if is_model else []
    readers: list[_BandReader] = []
    local = threading.local()
    feed: Any = None

    def read_unit(i: int, j: int) -> BandData:
        # Model only: one _BandReader (own dataset handles) per thread: totals and main input.
        rd = getattr(local, "reader", None)
        if rd is None:
            rd = local.reader = _BandReader(plan, layout, chunks)
            readers.append(rd)
        data = rd.read(i, j)
        if j == 0:
            data.row = layout.row(i)
        if feed is not None:  # aux inputs assembled from the row strips
            data.aux = strips.assemble(feed.geom, i, j, feed.get(i, j), aux_order)
            if feed.device is not None:  # upload here, not in the thread that feeds the GPU

                data.main = to_device(data.main, feed.device)
        return data

    blend_device = device if (is_model and predictor is not None and predictor.on_device) else None
    fill_graphs: dict | None = {} if (blend_device is not None and predictor.use_graphs) else None
    streams = [BlendStream(layout, channels=n_years, device=blend_device) for _ in range(n_views)] if is_model else []
    n_samples = len(unique_windows(plan.windows)[0]) if is_model else n_years
    prog = _progress(progress, layout.n_tiles * n_samples * n_views, f"downscale {plan.method.label}")
    with contextlib.ExitStack() as stack:
        if is_model:
            # This thread queues the GPU work (forward, blending, water-fill, the copies back):
            # ``device`` must be its current device, as CUDA graphs capture on the current
            # device's streams and events record there (``--device cuda:1``, or a GPU list that
            # does not start at cuda:0).
            stack.enter_context(_current(device))
        writer = stack.enter_context(
            RasterWriter(
                dst, plan.child, count=n_years, dtype=dtype, nodata=plan.nodata_out, band_descriptions=plan.out_names,
                tags=tags, units=tags["CARBONSR_UNITS"], **writer_kw,
            )
        )
        unc_writer = None
        if uncertainty is not None:
            unc_tags = dict(
                tags,
                CARBONSR_UNITS=tags["CARBONSR_UNITS"] + " (standard deviation over 8 flips/rotations)",
                CARBONSR_QUANTITY="standard deviation of the estimate over the 8 flips/rotations of each tile",
                CARBONSR_METHOD=f"{plan.method.label} (standard deviation over 8 flips/rotations)",
                CARBONSR_ESTIMATE=os.path.basename(str(dst)),
            )
            del unc_tags["CARBONSR_UNCERTAINTY"]
            unc_writer = stack.enter_context(
                RasterWriter(
                    uncertainty, plan.child, count=n_years, dtype=dtype, nodata=plan.nodata_out,
                    band_descriptions=[f"{n} std" for n in plan.out_names], tags=unc_tags,
                    units=unc_tags["CARBONSR_UNITS"], **writer_kw,
                )
            )
        if not is_model:
            try:
                wait, total = run_baseline_bands(plan, writer, summary, prog, dtype, layout.n_tiles * n_years)
            finally:
                if prog is not None:
                    prog.stop()
            LAST_RUN_SECONDS.clear()
            LAST_RUN_SECONDS.update(read_wait=wait, total=total)
            return
        aux_order: list[int] | None = None
        warm = None
        if predictor is not None and predictor.on_device:  # overlaps the readers' start-up
            n_u = len(unique_windows(plan.windows)[0])
            first = min(max(1, batch_size // n_views), (chunks[0][1] - chunks[0][0]) * n_u) * n_views
            warm = threading.Thread(
                target=predictor.warm_up, name="carbonsr-warm-up", daemon=True,
                args=(first, len(plan.aux_names), len(plan.windows[0][0]), plan.tile_child),
            )
            warm.start()
        try:
            feed, aux_order = _open_strip_feed(plan, layout, chunks, device, Path(dst).parent, prep)
        except BaseException:
            if warm is not None:
                warm.join()
            raise
        if warm is not None:  # the first units are read (and uploaded) while the warm-up runs
            stack.callback(warm.join)  # also when the loop stops before its first prediction
        if close_later is None:
            stack.callback(feed.close)
        else:
            stack.callback(close_later, feed.close)
        # One thread prepares the units (model: assembles the aux strips) ahead of the main thread.
        read_ex = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="carbonsr-read")
        submit_read = functools.partial(read_ex.submit, read_unit)
        t_start = time.perf_counter()
        read_wait = 0.0
        write_ex = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="carbonsr-write")
        reads: dict[int, cf.Future] = {}
        writes: collections.deque[cf.Future] = collections.deque()
        units = [(i, j) for i in range(layout.n_rows) for j in range(len(chunks))]
        row: list[Any] = []
        totals: np.ndarray | None = None
        preds: list[list[np.ndarray]] = []
        try:
            ahead = 2  # units prepared ahead of the one being computed
            for u in range(min(ahead, len(units))):
                reads[u] = submit_read(*units[u])
            for u, (i, j) in enumerate(units):
                if u + ahead < len(units):
                    reads[u + ahead] = submit_read(*units[u + ahead])  # prefetch
                tw = time.perf_counter()
                data = reads.pop(u).result()
                read_wait += time.perf_counter() - tw
                r0, r1 = data.out_rows
                if j == 0:
                    row = data.row if data.row is not None else layout.row(i)
                    totals = data.totals
                    preds = [[] for _ in range(n_views)]
                j0, j1 = chunks[j]
                if warm is not None:  # the model's first batch waits for the warm-up's kernels
                    warm.join()
                    warm = None
                got = _predict_row(predictor, data, row[j0:j1], plan, n_views, prog)
                for d in range(n_views):
                    preds[d].extend(got[d])
                del got
                data.aux = data.main = None  # free the chunk inputs early
                if feed is not None:
                    feed.done(i, j)
                if j < len(chunks) - 1:
                    continue
                assert totals is not None
                summary.tiles += len(row) * n_samples * n_views
                extra = None
                views = [streams[d].push(i, row, preds[d]) for d in range(n_views)]
                preds = []
                if not views[0]:
                    continue
                ((window, _band),) = views[0]
                if int(window.row_off) != r0 or int(window.row_off + window.height) != r1:
                    raise RuntimeError(f"blend band {window} does not match the rows read ({r0}, {r1})")
                filled = [_water_fill(v[0][1], totals, f, device, out_dtype, fill_graphs) for v in views]
                if unc_writer is None:  # the writer waits for the copy to the host, not this thread
                    out = functools.partial(finish_band, filled[0], totals, plan, r0, dtype)
                else:
                    arrays = [h.numpy() for h in filled]
                    out = finish_band(arrays[0], totals, plan, r0, dtype)
                    std = np.std(np.stack([x.astype(np.float64) for x in arrays]), axis=0)
                    extra = finish_band(std, totals, plan, r0, dtype)
                    del arrays
                del filled, views
                window = row_window(plan, r0, r1)
                writes.append(write_ex.submit(write_band, writer, out, window))
                if extra is not None:
                    writes.append(write_ex.submit(unc_writer.write, extra, window))
                while len(writes) > MAX_PENDING_WRITES:
                    writes.popleft().result()
            while writes:
                writes.popleft().result()
            LAST_RUN_SECONDS.clear()
            LAST_RUN_SECONDS.update(read_wait=read_wait, total=time.perf_counter() - t_start)
        finally:
            for fut in list(reads.values()) + list(writes):
                fut.cancel()
            read_ex.shutdown(wait=True, cancel_futures=True)
            for rd in readers:  # no reader thread is running any more
                with contextlib.suppress(Exception):
                    rd.close()
            write_ex.shutdown(wait=True, cancel_futures=True)
            if prog is not None:
                prog.stop()
        # Leaving the ExitStack closes the writers: flush, (COG), rename.


#: GDAL block cache left for this process's own reads while the model path writes, when reader
#: processes read the aux layers (this process then reads only the main input and its totals).
WRITER_READ_ROOM = 64 << 20


def _writer_read_room(plan: Plan, is_model: bool, writers: int = 1) -> int | None:
    """``read_room`` of the output writers: :data:`WRITER_READ_ROOM` when the model path reads
    its aux layers in reader processes and writes one file; None (the writer's default, a
    cache of at least 256 MiB, which aux reads in this process or a second writer share)
    otherwise. At 1,000 km the cache holds three output block rows (62 MB) plus this room
    instead of 256 MiB. (GDAL's cache is one per process: the writer opened last sets it.)"""
    if not is_model or not plan.aux_names or writers > 1:
        return None
    return WRITER_READ_ROOM if readers.reader_config(plan.child.width * plan.child.height)[1] else None


def _open_strip_feed(
    plan: Plan, layout: Any, chunks: list[tuple[int, int]], device: Any, work_dir: Path,
    prep: AuxPreparation | None = None,
) -> tuple[Any, list[int] | None]:
    """The model path's aux strip reader (threads or processes) and the stack->model channel order.

    The stack is prepared by :class:`~carbonsr_cli.downscale.aux_prep.AuxPreparation`: with
    reader processes (spawned first, they import meanwhile), layers that need a warp are first
    warped once onto the child grid (GDAL, all cores) into a hidden folder in ``work_dir`` (the
    output's folder), removed at the end. ``prep``: that preparation, started while the model
    loaded; else started here.
    """

    if prep is None:
        prep = AuxPreparation(plan, work_dir)
    aux, folder, pool = prep.result()  # the folder and the processes are this function's (then the reader's)
    names = list(aux.names)
    order: list[int] | None = [names.index(n) for n in plan.aux_names]
    if order == list(range(len(names))):
        order = None
    geom = strips.StripGeometry(layout, tuple(chunks), plan.factor)
    n_readers, _ = readers.reader_config(plan.child.width * plan.child.height)
    ahead = n_readers + 2
    reader: Any
    if pool is not None:
        span = max(len(geom.strips_of_row(i)) for i in range(layout.n_rows))
        capacity = (span + 1) * len(chunks) + ahead
        try:
            reader = readers.ProcessStripReader(aux, geom, n_readers, capacity, cleanup_dir=folder, pool=pool)
        except BaseException:
            readers.remove_dir(folder)
            raise
        try:
            reader.set_stack(aux)
        except BaseException:
            reader.close()
            raise
    else:
        reader = readers.ThreadStripReader(aux, geom, n_readers)
    return readers.StripFeed(reader, geom, ahead, device), order


def _tile_chunks(layout: Any, plan: Plan, batch_size: int) -> list[tuple[int, int]]:
    """Split a tile row into runs of tiles whose aux inputs take about :data:`CHUNK_BYTES`.

    Keeps host memory independent of the raster width; a run holds a multiple of the batch
    size (when that fits) so that batches stay full.
    """
    per_tile = max(1, len(plan.aux_names)) * max(1, len(plan.in_bands)) * plan.tile_child * (
        layout.stride_parent * plan.factor
    ) * 4
    k = max(1, CHUNK_BYTES // per_tile)
    n_u = max(1, len(unique_windows(plan.windows)[0]))
    per_batch = max(1, -(-batch_size // n_u))  # tiles per batch
    k = max(per_batch, k // per_batch * per_batch)
    return [(j, min(j + k, layout.n_cols)) for j in range(0, layout.n_cols, k)]
