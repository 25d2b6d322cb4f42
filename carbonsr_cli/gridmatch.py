"""Matching a child raster to a parent (or reference) raster: bands by name, the integer
resolution factor, the alignment offset, streaming by chunks of rows, block sums and units.
Shared by the conservation check and the reference comparison."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from carbonsr_cli.errors import InputDataError
from carbonsr_cli.rasters import read_years

if TYPE_CHECKING:
    from rasterio.io import DatasetReader


#: Child cells read per chunk when streaming (float64: ~32 MB per array).
_CHUNK_CHILD_CELLS = 4_000_000



#: Relative tolerance when deciding that two resolutions form an integer ratio.
_RATIO_TOL = 1e-6



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
