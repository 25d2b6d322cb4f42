"""The check of the written file: re-read the output and compare its block sums with the totals.

:func:`check_written_conservation` streams bands of parent rows in threads and returns a
:class:`~carbonsr_cli.conservation.ConservationCheck` (``ok`` a plain bool). Bands whose
valid children are all finite and >= 0 (the usual output) are checked in the file's dtype
(:func:`clean_block_figures`); any other band gets the general float64 figures
(:func:`block_figures`), which count NaN, infinite and negative children.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from carbonsr_cli import units
from carbonsr_cli.conservation import ConservationCheck
from carbonsr_cli import cpus  # cpus.available_cpus looked up at call time (tests patch it)
from carbonsr_cli.downscale.plan import Plan, read_totals
from carbonsr_cli.nodata import nodata_mask
from carbonsr_cli.rasters import decode_threads_env, open_raster, read_window

__all__ = ["check_written_conservation"]


def check_written_conservation(
    path: str | os.PathLike[str], plan: Plan, *, rows_per_band: int | None = None
) -> ConservationCheck:
    """Re-read the written output and compare its block sums with the parent totals.

    Streams over bands of parent rows (up to 6 bands at once, in threads with their own
    dataset handles); child values are summed in float64. Nodata children
    must coincide exactly with nodata parents.

    Args:
        path: Written child raster (one band per output year).
        plan: The run plan (main raster, bands, AOI, factor, units).
        rows_per_band: Parent rows per band (default: about 2 x 10^6 child values per band).

    Returns:
        A :class:`ConservationCheck`.
    """
    import concurrent.futures as cf
    import threading

    h, w = plan.grid.height, plan.grid.width
    step = rows_per_band or max(1, (1 << 21) // max(1, w * plan.factor**2 * len(plan.out_bands)))

    n_threads = max(1, min(6, cpus.available_cpus(respect_omp=False), -(-h // step)))
    decode = max(1, (os.cpu_count() or 1) // n_threads)  # block-decoding threads per read
    local = threading.local()
    opened: list[Any] = []

    def band(r0: int) -> ConservationCheck:
        handles = getattr(local, "handles", None)
        if handles is None:  # rasterio datasets are not thread-safe: one pair per thread
            with decode_threads_env(decode):  # GTiff reads the option when the file is opened
                handles = local.handles = (open_raster(plan.main_path), open_raster(path))
            opened.extend(handles)
        return _check_rows(handles[0], handles[1], plan, r0, min(h, r0 + step))

    res = ConservationCheck()
    try:
        with cf.ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="carbonsr-check") as ex:
            for part in ex.map(band, range(0, h, step)):
                res.merge(part)
    finally:
        for ds in opened:
            ds.close()
    return res.finish()



def _check_rows(main_ds: Any, out_ds: Any, plan: Plan, r0: int, r1: int) -> ConservationCheck:
    """Conservation figures of parent rows ``[r0, r1)`` (one band of :func:`check_written_conservation`)."""
    from rasterio.windows import Window

    f = plan.factor
    w = plan.grid.width
    totals = read_totals(main_ds, plan, r0, r1, plan.out_bands)
    kids = read_window(out_ds, Window(0, r0 * f, w * f, (r1 - r0) * f))  # the file's dtype
    kid_nd = nodata_mask(kids, out_ds.nodata)
    if plan.unit is None:
        res = clean_block_figures(kids, kid_nd, totals, f)
        if res is not None:
            return res
    kids = kids.astype(np.float64, copy=False)
    if plan.unit is not None:
        kids = _child_density_to_totals(kids, plan, r0, r1)
    return block_figures(kids, kid_nd, totals, f)


def clean_block_figures(kids: np.ndarray, kid_nd: np.ndarray, totals: np.ndarray, f: int) -> ConservationCheck | None:
    """:func:`block_figures` for the usual output, where every child that is not nodata is
    finite and >= 0; None when one is not (then :func:`block_figures` counts them).

    Works in the file's dtype (children summed per block in float64) with two reductions to
    find out, instead of float64 copies of the children: its numpy work takes about a third of
    the general figures' time (session 19, 300 km output). With every valid
    child >= 0, a block holds a nonzero child exactly when its sum is > 0.

    Args:
        kids: ``[bands, rows * f, cols * f]`` child values (t CO2 / child cell / yr).
        kid_nd: Nodata mask of ``kids``.
        totals: ``[bands, rows, cols]`` float64 parent totals, NaN for nodata parents.
        f: Children per parent edge.
    """
    any_child_nd = bool(kid_nd.any())
    vk = np.where(kid_nd, kids.dtype.type(0), kids) if any_child_nd else kids
    lo, hi = vk.min(), vk.max()  # a NaN propagates into both
    if not (lo >= 0 and np.isfinite(hi)):
        return None
    nb, h, w = totals.shape
    res = ConservationCheck()
    par_nd = np.isnan(totals)
    if any_child_nd:
        ndb = kid_nd.reshape(nb, h, f, w, f)
        any_nd, all_nd = ndb.any(axis=(2, 4)), ndb.all(axis=(2, 4))
        res.nodata_mismatch += int((par_nd & ~all_nd).sum() + (~par_nd & any_nd).sum())
        valid = ~par_nd & ~any_nd
    else:
        res.nodata_mismatch += int(par_nd.sum())
        valid = ~par_nd
    sums = vk.reshape(nb, h, f, w, f).sum(axis=(2, 4), dtype=np.float64)
    res.blocks += int(valid.sum())
    _add_errors(res, sums[valid], totals[valid])
    res.zero_blocks_violated += int(((totals == 0) & valid & (sums > 0)).sum())
    return res


def block_figures(kids: np.ndarray, kid_nd: np.ndarray, totals: np.ndarray, f: int) -> ConservationCheck:
    """Conservation figures of float64 children against their parents' totals (any values).

    Args:
        kids: ``[bands, rows * f, cols * f]`` float64 child totals.
        kid_nd: Nodata mask of ``kids``.
        totals: ``[bands, rows, cols]`` float64 parent totals, NaN for nodata parents.
        f: Children per parent edge.
    """
    res = ConservationCheck()
    nb, h, w = totals.shape
    kb = kids.reshape(nb, h, f, w, f)
    ndb = kid_nd.reshape(nb, h, f, w, f)
    par_nd = np.isnan(totals)
    any_nd = ndb.any(axis=(2, 4))
    all_nd = ndb.all(axis=(2, 4))
    res.nodata_mismatch += int((par_nd & ~all_nd).sum() + (~par_nd & any_nd).sum())
    valid = ~par_nd & ~any_nd
    vk = np.where(ndb, 0.0, kb)
    nonfinite = ~np.isfinite(vk)
    res.nans += int((nonfinite & valid[:, :, None, :, None]).sum())
    vk = np.where(nonfinite, 0.0, vk)
    res.negatives += int(((vk < 0) & valid[:, :, None, :, None]).sum())
    sums = vk.sum(axis=(2, 4))
    res.blocks += int(valid.sum())
    _add_errors(res, sums[valid], totals[valid])
    zero_blocks = (totals == 0) & valid
    nz_child = (vk != 0).any(axis=(2, 4))
    res.zero_blocks_violated += int((zero_blocks & nz_child).sum())
    return res


def _add_errors(res: ConservationCheck, got: np.ndarray, s: np.ndarray) -> None:
    """Largest absolute and relative (``s > 0``) errors of block sums ``got`` against totals ``s``."""
    if s.size:
        err = np.abs(got - s)
        res.max_abs_error = max(res.max_abs_error, float(err.max()))
        pos = s > 0
        if pos.any():
            res.max_rel_error = max(res.max_rel_error, float((err[pos] / s[pos]).max()))



def _child_density_to_totals(kids: np.ndarray, plan: Plan, r0: int, r1: int) -> np.ndarray:
    """Child densities of parent rows ``[r0, r1)`` -> totals per child cell."""
    from rasterio.windows import Window

    f = plan.factor
    areas = units.cell_areas_m2(plan.child, Window(0, r0 * f, plan.child.width, (r1 - r0) * f))
    return np.asarray(units.to_totals(kids, plan.unit, areas), dtype=np.float64)
