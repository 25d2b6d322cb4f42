"""Evaluation of downscaled rasters: conservation, reference comparison, self-validation.

Three questions a user must be able to answer before publishing a map:

1. :func:`check_conservation`: does every ``factor x factor`` block of the prediction sum
   to its parent total (and is every value finite and >= 0, with nodata exactly where the
   parent is nodata)? Streamed by bands of parent rows, so memory is bounded by one band.
2. :func:`compare_to_reference`: how close is the prediction to a reference raster at the
   prediction's resolution or coarser? The prediction is brought onto the reference grid
   *conserving mass* (block sums for an aligned integer multiple, ``Resampling.sum``
   reprojection otherwise) and compared with the metrics of ``models/metrics.py``.
3. :func:`self_validate`: scale-shift self-validation without fine truth: coarsen the main
   raster, downscale it back with the model and the baselines, compare at parent level.

All values are totals per cell (e.g. t CO2 / cell / yr) and metrics compare them in the
linear domain at the resolution of the grid they are computed on.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from carbonsr_cli.nodata import nodata_mask
from carbonsr_cli.errors import CarbonSRWarning, CheckpointError, ConservationError, InputDataError, UsageError
from carbonsr_cli.rasters import open_raster, read_window, read_years

if TYPE_CHECKING:
    from rasterio.io import DatasetReader

__all__ = [
    "METRICS",
    "METRIC_LABELS",
    "BlockLocation",
    "BandConservation",
    "ConservationReport",
    "check_conservation",
    "compare_to_reference",
    "compute_metrics",
    "match_bands",
    "infer_factor",
    "self_validate",
    "SelfValidationResult",
]

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

#: Child cells read per chunk when streaming (float64: ~32 MB per array).
_CHUNK_CHILD_CELLS = 4_000_000
#: Relative tolerance when deciding that two resolutions form an integer ratio.
_RATIO_TOL = 1e-6


# --------------------------------------------------------------------------------------
# helpers shared by the three evaluations
# --------------------------------------------------------------------------------------


def _fallback_names(names: Sequence[str]) -> bool:
    """True when band names are the ``band1..bandN`` fallback of ``read_years``."""
    return all(n == f"band{k}" for k, n in enumerate(names, start=1))


def match_bands(
    pred: DatasetReader, other: DatasetReader, *, require_all: bool = True
) -> list[tuple[str, int, int]]:
    """Pair the bands of a prediction with those of another raster.

    Bands are matched by name (band description / year, see ``rasters.read_years``) when both
    rasters name their bands; otherwise by index, which needs equal band counts.

    Args:
        pred: Open prediction raster.
        other: Open totals or reference raster.
        require_all: Every prediction band must have a partner (conservation); when False,
            the common bands are used and at least one is required (reference comparison).

    Returns:
        ``[(name, pred_band_index, other_band_index), ...]`` with 1-based indexes.

    Raises:
        InputDataError: the bands cannot be matched.
    """
    pn, on = read_years(pred), read_years(other)
    if not _fallback_names(pn) and not _fallback_names(on):
        pairs = [(n, i + 1, on.index(n) + 1) for i, n in enumerate(pn) if n in on]
        missing = [n for n in pn if n not in on]
        if (require_all and missing) or not pairs:
            raise InputDataError(
                f"band names do not match: prediction has {', '.join(pn)}; "
                f"{Path(other.name).name} has {', '.join(on)}",
                pred.name,
            )
        return pairs
    if pred.count != other.count:
        raise InputDataError(
            f"cannot match bands: prediction has {pred.count} band(s), {Path(other.name).name} has "
            f"{other.count}, and they do not both name their bands (set band descriptions to years)",
            pred.name,
        )
    names = pn if not _fallback_names(pn) else on
    return [(names[i], i + 1, i + 1) for i in range(pred.count)]


def _integer_ratio(coarse: float, fine: float) -> int | None:
    """``round(coarse / fine)`` if it is an integer >= 1 within tolerance, else None."""
    r = coarse / fine
    k = int(round(r))
    if k >= 1 and abs(r - k) <= _RATIO_TOL * max(1.0, r):
        return k
    return None


def _same_crs(a: DatasetReader, b: DatasetReader) -> bool:
    if a.crs is None or b.crs is None:
        return False
    try:
        return bool(a.crs == b.crs)
    except Exception:  # noqa: BLE001 - CRS comparison can fail on exotic WKT
        return a.crs.to_wkt() == b.crs.to_wkt()


def _aligned_offset(fine: DatasetReader, coarse: DatasetReader, k: int) -> tuple[int, int] | None:
    """Offset ``(col, row)`` in coarse cells of the fine raster's origin, if it lies on a coarse
    cell corner and the grids are otherwise aligned (fine pixel = coarse pixel / k); else None."""
    ft, ct = fine.transform, coarse.transform
    col = (ft.c - ct.c) / ct.a
    row = (ft.f - ct.f) / ct.e
    ic, ir = int(round(col)), int(round(row))
    tol = 1e-3 / k  # a thousandth of a fine cell
    if abs(col - ic) > tol or abs(row - ir) > tol:
        return None
    return ic, ir


def infer_factor(pred: DatasetReader, totals: DatasetReader) -> int:
    """Children per parent cell along each axis, from the two resolutions.

    Raises:
        InputDataError: different CRSs, or the resolution ratio is not the same integer on both axes.
    """
    if not _same_crs(pred, totals):
        raise InputDataError(
            f"CRS differs from the totals raster {Path(totals.name).name}; a conservation check "
            "needs the prediction on the child grid of the totals",
            pred.name,
        )
    kx = _integer_ratio(totals.transform.a, pred.transform.a)
    ky = _integer_ratio(-totals.transform.e, -pred.transform.e)
    if kx is None or ky is None or kx != ky:
        raise InputDataError(
            f"resolution {pred.res[0]:g} x {pred.res[1]:g} is not an integer fraction of the totals' "
            f"{totals.res[0]:g} x {totals.res[1]:g}",
            pred.name,
        )
    return kx


def _row_chunks(n_rows: int, cells_per_row: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges whose size keeps each chunk near ``_CHUNK_CHILD_CELLS``."""
    step = max(1, _CHUNK_CHILD_CELLS // max(1, cells_per_row))
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


def _block_sum(a: np.ndarray, k: int) -> np.ndarray:
    """Sum ``[h*k, w*k]`` into ``[h, w]`` by ``k x k`` blocks."""
    h, w = a.shape[0] // k, a.shape[1] // k
    return a.reshape(h, k, w, k).sum(axis=(1, 3))


def _units(ds: DatasetReader) -> str:
    """Value units from the raster's tags (``CARBONSR_UNITS``/``units``/``UNITS``), else the band unit."""
    tags = ds.tags()
    for key in ("CARBONSR_UNITS", "units", "UNITS", "unit", "UNIT"):
        if tags.get(key):
            return str(tags[key])
    try:
        u = ds.units[0] if ds.units else None
    except Exception:  # noqa: BLE001
        u = None
    return u or "value per cell"


# --------------------------------------------------------------------------------------
# 1. conservation
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockLocation:
    """A parent cell (block of children) of interest, typically the worst one.

    Attributes:
        band: Band (year) name.
        row: Parent row (0-based, in the totals raster).
        col: Parent column (0-based).
        x: Map x of the parent cell centre (CRS units).
        y: Map y of the parent cell centre (CRS units).
        total: Parent total (NaN when the parent is nodata).
        block_sum: Sum of the block's children (NaN when undefined).
        problem: What is wrong with this block ("" when nothing).
    """

    band: str
    row: int
    col: int
    x: float
    y: float
    total: float
    block_sum: float
    problem: str = ""


@dataclass
class BandConservation:
    """Conservation of one band (year).

    Attributes:
        name: Band name (year).
        parent_cells: Valid (non-nodata) parent cells checked.
        child_cells: Children checked (all children of the covered parent cells).
        max_abs_err: Max ``|block sum - total|`` over valid parents (units of the totals).
        max_rel_err: Max ``|block sum - total| / |total|``; ``inf`` if a zero total has a nonzero sum.
        failed_blocks: Blocks beyond tolerance or holding NaN, negative or misplaced nodata children.
        negatives: Children < 0 under valid parents.
        nans: NaN children under valid parents.
        nodata_mismatch: Children whose nodata status differs from their parent's.
        worst: The worst block (largest violation), or None if nothing was checked.
    """

    name: str
    parent_cells: int = 0
    child_cells: int = 0
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    failed_blocks: int = 0
    negatives: int = 0
    nans: int = 0
    nodata_mismatch: int = 0
    worst: BlockLocation | None = None
    _worst_score: float = field(default=-1.0, repr=False)

    @property
    def ok(self) -> bool:
        """True when every block is within tolerance and no child is NaN, negative or misplaced nodata."""
        return self.failed_blocks == 0


@dataclass
class ConservationReport:
    """Result of :func:`check_conservation`.

    Attributes:
        pred_path: Prediction (child-resolution) raster.
        totals_path: Totals (parent-resolution) raster.
        factor: Children per parent cell along each axis.
        rtol: Relative tolerance on block sums.
        atol: Absolute tolerance on block sums (units of the totals).
        bands: One entry per checked band.
    """

    pred_path: str
    totals_path: str
    factor: int
    rtol: float
    atol: float
    bands: list[BandConservation]

    @property
    def ok(self) -> bool:
        """True when every band passes."""
        return all(b.ok for b in self.bands)

    @property
    def worst(self) -> BlockLocation | None:
        """The worst block over all bands."""
        cands = [b for b in self.bands if b.worst is not None]
        if not cands:
            return None
        return max(cands, key=lambda b: b._worst_score).worst

    @property
    def max_rel_err(self) -> float:
        """Max relative block-sum error over all bands."""
        return max((b.max_rel_err for b in self.bands), default=0.0)

    @property
    def max_abs_err(self) -> float:
        """Max absolute block-sum error over all bands."""
        return max((b.max_abs_err for b in self.bands), default=0.0)

    def failure_message(self) -> str:
        """One line describing the failure (empty when the report passes)."""
        if self.ok:
            return ""
        w = self.worst
        n = sum(b.failed_blocks for b in self.bands)
        where = ""
        if w is not None:
            where = (
                f"; worst block: band {w.band}, parent row {w.row}, col {w.col} "
                f"(x={w.x:.10g}, y={w.y:.10g}): {w.problem}"
            )
        return (
            f"conservation check failed: {n} block(s) beyond tolerance (rtol={self.rtol:g}, "
            f"atol={self.atol:g}) or with NaN/negative/misplaced nodata children{where}"
        )

    def raise_if_failed(self) -> None:
        """Raise :class:`~carbonsr_cli.errors.ConservationError` naming the worst block."""
        if not self.ok:
            raise ConservationError(self.failure_message(), self.pred_path)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        bands = []
        for b in self.bands:
            d = {k: v for k, v in asdict(b).items() if not k.startswith("_")}
            d["ok"] = b.ok
            bands.append(d)
        return {
            "prediction": self.pred_path,
            "totals": self.totals_path,
            "factor": self.factor,
            "rtol": self.rtol,
            "atol": self.atol,
            "ok": self.ok,
            "bands": bands,
        }


def check_conservation(
    pred_path: PathLike,
    totals_path: PathLike,
    *,
    factor: int | None = None,
    rtol: float = 1e-6,
    atol: float = 0.0,
) -> ConservationReport:
    """Check that a child raster conserves its parent totals, streamed by bands of rows.

    For every valid parent cell, the sum of its ``factor x factor`` children must satisfy
    ``|sum - total| <= atol + rtol * |total|``; children must be finite and >= 0; children are
    nodata exactly where the parent is nodata. The prediction may cover a sub-window of the
    totals grid (e.g. an ``--aoi`` run) as long as it is aligned on parent cells.

    The default ``atol = 0`` is deliberate: water-filling maps a zero total to exact zeros, and
    rounding float64 children of a nonnegative block to float32 changes their sum by at most
    ``2**-24`` (6e-8) relative, well inside ``rtol = 1e-6``.

    Args:
        pred_path: Child-resolution raster (e.g. 100 m), totals per child cell.
        totals_path: Parent raster (e.g. 1 km), totals per parent cell.
        factor: Children per parent cell along each axis; inferred from the resolutions
            when None (must be an integer ratio).
        rtol: Relative tolerance on block sums.
        atol: Absolute tolerance on block sums, in the units of the totals.

    Returns:
        A :class:`ConservationReport`; call ``.raise_if_failed()`` to turn a failure into a
        :class:`~carbonsr_cli.errors.ConservationError`.

    Raises:
        UsageError: a file is missing.
        InputDataError: grids do not align, bands do not match, unreadable data.
    """
    if rtol < 0 or atol < 0:
        raise UsageError("tolerances must be >= 0")
    with open_raster(pred_path) as pred, open_raster(totals_path) as tot:
        f = infer_factor(pred, tot)
        if factor is not None and int(factor) != f:
            raise InputDataError(
                f"resolution ratio to the totals is {f}, but factor {factor} was requested", pred_path
            )
        off = _aligned_offset(pred, tot, f)
        if off is None:
            raise InputDataError(
                "prediction grid is not aligned with the totals grid (its origin is not on a "
                f"parent cell corner of {Path(str(totals_path)).name})",
                pred_path,
            )
        c0, r0 = off
        if pred.width % f or pred.height % f:
            raise InputDataError(
                f"prediction size {pred.height} x {pred.width} is not a multiple of the factor {f}: "
                "it splits parent cells",
                pred_path,
            )
        pw, ph = pred.width // f, pred.height // f
        if c0 < 0 or r0 < 0 or c0 + pw > tot.width or r0 + ph > tot.height:
            raise InputDataError(
                f"prediction extends outside the totals raster {Path(str(totals_path)).name}", pred_path
            )
        pairs = match_bands(pred, tot, require_all=True)
        pnod, tnod = pred.nodata, tot.nodata
        bands: list[BandConservation] = []
        from rasterio.windows import Window

        for name, pi, ti in pairs:
            bc = BandConservation(name=name)
            for a, b in _row_chunks(ph, pw * f * f):
                totals = read_window(tot, Window(c0, r0 + a, pw, b - a), ti, out_dtype="float64")
                child = read_window(pred, Window(0, a * f, pw * f, (b - a) * f), pi, out_dtype="float64")
                _check_chunk(bc, totals, child, f, tnod, pnod, rtol, atol, r0 + a, c0, tot.transform)
            bands.append(bc)
    return ConservationReport(
        pred_path=str(pred_path),
        totals_path=str(totals_path),
        factor=f,
        rtol=float(rtol),
        atol=float(atol),
        bands=bands,
    )


def _check_chunk(
    bc: BandConservation,
    totals: np.ndarray,
    child: np.ndarray,
    f: int,
    tnod: float | None,
    pnod: float | None,
    rtol: float,
    atol: float,
    row0: int,
    col0: int,
    transform: Any,
) -> None:
    """Update ``bc`` with one chunk: ``totals [h, w]`` and ``child [h*f, w*f]`` (float64)."""
    h, w = totals.shape
    t_nd = nodata_mask(totals, tnod, nan=True)  # a NaN total is never valid
    # children: only the declared nodata value (NaN included if it is NaN) marks nodata;
    # an undeclared NaN is counted as a NaN, not as nodata
    if pnod is None:
        c_nd = np.zeros(child.shape, dtype=bool)
    elif math.isnan(pnod):
        c_nd = np.isnan(child)
    else:
        c_nd = child == pnod
    c_nd = c_nd.reshape(h, f, w, f)
    c = child.reshape(h, f, w, f)
    valid = ~t_nd
    n_child_nd = c_nd.sum(axis=(1, 3))
    nan_c = np.isnan(c).sum(axis=(1, 3))
    neg_c = ((c < 0) & ~c_nd).sum(axis=(1, 3))
    # children must be nodata exactly where the parent is: count disagreeing children
    mismatch = np.where(valid, n_child_nd, f * f - n_child_nd)
    bsum = np.where(c_nd | np.isnan(c), 0.0, c).sum(axis=(1, 3))
    tv = np.where(valid, totals, 0.0)
    abs_err = np.where(valid, np.abs(bsum - tv), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(tv != 0, abs_err / np.abs(tv), np.where(abs_err > 0, np.inf, 0.0))
        tol = atol + rtol * np.abs(tv)
        score = np.where(abs_err > tol, np.where(tol > 0, abs_err / tol, np.inf), abs_err / np.maximum(tol, 1e-300))
    score = np.where(valid, score, 0.0)
    bad_children = (np.where(valid, nan_c + neg_c, 0) + mismatch) > 0
    failed = (valid & (abs_err > tol)) | bad_children
    score = np.where(bad_children, np.inf, score)

    bc.parent_cells += int(valid.sum())
    bc.child_cells += int(h * w * f * f)
    if valid.any():
        bc.max_abs_err = max(bc.max_abs_err, float(abs_err[valid].max()))
        bc.max_rel_err = max(bc.max_rel_err, float(rel[valid].max()))
    bc.failed_blocks += int(failed.sum())
    bc.negatives += int(np.where(valid, neg_c, 0).sum())
    bc.nans += int(np.where(valid, nan_c, 0).sum())
    bc.nodata_mismatch += int(mismatch.sum())
    if h * w == 0:
        return
    k = int(np.argmax(score))
    s = float(score.flat[k])
    if s > bc._worst_score:
        i, j = divmod(k, w)
        r, cc = row0 + i, col0 + j
        x = transform.c + (cc + 0.5) * transform.a  # north-up: no rotation terms
        y = transform.f + (r + 0.5) * transform.e
        if mismatch[i, j]:
            problem = f"{int(mismatch[i, j])} child cell(s) where nodata does not match the parent"
        elif valid[i, j] and nan_c[i, j]:
            problem = f"{int(nan_c[i, j])} NaN child cell(s)"
        elif valid[i, j] and neg_c[i, j]:
            problem = f"{int(neg_c[i, j])} negative child cell(s)"
        elif failed[i, j]:
            problem = (
                f"block sum {bsum[i, j]:.8g} != total {totals[i, j]:.8g} "
                f"(abs err {abs_err[i, j]:.3g}, rel err {rel[i, j]:.3g})"
            )
        else:
            problem = ""
        bc._worst_score = s
        bc.worst = BlockLocation(
            band=bc.name,
            row=int(r),
            col=int(cc),
            x=float(x),
            y=float(y),
            total=float(totals[i, j]) if valid[i, j] else float("nan"),
            block_sum=float(bsum[i, j]) if valid[i, j] else float("nan"),
            problem=problem,
        )


# --------------------------------------------------------------------------------------
# 2. comparison with a reference
# --------------------------------------------------------------------------------------


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


def _display_reduce(a: np.ndarray, max_cells: int = 600) -> np.ndarray:
    """Block-sum a map for display so that its longer side is at most ``max_cells`` (NaN kept)."""
    k = max(1, int(math.ceil(max(a.shape) / max_cells)))
    if k == 1:
        return a
    h, w = a.shape[0] // k * k, a.shape[1] // k * k
    return _block_sum(a[:h, :w], k)


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
        from carbonsr_cli.plots import plot_comparison

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


# --------------------------------------------------------------------------------------
# 3. scale-shift self-validation (filled in below)
# --------------------------------------------------------------------------------------


@dataclass
class SelfValidationResult:
    """Result of :func:`self_validate`.

    Attributes:
        rows: One dict per (scale, method): ``{"scale", "method", <metric>: value, "cells"}``.
        scales: Coarsening scales (in parent cells).
        methods: Method names (``"model"`` first, then baselines).
        region: Evaluated region ``(minx, miny, maxx, maxy)`` in the main CRS, or None.
        metric: Primary metric used for the ratio column.
        region_label: Human-readable description of the evaluated cells.
        details: ``{scale: {method: metrics}}`` for every method, each dasymetric layer included.
    """

    rows: list[dict[str, Any]]
    scales: list[int]
    methods: list[str]
    region: tuple[float, float, float, float] | None
    metric: str = "nonzero-mae"
    region_label: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def ratio_to_best_baseline(self, scale: int, metric: str | None = None) -> float:
        """Model metric / best (lowest) baseline metric at ``scale`` (< 1: the model wins)."""
        m = metric or self.metric
        rows = [r for r in self.rows if r["scale"] == scale]
        model = [r[m] for r in rows if r["method"] == "model"]
        base = [r[m] for r in rows if r["method"] != "model" and np.isfinite(r[m])]
        if not model or not base:
            return float("nan")
        best = min(base)
        return float(model[0] / best) if best > 0 else float("inf") if model[0] > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary including the ratios."""
        return {
            "scales": self.scales,
            "methods": self.methods,
            "region": list(self.region) if self.region else None,
            "region_label": self.region_label,
            "metric": self.metric,
            "rows": self.rows,
            "ratio_to_best_baseline": {str(s): self.ratio_to_best_baseline(s) for s in self.scales},
            "all_methods": self.details,
        }


def _whole_blocks(
    mask: np.ndarray, windows: Sequence[tuple[int, int]], patch: int, s: int
) -> list[tuple[int, int, np.ndarray]]:
    """The cells each window scores at scale ``s``: whole ``s x s`` blocks, each cell once.

    Totals are conserved over whole coarse blocks only, so a block is scored only when all its
    cells lie inside ``mask`` (the region) and no earlier window scored any of them; blocks
    cut by the region or by the shifted last window of a row/column are dropped.

    Args:
        mask: bool ``[h, w]`` region of parent cells.
        windows: ``(row, col)`` starts of the ``patch x patch`` windows, in scoring order.
        patch: Window size in parent cells (a multiple of ``s``).
        s: Coarse scale in parent cells.

    Returns:
        ``(row, col, sel)`` per window with at least one scored block; ``sel`` is bool
        ``[patch, patch]``.
    """
    owned = np.zeros(mask.shape, dtype=bool)
    nb = patch // s
    out = []
    for r, c in windows:
        free = mask[r : r + patch, c : c + patch] & ~owned[r : r + patch, c : c + patch]
        whole = free.reshape(nb, s, nb, s).all(axis=(1, 3))
        if whole.any():
            sel = np.repeat(np.repeat(whole, s, axis=0), s, axis=1)
            out.append((r, c, sel))
            owned[r : r + patch, c : c + patch] |= sel
    return out


def _starts(n: int, size: int) -> list[int]:
    """Window starts tiling ``[0, n)`` with windows of ``size``; the last one is shifted back to end at n."""
    starts = list(range(0, n - size + 1, size))
    if starts[-1] + size < n:
        starts.append(n - size)
    return starts


class _OffsetStack:
    """An ``AuxStack`` seen from a child-cell offset (so ``AuxCache`` can cache a sub-window)."""

    def __init__(self, stack: Any, row: int, col: int, order: Sequence[int]) -> None:
        self._stack, self._row, self._col, self._order = stack, row, col, list(order)
        self.names = [stack.names[i] for i in self._order]

    def read(self, window: Any) -> np.ndarray:
        from rasterio.windows import Window

        w = Window(window.col_off + self._col, window.row_off + self._row, window.width, window.height)
        return np.asarray(self._stack.read(w), dtype=np.float32)[self._order]


def _region_mask(
    region: tuple[float, float, float, float] | str | None, main: Any, ck: dict[str, Any], main_path: PathLike
) -> tuple[np.ndarray, str]:
    """Boolean ``[H, W]`` parent-cell mask of the evaluated region and a label for it."""
    from carbonsr_cli.train.split import Split, parse_val_region

    h, w = main.values.shape[1:]
    grid = main.grid
    if region is None:
        return np.ones((h, w), dtype=bool), "whole raster (includes training areas)"
    if isinstance(region, str) and region.strip().lower() == "split":
        if not ck.get("split"):
            raise CheckpointError("the checkpoint holds no train/validation split; give --val-region explicitly")
        split = Split.from_dict(ck["split"])
        if (split.height, split.width) != (h, w):
            raise InputDataError(
                f"the checkpoint's split is for a {split.height} x {split.width} grid, this main raster is "
                f"{h} x {w}; give --val-region explicitly",
                main_path,
            )
        return split.val_mask(), "validation region of the training split"
    spec = region if isinstance(region, str) else ",".join(repr(float(v)) for v in region)
    mask, kind = parse_val_region(spec, grid.transform, h, w, grid.crs)
    return mask, f"--val-region {spec}"


def self_validate(
    checkpoint: PathLike,
    main_path: PathLike,
    aux_paths: Sequence[PathLike],
    *,
    scales: Sequence[int] = (2, 4, 12),
    region: tuple[float, float, float, float] | str | None = None,
    metrics: Sequence[str] | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    fill_missing: bool = False,
    categorical: Sequence[str] | None = None,
) -> SelfValidationResult:
    """Scale-shift self-validation: hide detail we know, and score how well it comes back.

    Exactly the degradation of training (``carbonsr_cli.train.dataset``): the main raster is
    tiled into ``patch x patch`` parent-cell windows (12 x 12 by default; the last window of a
    row/column is shifted back to fit). Per scale ``s`` (a divisor of ``patch``) only whole
    ``s x s`` blocks inside a window and the region are scored, each cell once (totals are
    conserved over whole blocks only; a scale with no whole block is skipped with a
    warning). The coarse totals are the sums of ``s x s`` parent cells; the model
    sees ``main = log1p(coarse total / (s * factor)**2)`` and the aux layers, its children are
    water-filled onto each coarse block (``block = s * factor`` children), summed to parent
    cells and compared with the true parent totals. The baselines get the same coarse totals:
    uniform, and dasymetric by every aux layer (raw values as weights; the best layer per
    scale is reported, chosen on these same cells, which favours the baselines). Years are
    covered by consecutive windows of the model's ``T`` years (each year scored once).

    Args:
        checkpoint: carbonsr checkpoint (``best_model.pth``).
        main_path: Main raster (totals per parent cell, t CO2 / cell / yr).
        aux_paths: The aux layers the model was trained with (files, globs, directories).
        scales: Coarse scales in parent cells (each must divide the training patch).
        region: Cells to score: ``(minx, miny, maxx, maxy)`` in the main CRS, a bbox string or
            a polygon file (cells whose centre lies inside), ``"split"`` for the validation
            region stored in the checkpoint, or None for the whole raster (which includes the
            areas the model was trained on, so it flatters the model).
        metrics: Names from :data:`METRICS` (default all); the ratio uses ``nonzero-mae``.
        device: ``auto``, ``cpu``, ``cuda``...
        batch_size: Patches per forward pass.
        fill_missing: Allow aux layers that do not cover the whole extent.
        categorical: Aux raster file stems or names read as categorical; None: the
            checkpoint's setting (``train --categorical``).

    Returns:
        A :class:`SelfValidationResult` (parent-level metrics per scale and method).

    Raises:
        UsageError: bad scales/metrics, empty region. CheckpointError: unusable checkpoint or
            aux layers that differ from the checkpoint's. InputDataError: unusable rasters.
    """
    import torch

    from carbonsr_cli.auxlayers import AuxStack, categorical_kinds, discover_aux
    from carbonsr_cli.downscale.plan import _resolve_aux_order
    from carbonsr_cli.stats import AuxNormalizer
    from carbonsr_cli.train.checkpoints import load_checkpoint, load_model_for_inference
    from carbonsr_cli.train.dataset import AuxCache, BatchSpec, MainData, build_batch, load_main
    from carbonsr_cli.train.loop import _children, resolve_device
    from models.baselines import dasymetric_fill, uniform_fill
    from models.metrics import MetricAccumulator
    from models.physics import block_sum

    names = _check_metric_names(metrics)
    if "nonzero-mae" not in names:
        names = ["nonzero-mae", *names]
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    loaded = load_model_for_inference(checkpoint, dev)
    ck = load_checkpoint(checkpoint)
    f = int(loaded.factor)
    patch = int(dict(ck.get("train_config") or {}).get("patch", 12))
    scales = sorted({int(s) for s in scales})
    bad = [s for s in scales if s < 2 or patch % s]
    if not scales or bad:
        divisors = [d for d in range(2, patch + 1) if patch % d == 0]
        raise UsageError(f"scales {bad or scales} unusable: choose among {divisors} (divisors of the {patch}-cell patch)")
    main = load_main([main_path])
    n_years, h, w = main.values.shape
    if h < patch or w < patch:
        raise InputDataError(f"main raster ({h} x {w} cells) is smaller than one {patch} x {patch} patch", main_path)
    t = int(loaded.years_window)
    if t > n_years:
        raise InputDataError(f"the model sees {t} years at once; the main raster has only {n_years} band(s)", main_path)
    mask, label = _region_mask(region, main, ck, main_path)
    if not (mask & main.valid.any(axis=0)).any():
        raise UsageError(f"the evaluation region ({label}) holds no valid parent cell of the main raster")

    # patch windows touching the region; per scale, whole s x s blocks are scored once (below)
    windows = [(r, c) for r in _starts(h, patch) for c in _starts(w, patch) if mask[r : r + patch, c : c + patch].any()]
    r0 = min(x[0] for x in windows)
    c0 = min(x[1] for x in windows)
    r1 = max(x[0] for x in windows) + patch
    c1 = max(x[1] for x in windows) + patch
    crop = MainData(grid=main.grid, years=main.years, values=main.values[:, r0:r1, c0:c1], paths=main.paths)
    year_starts = _starts(n_years, t)
    year_own: list[np.ndarray] = []
    seen = np.zeros(n_years, dtype=bool)
    for y0 in year_starts:
        own = ~seen[y0 : y0 + t]
        year_own.append(own.copy())
        seen[y0 : y0 + t] = True
    items_by_scale: dict[int, list[tuple[int, int, np.ndarray, int, np.ndarray]]] = {}
    for s in scales:
        items_by_scale[s] = [(r - r0, c - c0, sel, y0, yo) for (r, c, sel) in _whole_blocks(mask, windows, patch, s)
                             for y0, yo in zip(year_starts, year_own)]
    empty = [s for s in scales if not items_by_scale[s]]
    if len(empty) == len(scales):
        raise UsageError(f"the evaluation region ({label}) holds no whole block of {' or '.join(f'{s} x {s}' for s in scales)} parent cells")
    if empty:
        warnings.warn(CarbonSRWarning(
            f"scale(s) {', '.join(map(str, empty))} skipped: the evaluation region ({label}) holds no whole block at that scale"))
        scales = [s for s in scales if s not in empty]

    child = main.grid.child(f)
    if categorical is None:
        categorical = list(dict(ck.get("train_config") or {}).get("categorical") or [])
    kinds = categorical_kinds(categorical)
    with AuxStack(discover_aux(list(aux_paths), kinds=kinds), child, main.years, fill_missing=fill_missing) as stack:
        order = _resolve_aux_order(stack.names, loaded.aux_names, checkpoint)
        view = _OffsetStack(stack, r0 * f, c0 * f, order)
        from rasterio.windows import Window

        raw_all = view.read(Window(0, 0, (c1 - c0) * f, (r1 - r0) * f))  # [C, Y, h, w] physical values
    norm = AuxNormalizer.from_stats(loaded.stats)
    cache = AuxCache(np.asarray(norm.apply(raw_all), dtype=np.float32).astype(np.float16), loaded.aux_names)
    layer_names = list(loaded.aux_names)
    accs: dict[tuple[int, str], Any] = {}
    model = loaded.model
    with torch.no_grad():
        for s in scales:
            block = s * f
            items = items_by_scale[s]
            for k in range(0, len(items), batch_size):
                chunk = items[k : k + batch_size]
                spec = BatchSpec(
                    scale=s,
                    rows=tuple(i[0] for i in chunk),
                    cols=tuple(i[1] for i in chunk),
                    year0=tuple(i[3] for i in chunk),
                    rot=(0,) * len(chunk),
                    flip=(False,) * len(chunk),
                )
                b = build_batch(spec, crop, cache, factor=f, patch=patch, years_window=t)
                sel = np.stack([i[2][None, :, :] & i[4][:, None, None] for i in chunk])[:, None]  # [B,1,T,p,p]
                m = b.mask & sel
                totals = torch.from_numpy(b.totals)
                raw, _ = model(torch.from_numpy(b.aux).to(dev), torch.from_numpy(b.main).to(dev), context_block=block)
                kids = _children(model, raw, totals.to(dev), block)
                preds = {"model": block_sum(kids, f).cpu().numpy(), "uniform": block_sum(uniform_fill(totals, block), f).numpy()}
                for li, ln in enumerate(layer_names):
                    wts = np.stack(
                        [raw_all[li, y0 : y0 + t, r * f : (r + patch) * f, c * f : (c + patch) * f] for r, c, _, y0, _ in chunk]
                    )[:, None]
                    preds[f"dasymetric:{ln}"] = block_sum(dasymetric_fill(totals, torch.from_numpy(wts), block), f).numpy()
                for meth, pv in preds.items():
                    acc = accs.setdefault((s, meth), MetricAccumulator())
                    acc.update(pv, b.truth, m)
    rows: list[dict[str, Any]] = []
    details: dict[str, dict[str, dict[str, float]]] = {}
    for s in scales:
        scored = {meth: _select(acc, names) for (sc, meth), acc in accs.items() if sc == s}
        details[str(s)] = scored
        dasy = {k: v for k, v in scored.items() if k.startswith("dasymetric:")}
        best_dasy = min(dasy, key=lambda k: (np.nan_to_num(dasy[k]["nonzero-mae"], nan=np.inf), k)) if dasy else None
        for meth in ["model", "uniform", *([best_dasy] if best_dasy else [])]:
            rows.append({"scale": s, "method": meth, **scored[meth]})
    reg = tuple(float(v) for v in region) if isinstance(region, (tuple, list)) else None
    res = SelfValidationResult(rows=rows, scales=scales, methods=["model", "uniform", "dasymetric"], region=reg)
    res.region_label = label
    res.details = details
    return res


def split_cell_mask(source: str | os.PathLike[str], shape: tuple[int, int]) -> np.ndarray:
    """The held-out (validation) region of a training run on a grid of ``shape`` cells.

    Args:
        source: A run directory, its ``split.json`` or one of its checkpoints.
        shape: ``(rows, cols)`` of the grid to score (the parent grid or a child grid of it).

    Returns:
        bool ``[rows, cols]``, True inside the run's validation region.

    Raises:
        MissingInputError: no split found. InputDataError: the grid is not the run's parent
            grid or an integer subdivision of it.
    """
    import json

    from carbonsr_cli.errors import InputDataError, MissingInputError
    from carbonsr_cli.train.split import Split

    p = Path(source)
    if p.is_dir():
        p = p / "split.json"
    if not p.exists():
        raise MissingInputError("no training split here (give a run directory, its split.json or a checkpoint)", p)
    if p.suffix.lower() == ".json":
        split = Split.from_dict(json.loads(p.read_text()))
    else:
        from carbonsr_cli.train.checkpoints import load_checkpoint

        ck = load_checkpoint(p)
        if "split" not in ck:
            raise InputDataError("the checkpoint holds no training split", p)
        split = Split.from_dict(ck["split"])
    rows, cols = shape
    k = rows // split.height if split.height else 0
    if k < 1 or rows != k * split.height or cols != k * split.width:
        raise InputDataError(
            f"the grid to score ({rows}x{cols}) is not the run's parent grid ({split.height}x{split.width}) "
            "or a subdivision of it", source)
    m = split.val_mask()
    return np.repeat(np.repeat(m, k, axis=0), k, axis=1)

