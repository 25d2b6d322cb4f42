"""The one nodata-mask helper of the package: which cells of an array are nodata."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["is_nan_value", "nodata_mask"]


def is_nan_value(nodata: float | None) -> bool:
    """True when ``nodata`` is set and is NaN."""
    return nodata is not None and isinstance(nodata, float) and math.isnan(nodata)


def nodata_mask(values: np.ndarray, nodata: float | None, *, nan: bool = False) -> np.ndarray:
    """Boolean mask of the nodata cells of ``values``.

    Args:
        values: Any array.
        nodata: The declared nodata value (a NaN nodata matches NaN cells), or None.
        nan: Also count every NaN cell as nodata (a NaN total is never valid), whatever
            ``nodata`` is; otherwise only the declared value marks nodata.
    """
    if nan:
        mask = np.isnan(values)
        if nodata is not None and not math.isnan(nodata):
            mask |= values == nodata
        return mask
    if nodata is None:
        return np.zeros(values.shape, dtype=bool)
    if is_nan_value(nodata):
        return np.isnan(values)
    return values == nodata
