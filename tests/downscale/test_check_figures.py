"""The fast figures of the written-file check equal the general ones wherever they apply."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from carbonsr_cli.downscale.check import block_figures, clean_block_figures
from carbonsr_cli.nodata import nodata_mask

F = 4


def _case(nodata: float | None, dtype: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Children ``[2, 6F, 5F]`` and parent totals ``[2, 6, 5]``: nodata parents with nodata
    children, one nodata parent over valid children, one valid parent with a nodata child, a
    zero parent with a nonzero child, and blocks that sum to their parent within rounding."""
    rng = np.random.default_rng(seed)
    kids = rng.gamma(0.4, 3.0, (2, 6 * F, 5 * F)).astype(dtype)
    kids[:, :F, :F] = 0.0
    kb = kids.reshape(2, 6, F, 5, F)
    totals = kb.sum(axis=(2, 4), dtype=np.float64) * (1 + 1e-7)
    totals[:, 0, 0] = 0.0
    kids[0, 1, 1] = 0.5  # a zero parent with a nonzero child
    totals[0, 2, 3] = np.nan  # a nodata parent over valid children: a mismatch
    if nodata is not None:
        fill = np.nan if math.isnan(nodata) else nodata
        totals[1, 4, :] = np.nan
        kids[1, 4 * F : 5 * F, :] = fill  # nodata parents over nodata children: fine
        kids[0, 5 * F + 1, 2 * F] = fill  # one nodata child in a valid block: a mismatch
    return kids, totals


def _general(kids: np.ndarray, totals: np.ndarray, nodata: float | None) -> dict:
    k64 = kids.astype(np.float64)
    return dataclasses.asdict(block_figures(k64, nodata_mask(k64, nodata), totals, F))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("nodata", [None, -9999.0, float("nan"), 7.0])
def test_clean_figures_equal_the_general_ones(dtype: str, nodata: float | None) -> None:
    kids, totals = _case(nodata, dtype)
    fast = clean_block_figures(kids, nodata_mask(kids, nodata), totals, F)
    assert fast is not None
    want = _general(kids, totals, nodata)
    got = dataclasses.asdict(fast)
    for key in ("max_rel_error", "max_abs_error"):
        assert got.pop(key) == pytest.approx(want.pop(key), rel=1e-9, abs=1e-12)
    assert got == want
    assert want["zero_blocks_violated"] == 1 and want["nodata_mismatch"] == (1 if nodata is None else 2)


# (a NaN child with a NaN nodata value is nodata, covered above)
@pytest.mark.parametrize(("bad", "nodata"), [
    (bad, nodata) for bad in (float("nan"), float("inf"), -0.25) for nodata in (None, -9999.0, float("nan"))
    if not (math.isnan(bad) and nodata is not None and math.isnan(nodata))
])
def test_invalid_children_go_to_the_general_figures(bad: float, nodata: float | None) -> None:
    kids, totals = _case(nodata, "float32", seed=1)
    kids[0, 3 * F + 1, 2 * F + 2] = bad  # inside a valid block
    assert clean_block_figures(kids, nodata_mask(kids, nodata), totals, F) is None
    want = _general(kids, totals, nodata)
    assert want["nans"] + want["negatives"] == 1
