"""Comparison of a downscaled raster with a reference raster (``carbonsr evaluate --reference``).

:func:`compare_to_reference`: how close is the prediction to a reference raster at the
prediction's resolution or coarser? The prediction is brought onto the reference grid
*conserving mass* (block sums for an aligned integer multiple, ``Resampling.sum``
reprojection otherwise) and compared with the metrics of ``models/metrics.py``. All values are
totals per cell and metrics compare them in the linear domain at the resolution of the grid
they are computed on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from carbonsr_cli.errors import InputDataError, UsageError
from carbonsr_cli.evaluate.plots import plot_comparison
from carbonsr_cli.gridmatch import (
    _RATIO_TOL,
    _aligned_offset,
    _block_sum,
    _integer_ratio,
    _row_chunks,
    _same_crs,
    _units,
    match_bands,
)
from carbonsr_cli.nodata import nodata_mask
from carbonsr_cli.rasters import open_raster, read_window

if TYPE_CHECKING:
    from rasterio.io import DatasetReader

__all__ = ["METRICS", "METRIC_LABELS", "compare_to_reference", "compute_metrics"]

PathLike = str | os.PathLike[str]

#: Metric names accepted by ``--metric``, in table order (nonzero-mae is the primary one).
METRICS: tuple[str, ...] = (
    "nonzero-mae",
    "balanced-mae",
    "top1-mae",
    "top5-mae",
    "rmse",
    "r2",
    "pearson",
    "bias",
)

#: Human-readable labels for tables and plots.
METRIC_LABELS: dict[str, str] = {
    "nonzero-mae": "Nonzero-MAE",
    "balanced-mae": "Balanced MAE",
    "top1-mae": "Top-1% MAE",
    "top5-mae": "Top-5% MAE",
    "rmse": "RMSE",
    "r2": "R2",
    "pearson": "Pearson r",
    "bias": "Bias (rel.)",
}



#: ``--metric`` name -> key of ``models.metrics.MetricAccumulator.result()``.
_ACC_KEYS: dict[str, str] = {
    "nonzero-mae": "nonzero_mae",
    "balanced-mae": "balanced_mae",
    "top1-mae": "top1_nonzero_mae",
    "top5-mae": "top5_nonzero_mae",
    "rmse": "rmse",
    "r2": "r2",
    "pearson": "pearson",
    "bias": "relative_bias",
}


def _check_metric_names(metrics: Sequence[str] | None) -> list[str]:
    names = list(METRICS) if not metrics else list(dict.fromkeys(metrics))
    for n in names:
        if n not in METRICS:
            raise UsageError(f"unknown metric {n!r}; choose from {', '.join(METRICS)}")
    return names


def _select(acc: Any, names: Sequence[str]) -> dict[str, float]:
    """``{name: value, "cells": n}`` from a ``MetricAccumulator``."""
    res = acc.result()
    out = {n: float(res[_ACC_KEYS[n]]) for n in names}
    out["cells"] = int(res["n"])
    return out


def compute_metrics(
    pred: np.ndarray, ref: np.ndarray, metrics: Sequence[str] | None = None, mask: np.ndarray | None = None
) -> dict[str, float]:
    """Metrics of ``pred`` against ``ref`` (same shape, linear domain), via ``models.metrics``.

    Args:
        pred: Predicted totals per cell, any shape.
        ref: Reference totals per cell, same shape; top-k thresholds are quantiles of its
            nonzero values over exactly the evaluated cells.
        metrics: Names from :data:`METRICS`; all when None.
        mask: Optional bool array, True = evaluate; non-finite cells are always left out.

    Returns:
        ``{name: value, "cells": n}``; NaN where undefined (e.g. no nonzero reference cell).
    """
    from models.metrics import MetricAccumulator

    names = _check_metric_names(metrics)
    acc = MetricAccumulator()
    acc.update(pred, ref, mask)
    return _select(acc, names)


@dataclass
class _Aligned:
    """The prediction brought onto the reference grid, one band at a time."""

    method: str
    k: int | None
    ref_shape: tuple[int, int]
    window: Any  # rasterio Window of the reference grid that is compared
    transform: Any  # transform of that window
    crs: Any


def _plan_alignment(pred: DatasetReader, ref: DatasetReader) -> _Aligned:
    """How to bring ``pred`` onto ``ref``'s grid: block sums when aligned, else reprojection."""
    from rasterio.windows import Window, from_bounds
    from rasterio.windows import transform as wtransform

    if _same_crs(pred, ref):
        kx = _integer_ratio(ref.transform.a, pred.transform.a)
        ky = _integer_ratio(-ref.transform.e, -pred.transform.e)
        if kx is not None and kx == ky:
            off = _aligned_offset(pred, ref, kx)
            if off is not None:
                c0, r0 = off
                # reference cells fully covered by the prediction
                pw, ph = pred.width // kx, pred.height // kx
                a0, b0 = max(c0, 0), max(r0, 0)
                a1, b1 = min(c0 + pw, ref.width), min(r0 + ph, ref.height)
                if a1 <= a0 or b1 <= b0:
                    raise InputDataError(
                        f"prediction does not overlap the reference {Path(ref.name).name}", pred.name
                    )
                win = Window(a0, b0, a1 - a0, b1 - b0)
                return _Aligned(
                    method="identical grid" if kx == 1 else f"block sums of {kx}x{kx} prediction cells",
                    k=kx,
                    ref_shape=(b1 - b0, a1 - a0),
                    window=win,
                    transform=wtransform(win, ref.transform),
                    crs=ref.crs,
                )
        # same CRS: a reference finer than the prediction cannot be reached by summing
        if ref.res[0] < pred.res[0] * (1 - _RATIO_TOL) and ref.res[1] < pred.res[1] * (1 - _RATIO_TOL):
            raise InputDataError(
                f"reference resolution {ref.res[0]:g} is finer than the prediction's {pred.res[0]:g}; "
                "aggregate the reference to the prediction grid (or coarser) first",
                ref.name,
            )
    # different CRS or non-integer ratio: mass-conserving reprojection onto the reference grid
    from rasterio.warp import transform_bounds

    try:
        pb = transform_bounds(pred.crs, ref.crs, *pred.bounds)
    except Exception as exc:  # noqa: BLE001 - PROJ errors
        raise InputDataError(f"cannot transform the prediction's bounds to the reference CRS: {exc}", pred.name) from None
    win = from_bounds(*pb, transform=ref.transform)
    c0 = max(0, int(math.floor(win.col_off + 1e-6)))
    r0 = max(0, int(math.floor(win.row_off + 1e-6)))
    c1 = min(ref.width, int(math.ceil(win.col_off + win.width - 1e-6)))
    r1 = min(ref.height, int(math.ceil(win.row_off + win.height - 1e-6)))
    if c1 <= c0 or r1 <= r0:
        raise InputDataError(f"prediction does not overlap the reference {Path(ref.name).name}", pred.name)
    win = Window(c0, r0, c1 - c0, r1 - r0)
    return _Aligned(
        method="reprojected with Resampling.sum (mass-conserving)",
        k=None,
        ref_shape=(r1 - r0, c1 - c0),
        window=win,
        transform=wtransform(win, ref.transform),
        crs=ref.crs,
    )


def _pred_on_ref(pred: DatasetReader, band: int, plan: _Aligned, rows: tuple[int, int]) -> np.ndarray:
    """Rows ``[a, b)`` of the compared reference window, filled with the prediction (float64,
    NaN where any contributing prediction cell is nodata or nothing maps)."""
    from rasterio.windows import Window

    a, b = rows
    w = int(plan.window.width)
    if plan.k is not None:
        k = plan.k
        # prediction pixel offset of the reference window's origin
        off = _aligned_offset(pred, _RefProxy(plan), k)
        assert off is not None
        pc0 = -off[0] * k
        pr0 = -off[1] * k
        child = read_window(pred, Window(pc0, pr0 + a * k, w * k, (b - a) * k), band, out_dtype="float64")
        nd = nodata_mask(child, pred.nodata, nan=True)
        child = np.where(nd, np.nan, child)  # any nodata child makes the block nodata
        return _block_sum(child, k) if k > 1 else child
    return _reproject_sum(pred, band, plan, a, b)


class _RefProxy:
    """Minimal object with a ``transform`` attribute for :func:`_aligned_offset`."""

    def __init__(self, plan: _Aligned) -> None:
        self.transform = plan.transform


def _reproject_sum(pred: DatasetReader, band: int, plan: _Aligned, a: int, b: int) -> np.ndarray:
    """Reproject prediction band ``band`` onto rows ``[a, b)`` of the reference window, summing
    the prediction cells that fall in each reference cell (GDAL >= 3.1 ``Resampling.sum``);
    with an older GDAL, average resampling times the ratio of cell areas (approximate)."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import Affine
    from rasterio.warp import reproject

    t0 = plan.transform  # shifted down by ``a`` rows (written out: affine's ``*`` is deprecated, ``@`` is new)
    t = Affine(t0.a, t0.b, t0.c + t0.b * a, t0.d, t0.e, t0.f + t0.e * a)
    dst = np.full((b - a, int(plan.window.width)), np.nan, dtype=np.float64)
    nod = pred.nodata
    gdal = tuple(int(x) for x in rasterio.__gdal_version__.split(".")[:2])
    has_sum = hasattr(Resampling, "sum") and gdal >= (3, 1)
    resampling = Resampling.sum if has_sum else Resampling.average
    reproject(
        source=rasterio.band(pred, band),
        destination=dst,
        src_nodata=nod,
        dst_transform=t,
        dst_crs=plan.crs,
        dst_nodata=np.nan,
        resampling=resampling,
    )
    if not has_sum:  # pragma: no cover - GDAL < 3.1 only: nominal cell-area ratio
        dst *= abs(plan.transform.a * plan.transform.e) / abs(pred.transform.a * pred.transform.e)
    # a reference cell only partly covered by the prediction would get a partial sum: drop it
    dst[~_fully_inside(pred, plan, a, b)] = np.nan
    return dst


def _fully_inside(pred: DatasetReader, plan: _Aligned, a: int, b: int) -> np.ndarray:
    """Bool ``[b - a, cols]``: reference cells whose four corners lie inside the prediction extent."""
    from pyproj import Transformer

    t = plan.transform
    w = int(plan.window.width)
    xs = t.c + np.arange(w + 1) * t.a
    ys = t.f + np.arange(a, b + 1) * t.e
    gx, gy = np.meshgrid(xs, ys)
    tr = Transformer.from_crs(plan.crs, pred.crs, always_xy=True)
    px, py = tr.transform(gx.ravel(), gy.ravel())
    left, bottom, right, top = pred.bounds
    eps = 1e-9 * max(abs(right - left), abs(top - bottom))
    ok = (
        np.isfinite(px) & np.isfinite(py)
        & (px >= left - eps) & (px <= right + eps) & (py >= bottom - eps) & (py <= top + eps)
    ).reshape(gx.shape)
    return ok[:-1, :-1] & ok[:-1, 1:] & ok[1:, :-1] & ok[1:, 1:]


def _in_region(plan: _Aligned, rows: tuple[int, int], region: tuple[float, float, float, float] | None) -> np.ndarray | None:
    """Mask ``[rows, cols]`` of reference cells whose centre lies in ``region`` (reference CRS)."""
    if region is None:
        return None
    a, b = rows
    w = int(plan.window.width)
    t = plan.transform
    xs = t.c + (np.arange(w) + 0.5) * t.a
    ys = t.f + (np.arange(a, b) + 0.5) * t.e
    minx, miny, maxx, maxy = region
    return ((ys >= miny) & (ys <= maxy))[:, None] & ((xs >= minx) & (xs <= maxx))[None, :]


def compare_to_reference(
    pred_path: PathLike,
    ref_path: PathLike,
    *,
    metrics: Sequence[str] | None = None,
    region: tuple[float, float, float, float] | None = None,
    cell_mask: np.ndarray | None = None,
    plot: PathLike | None = None,
    plot_band: str | None = None,
    overwrite: bool = True,
) -> dict[str, Any]:
    """Compare a prediction with a reference raster at the prediction's resolution or coarser.

    The prediction is brought onto the reference grid conserving mass:

    - same CRS, reference pixel = k x prediction pixel (integer k >= 1) and aligned origins:
      exact block sums of ``k x k`` prediction cells (k = 1: cell by cell);
    - otherwise (different CRS, non-integer ratio, misaligned): ``rasterio.warp.reproject``
      with ``Resampling.sum`` (GDAL >= 3.1; with an older GDAL, average resampling times the
      nominal cell-area ratio, which conserves mass only approximately).

    Reference cells that are nodata, or that receive any nodata prediction cell, are excluded.
    Only reference cells fully covered by the prediction are compared in the block-sum case.

    Args:
        pred_path: Prediction raster (totals per cell).
        ref_path: Reference raster (totals per cell) at the same or a coarser resolution.
        metrics: Names from :data:`METRICS` (default all). Top-k thresholds are quantiles of
            the nonzero reference values of the evaluated cells.
        region: ``(minx, miny, maxx, maxy)`` in the reference CRS: evaluate only reference
            cells whose centre lies inside (e.g. a held-out validation region).
        cell_mask: Boolean ``[rows, cols]`` over the whole reference grid, True = evaluate (e.g.
            the training split's validation region brought to the reference grid).
        plot: Write a comparison PNG (see ``plots.plot_comparison``) for ``plot_band``.
        plot_band: Band name to plot (default the first common band).
        overwrite: Replace an existing plot file.

    Returns:
        ``{"prediction", "reference", "method", "factor", "units", "region", "metrics": [...],
        "bands": {name: {metric: value, "cells": n}}, "all": {...}}``; ``"all"`` pools every
        band's cells.

    Raises:
        UsageError: unknown metric, missing file.
        InputDataError: no overlap, no common band, finer reference, unreadable data.
    """
    from models.metrics import MetricAccumulator

    names = _check_metric_names(metrics)
    if region is not None:
        minx, miny, maxx, maxy = region
        if not (maxx > minx and maxy > miny):
            raise UsageError(f"region must be minx,miny,maxx,maxy with max > min, got {region}")
    result: dict[str, Any] = {
        "prediction": str(pred_path),
        "reference": str(ref_path),
        "metrics": names,
        "region": list(region) if region is not None else ("mask" if cell_mask is not None else None),
        "bands": {},
    }
    acc_all = MetricAccumulator()
    with open_raster(pred_path) as pred, open_raster(ref_path) as ref:
        plan = _plan_alignment(pred, ref)
        if cell_mask is not None and tuple(np.shape(cell_mask)) != (ref.height, ref.width):
            raise UsageError(
                f"cell mask shape {tuple(np.shape(cell_mask))} differs from the reference grid {(ref.height, ref.width)}"
            )
        pairs = match_bands(pred, ref, require_all=False)
        result["method"] = plan.method
        result["factor"] = plan.k
        result["units"] = _units(ref) if _units(ref) != "value per cell" else _units(pred)
        if plot_band is None:
            plot_band = pairs[0][0]
        elif plot_band not in [p[0] for p in pairs]:
            raise UsageError(f"band {plot_band!r} not in the compared bands {', '.join(p[0] for p in pairs)}")
        maps: dict[str, np.ndarray] = {}
        h, w = plan.ref_shape
        for name, pi, ri in pairs:
            acc = MetricAccumulator()
            keep_maps = plot is not None and name == plot_band
            pm, tm = [], []
            for a, b in _row_chunks(h, w * (plan.k or 1) ** 2):
                p = _pred_on_ref(pred, pi, plan, (a, b))
                win = plan.window
                from rasterio.windows import Window

                wc0, wr0 = int(win.col_off), int(win.row_off)
                t = read_window(ref, Window(wc0, wr0 + a, w, b - a), ri, out_dtype="float64")
                t = np.where(nodata_mask(t, ref.nodata, nan=True), np.nan, t)
                ok = np.isfinite(p) & np.isfinite(t)
                m = _in_region(plan, (a, b), region)
                if m is not None:
                    ok &= m
                if cell_mask is not None:
                    ok &= np.asarray(cell_mask, dtype=bool)[wr0 + a : wr0 + b, wc0 : wc0 + w]
                acc.update(p, t, ok)
                acc_all.update(p, t, ok)
                if keep_maps:
                    pm.append(np.where(ok, p, np.nan))
                    tm.append(np.where(ok, t, np.nan))
            result["bands"][name] = _select(acc, names)
            if keep_maps:
                maps["pred"] = np.concatenate(pm, axis=0)
                maps["ref"] = np.concatenate(tm, axis=0)
        result["all"] = _select(acc_all, names)
        if result["all"]["cells"] == 0:
            raise InputDataError("no valid cell in common between prediction and reference", pred_path)
    if plot is not None:
        plot_comparison(
            maps["pred"],
            maps["ref"],
            plot,
            units=result["units"],
            title=f"{Path(str(pred_path)).name} vs {Path(str(ref_path)).name} (band {plot_band})",
            overwrite=overwrite,
        )
        result["plot"] = str(plot)
    return result

