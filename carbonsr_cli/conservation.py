"""Conservation reports: do the children of every parent cell sum to its total?

One module for every conservation check of the package: :class:`ConservationCheck` (the check of
a written ``carbonsr downscale`` output against its plan, ``ok`` a plain bool) and
:func:`check_conservation` / :class:`ConservationReport` (any child raster against any totals
raster: ``carbonsr evaluate --conservation``, the demo and the tests).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from carbonsr_cli.errors import ConservationError, InputDataError, UsageError
from carbonsr_cli.gridmatch import _aligned_offset, _row_chunks, infer_factor, match_bands
from carbonsr_cli.nodata import nodata_mask
from carbonsr_cli.rasters import open_raster, read_window

__all__ = [
    "BandConservation",
    "BlockLocation",
    "ConservationCheck",
    "ConservationReport",
    "check_blocks",
    "check_conservation",
]

PathLike = str | os.PathLike[str]

#: Block-sum tolerance (relative) of the conservation check.
CONSERVATION_RTOL = 1e-6



@dataclass
class ConservationCheck:
    """Conservation of the written output against the parent totals.

    Attributes:
        max_rel_error: Largest ``|sum(children) - S| / S`` over valid blocks with ``S > 0``.
        max_abs_error: Largest ``|sum(children) - S|`` (t CO2 / parent cell / yr).
        blocks: Valid parent cells checked (over all bands).
        zero_blocks_violated: Blocks with ``S == 0`` holding a nonzero child.
        negatives: Child cells < 0.
        nans: NaN/inf child cells inside valid blocks (not nodata).
        nodata_mismatch: Blocks where child nodata does not match parent nodata.
        ok: Every check passed (relative error <= 1e-6, all counts zero).
    """

    max_rel_error: float = 0.0
    max_abs_error: float = 0.0
    blocks: int = 0
    zero_blocks_violated: int = 0
    negatives: int = 0
    nans: int = 0
    nodata_mismatch: int = 0
    ok: bool = True

    def merge(self, other: ConservationCheck) -> None:
        """Add the counts and take the largest errors of ``other`` (a check of other rows)."""
        self.max_rel_error = max(self.max_rel_error, other.max_rel_error)
        self.max_abs_error = max(self.max_abs_error, other.max_abs_error)
        self.blocks += other.blocks
        self.zero_blocks_violated += other.zero_blocks_violated
        self.negatives += other.negatives
        self.nans += other.nans
        self.nodata_mismatch += other.nodata_mismatch

    def finish(self) -> ConservationCheck:
        """Set :attr:`ok` from the other fields and return self."""
        self.ok = bool(
            self.max_rel_error <= CONSERVATION_RTOL
            and self.zero_blocks_violated == 0
            and self.negatives == 0
            and self.nans == 0
            and self.nodata_mismatch == 0
        )
        return self


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


def check_blocks(
    children: np.ndarray,
    totals: np.ndarray,
    factor: int,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    child_nodata: float | None = None,
    totals_nodata: float | None = None,
    name: str = "",
) -> BandConservation:
    """:func:`check_conservation` on arrays: ``children [H, W]`` against ``totals [H / factor,
    W / factor]`` (NaN totals are nodata; rows and columns of ``worst`` are array indices)."""
    from rasterio.transform import Affine  # lazy: rasterio is slow to import

    c = np.asarray(children, dtype=np.float64)
    t = np.asarray(totals, dtype=np.float64)
    if c.shape != (t.shape[0] * factor, t.shape[1] * factor):
        raise ValueError(f"children {c.shape} do not match totals {t.shape} with factor {factor}")
    bc = BandConservation(name=name)
    _check_chunk(bc, t, c, factor, totals_nodata, child_nodata, rtol, atol, 0, 0, Affine.identity())
    return bc
