"""Warping aux rasters onto the child grid: the one ``WarpedVRT`` definition used by window reads
(:func:`_warped_vrt`) and the up-front warp of every layer that needs one (:func:`materialize_warps`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from carbonsr_cli.errors import InputDataError
from carbonsr_cli.rasters import decode_threads_env, open_raster

if TYPE_CHECKING:
    from carbonsr_cli.aux.sources import _Slot
    from carbonsr_cli.aux.stack import AuxStack
    from carbonsr_cli.grids import ChildGrid

__all__ = ["materialize_warps", "warp_targets"]


def _warped_vrt(ds: Any, grid: ChildGrid, resampling: str, k: int = 1, **warp_extras: Any) -> Any:
    """WarpedVRT of dataset ``ds`` onto ``grid`` (``k`` times finer), NaN outside and for nodata.

    float32 on the grid itself (``k == 1``) or for sources of <= 16 bits, else float64. The one
    definition of the warp used by window reads and by :meth:`AuxStack.materialize_warps`.
    """
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    kwargs: dict[str, Any] = dict(warp_extras)
    if ds.nodata is not None:
        kwargs["src_nodata"] = ds.nodata
    dtype = "float32" if np.dtype(ds.dtypes[0]).itemsize <= 2 or k == 1 else "float64"
    return WarpedVRT(
        ds,
        crs=grid.crs,
        transform=_subgrid(grid.transform, 0, 0, 1.0 / k, 1.0 / k),
        width=grid.width * k,
        height=grid.height * k,
        resampling=Resampling[resampling],
        nodata=float("nan"),
        dtype=dtype,
        **kwargs,
    )



def _subgrid(t: Any, col: float, row: float, sx: float = 1.0, sy: float = 1.0) -> Any:
    """North-up transform of a grid starting at cell ``(col, row)`` of ``t`` with cells ``sx, sy`` times as large.

    Written out (instead of ``t * Affine.translation(...)``) to work with every affine version.
    """
    from affine import Affine

    return Affine(t.a * sx, 0.0, t.c + col * t.a, 0.0, t.e * sy, t.f + row * t.e)


def warp_targets(stack: AuxStack) -> dict[Path, list[_Slot]]:
    """Continuous raster files read by this stack that only a warp can align to the child grid.

    Returns ``path -> slots`` (each slot once; slots of years the stack does not use are left out).
    """
    by_path: dict[Path, list[_Slot]] = {}
    seen: set[int] = set()
    for g in stack._groups:
        for slot in g.per_t:
            if id(slot) in seen:
                continue
            seen.add(id(slot))
            if slot.op == "value" and slot.source.kind == "continuous" and stack._alignment(slot.source) is None:
                by_path.setdefault(slot.source.path, []).append(slot)
    return by_path


def materialize_warps(stack: AuxStack, directory: Path, threads: int, rows_per_band: int = 1024) -> list[Path]:
    """Warp every continuous raster that needs a warp onto the child grid once, up front.

    Each such file (e.g. an EPSG:4326 layer under a UTM grid) is warped by GDAL in bands
    of ``rows_per_band`` child rows, several bands at once (each in a thread with its own
    dataset handle and WarpedVRT, warping and decoding blocks with a share of ``threads``), into an
    uncompressed float32 GeoTIFF on the child grid in ``directory`` (NaN = nodata/outside);
    its slots then read that file without a warp. Same warp options as the per-window reads
    (the slot's resampling, the source nodata); values can differ from a per-window warp by
    GDAL's approximate-transformer error (<= 0.125 source pixel of position).

    Returns:
        The files written (the caller deletes them, after closing this stack).
    """
    import concurrent.futures as cf
    import dataclasses
    import threading

    import rasterio
    from rasterio.windows import Window

    stack._check_process()
    by_path = warp_targets(stack)
    written: list[Path] = []
    grid = stack.grid
    threads = max(1, int(threads))
    n_par = min(4, threads, -(-grid.height // rows_per_band))
    per = max(1, threads // n_par)
    local = threading.local()
    write_lock = threading.Lock()
    opened: list[Any] = []

    def warp_band(path: Path, dst: Any, r0: int, keys: list[tuple[int, str]]) -> None:
        # Per thread: one dataset handle and one WarpedVRT per resampling, as the window reads
        # use (rasterio's reproject() is not safe to call from several threads: with
        # rasterio 1.5 a concurrent call may see a destination without its transform).
        handles = getattr(local, "handles", None)
        if handles is None:
            handles = local.handles = {}
        h = min(rows_per_band, grid.height - r0)
        win = Window(0, r0, grid.width, h)
        for b, (band, resampling) in enumerate(keys, start=1):
            try:
                vrt = handles.get((path, resampling))
                if vrt is None:
                    src = handles.get(path)
                    if src is None:
                        with decode_threads_env(per):  # GTiff reads the option when the file is opened
                            src = handles[path] = open_raster(path, require_north_up=False)
                        opened.append(src)
                    vrt = handles[(path, resampling)] = _warped_vrt(src, grid, resampling, NUM_THREADS=str(per))
                    opened.insert(0, vrt)  # closed before the datasets
                arr = vrt.read(band, window=win)
            except InputDataError:
                raise
            except Exception as exc:  # noqa: BLE001 - GDAL read/warp error
                msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise InputDataError(f"cannot read aux data (truncated or corrupt file?): {msg}", path) from None
            with write_lock:
                dst.write(arr, b, window=win)

    try:
        with cf.ThreadPoolExecutor(max_workers=n_par, thread_name_prefix="carbonsr-warp") as ex:
            for n, (path, slots) in enumerate(by_path.items()):
                keys = sorted({(s.entry.band, s.resampling) for s in slots})
                out = Path(directory) / f"warp{n}_{path.stem}.tif"
                profile = {
                    "driver": "GTiff", "width": grid.width, "height": grid.height, "count": len(keys),
                    "dtype": "float32", "crs": grid.crs, "transform": grid.transform, "nodata": float("nan"),
                    "tiled": True, "blockxsize": 256, "blockysize": 256, "BIGTIFF": "IF_SAFER",
                }
                written.append(out)
                with rasterio.open(out, "w", **profile) as dst:
                    futs = [ex.submit(warp_band, path, dst, r0, keys) for r0 in range(0, grid.height, rows_per_band)]
                    try:
                        for fut in futs:
                            fut.result()
                    finally:
                        for fut in futs:
                            fut.cancel()
                        cf.wait(futs)
                warped = dataclasses.replace(slots[0].source, path=out, nodata=float("nan"))
                for s in slots:
                    s.source = warped
                    s.entry = dataclasses.replace(s.entry, band=keys.index((s.entry.band, s.resampling)) + 1)
                    s.resampling = "average"  # one pixel per child cell: any of average/nearest reads it as is
    finally:
        for src in opened:
            src.close()
    return written
