"""``carbonsr downscale`` under torchrun: ranks split the rows of tiles, rank 0 assembles.

Scheme (N ranks, the plan's :class:`~carbonsr_cli.tiling.TileLayout` with stride ``s`` and
tile edge ``tp`` parent cells):

1. The tile rows are split into N contiguous ranges (:func:`row_parts`); rank ``k`` *owns*
   the parent rows ``[a_k, b_k)`` (core rows of its tile rows; ``a_k`` is a multiple of ``s``).
2. Rank ``k`` runs the ordinary single-process pipeline on a sub-plan whose grid is the parent
   rows ``[a_k - c, b_k + c)`` with a context of ``c = s * (ceil(tp / s) + 1)`` rows, widened
   to multiples of :func:`align_rows` (64 parent rows at factor 10: the tile stride and
   GDAL's 128-row warped-VRT blocks, see :data:`VRT_BLOCK_ROWS`) and clipped to the raster
   (:func:`part_extent`). The sub-grid's tiles are exactly the full grid's tiles (same
   windows, same tile columns, same batches per tile row), its warped aux blocks are the full
   grid's blocks, and no tile that touches the owned rows is cut by the sub-grid's edge
   (where the pipeline would mirror-pad: ``c > tp + s``). The blending, and therefore every
   owned child row, is the same as in one process; the water-filling is per parent cell, so
   every block still sums to its total (conservation holds across part borders).
3. Each rank writes its sub-grid to a hidden part GeoTIFF next to the output
   (``.<name>.part<k>of<N>.tif``, uncompressed, itself written temp + rename).
4. After a collective status check, rank 0 copies the owned rows of every part into one
   GeoTIFF (or COG) through :class:`~carbonsr_cli.writer.RasterWriter` (temp + rename; same
   tags, band names, nodata, compression as a single-process run) and removes the parts; the
   written file's conservation is checked on rank 0 and the result broadcast.

Result: bitwise identical to the single-process file for the baselines, and for the model when
every process uses the same number of CPU threads (CPU convolutions are deterministic for a
fixed thread count and batch; with other thread counts the raw predictions may differ by float
rounding). The context rows are computed twice (by two ranks): between ``c`` and ``c + 63``
extra parent rows per part border at factor 10, e.g. 1,000 rows on 2 ranks: rank 0 computes
rows 0-576 and rank 1 rows 448-1000 (about 13 % more than 1,000 rows in all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from carbonsr_cli import distributed
from carbonsr_cli.downscale.engine import run_pipeline
from carbonsr_cli.tiling import VRT_BLOCK_ROWS, TileLayout, align_rows  # noqa: F401 - re-exported
from carbonsr_cli.writer import RasterWriter

if TYPE_CHECKING:  # pragma: no cover
    from carbonsr_cli.downscale.plan import Plan
    from carbonsr_cli.downscale.summary import DownscaleSummary

__all__ = ["align_rows", "context_rows", "one_machine_hint", "part_extent", "row_parts", "part_path", "sub_plan", "run_distributed"]

#: Child rows copied per read/write during assembly.
_ASSEMBLE_ROWS = 512
#: Block height of GDAL's warped VRTs (512 x 128 blocks), through which aux layers in another
#: CRS or resolution are resampled onto the child grid. GDAL warps block by block, and the
#: result of a pixel depends (in the last bits) on its block, so part grids start on block
#: borders of the full grid's VRTs: the aux inputs of a part are then bitwise those of one
#: process.


def context_rows(layout: Any) -> int:
    """Context ``c`` in parent rows added above and below a rank's rows (a multiple of the stride)."""
    s, tp = layout.stride_parent, layout.tile_parent
    return s * (math.ceil(tp / s) + 1)


def part_extent(layout: Any, a: int, b: int) -> tuple[int, int]:
    """Parent rows ``[s0, s1)`` a rank computes to own ``[a, b)``: context, then alignment.

    ``s0`` and ``s1`` (unless at the raster edge) are multiples of :func:`align_rows`, so the
    part's tiles are the full grid's tiles and its aux layers are warped through the same
    GDAL blocks as in one process.
    """
    c, u, h = context_rows(layout), align_rows(layout), layout.parent_height
    s0 = max(0, (a - c) // u * u)
    s1 = min(h, -(-(b + c) // u) * u)
    return s0, s1


def row_parts(layout: Any, world: int) -> list[tuple[int, int]]:
    """Owned parent rows ``[a, b)`` of each rank (contiguous tile rows; empty when rows < ranks)."""
    s, h = layout.stride_parent, layout.parent_height
    out = []
    for k in range(world):
        i0, i1 = distributed.share_bounds(layout.n_rows, k, world)
        out.append((min(i0 * s, h), min(i1 * s, h)))
    return out


def part_path(dst: Path, rank: int, world: int, suffix: str = "") -> Path:
    """Hidden part file of ``rank`` next to ``dst``."""
    return dst.with_name(f".{dst.name}{suffix}.part{rank}of{world}.tif")


def sub_plan(plan: Plan, r0: int, r1: int) -> Plan:
    """The plan restricted to parent rows ``[r0, r1)`` of ``plan.grid`` (like an AOI window)."""
    from rasterio.windows import Window

    g = plan.grid
    grid = dataclasses.replace(g, transform=g.window_transform(Window(0, r0, g.width, r1 - r0)), height=r1 - r0)
    mask = plan.aoi_mask[r0:r1] if plan.aoi_mask is not None else None
    return dataclasses.replace(
        plan, grid=grid, child=grid.child(plan.factor), offset=(plan.offset[0] + r0, plan.offset[1]), aoi_mask=mask,
        aux_stack=None,  # the checked stack is for the whole grid
    )


def run_distributed(plan: Plan, dst_path: Path, summary: DownscaleSummary, **kwargs: Any) -> distributed.DistContext | None:
    """Run the pipeline split over the torchrun ranks; None (nothing done) in one process.

    ``kwargs`` go to ``run_pipeline``. Fills ``summary`` on every rank (tiles summed over
    ranks, context tiles included); rank 0 assembles the parts into ``dst_path``. Returns the
    torchrun context (the caller checks the written file on rank 0 through it).
    """
    ctx = distributed.context(use_cuda=getattr(kwargs.get("device"), "type", "cpu") == "cuda")
    if not ctx.active:
        return None
    layout = TileLayout(plan.grid.height, plan.grid.width, plan.factor, plan.tile_child, plan.overlap_parent)
    parts = row_parts(layout, ctx.world_size)
    c = context_rows(layout)
    unc = kwargs.get("uncertainty")
    a, b = parts[ctx.rank]
    s0, s1 = part_extent(layout, a, b)
    mine = part_path(dst_path, ctx.rank, ctx.world_size)
    mine_unc = part_path(Path(unc), ctx.rank, ctx.world_size) if unc is not None else None
    error: BaseException | None = None
    try:
        if b > a:
            run_kw = dict(kwargs, compress="none", cog=False, overwrite=True, uncertainty=mine_unc)
            run_kw["progress"] = bool(kwargs.get("progress")) and ctx.is_main
            run_pipeline(sub_plan(plan, s0, s1), mine, summary, **run_kw)
    except BaseException as exc:  # noqa: BLE001 - every rank must learn about it (check_all)
        error = exc
    states = ctx.all_gather(None if error is not None else (summary.tiles, summary.precision, list(summary.notes)))
    try:
        ctx.check_all(error)
        summary.tiles = sum(st[0] for st in states)
        summary.precision = states[0][1]
        summary.notes.append(f"distributed over {ctx.world_size} processes (torchrun); tiles include {c} context parent rows per part border")
        hint = one_machine_hint(ctx.world_size, kwargs.get("device"))
        if hint:
            summary.notes.append(hint)
        err2: BaseException | None = None
        if ctx.is_main:
            try:
                spans = [(k, p, part_extent(layout, *p)[0]) for k, p in enumerate(parts) if p[1] > p[0]]
                _assemble(plan, dst_path, [(part_path(dst_path, k, ctx.world_size), p, s) for k, p, s in spans], kwargs)
                if unc is not None:
                    _assemble(plan, Path(unc), [(part_path(Path(unc), k, ctx.world_size), p, s) for k, p, s in spans], kwargs)
            except BaseException as exc:  # noqa: BLE001
                err2 = exc
        ctx.check_all(err2)
    finally:
        if ctx.is_main:
            for k in range(ctx.world_size):
                with contextlib.suppress(OSError):
                    part_path(dst_path, k, ctx.world_size).unlink(missing_ok=True)
                if unc is not None:
                    with contextlib.suppress(OSError):
                        part_path(Path(unc), k, ctx.world_size).unlink(missing_ok=True)
        elif error is not None:
            with contextlib.suppress(OSError):
                mine.unlink(missing_ok=True)
    return ctx


def one_machine_hint(world: int, device: Any) -> str | None:
    """A note for a torchrun run whose GPU ranks all sit on this machine
    (``LOCAL_WORLD_SIZE == WORLD_SIZE``): one process driving the GPUs does the same work
    without a second start-up, planning and aux preparation per rank, and the assembly."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if getattr(device, "type", "") != "cuda" or local is None or int(local) != world or world < 2:
        return None
    gpus = ",".join(f"cuda:{k}" for k in range(world))
    return (f"all {world} GPU processes ran on this machine: `--device {gpus}` without torchrun runs the GPUs from one "
            "process and skips each rank's start-up, planning and the assembly of parts (docs/distributed.md)")


def _assemble(plan: Plan, dst: Path, parts: list[tuple[Path, tuple[int, int], int]], kwargs: dict) -> None:
    """Copy the owned rows of every part into ``dst`` (atomic, same metadata as one process).

    Args:
        plan: The full plan.
        dst: Final output.
        parts: ``(part file, (a, b) owned parent rows, first parent row of the part)``.
        kwargs: ``run_pipeline`` arguments (dtype, compress, cog, overwrite).
    """
    import rasterio
    from rasterio.windows import Window

    f = plan.factor
    w = plan.child.width
    with rasterio.open(parts[0][0]) as ds0:
        tags = ds0.tags()
        band_tags = [ds0.tags(b) for b in range(1, ds0.count + 1)]
        band_units = ds0.units[0] if ds0.units and ds0.units[0] else None
        descriptions = list(ds0.descriptions)
        nodata = ds0.nodata
        count = ds0.count
        dtype = ds0.dtypes[0]
    with RasterWriter(
        dst, plan.child, count=count, dtype=dtype, nodata=nodata, band_descriptions=descriptions, tags=tags,
        compress=kwargs.get("compress", "deflate"), cog=bool(kwargs.get("cog")), overwrite=bool(kwargs.get("overwrite")),
        band_units=band_units, band_tags=band_tags, creation_options=plan.creation_options, overviews=plan.overviews,
    ) as writer:
        for path, (a, b), start in parts:
            with rasterio.open(path) as ds:
                for r in range((a - start) * f, (b - start) * f, _ASSEMBLE_ROWS):
                    h = min(_ASSEMBLE_ROWS, (b - start) * f - r)
                    block = ds.read(window=Window(0, r, w, h))
                    writer.write(np.asarray(block), Window(0, start * f + r, w, h))
