"""Spatial split: validation windows are disjoint from training patches plus a buffer."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st

from carbonsr_cli.errors import MissingInputError, UsageError
from carbonsr_cli.train.split import (
    Split,
    make_block_split,
    make_region_split,
    mask_to_rects,
    parse_val_region,
    rect_mask,
    window_sums,
)


def _min_gap(split: Split, positions: np.ndarray) -> int:
    """Smallest Chebyshev gap (cells) between any training patch and any validation cell."""
    val = np.argwhere(split.val_mask())
    p = split.patch
    best = 10**9
    for r, c in positions:
        dr = np.maximum(np.maximum(r - val[:, 0], val[:, 0] - (r + p - 1)), 0)
        dc = np.maximum(np.maximum(c - val[:, 1], val[:, 1] - (c + p - 1)), 0)
        gap = np.maximum(dr, dc) - 1  # cells strictly between the patch and the validation cell
        best = min(best, int(gap.min()))
    return best


def test_window_sums_matches_bruteforce() -> None:
    rng = np.random.default_rng(0)
    m = rng.random((9, 11)) < 0.3
    got = window_sums(m, 3)
    want = np.array([[m[r : r + 3, c : c + 3].sum() for c in range(9)] for r in range(7)])
    assert np.array_equal(got, want)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(30, 70), st.integers(30, 70))
def test_mask_rects_roundtrip(seed: int, h: int, w: int) -> None:
    m = np.random.default_rng(seed).random((h, w)) < 0.4
    assert np.array_equal(rect_mask(mask_to_rects(m), h, w), m)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_block_split_train_never_near_validation(seed: int) -> None:
    split = make_block_split(96, 120, patch=12, block_patches=2, val_fraction=0.2, seed=seed)
    pos = split.train_positions()
    assert len(pos) > 100
    val = split.val_mask()
    assert 0.1 < val.mean() < 0.35
    # every validation window lies in the validation region
    for r, c in split.val_windows:
        assert val[r : r + 12, c : c + 12].all()
    # no training patch overlaps the validation region, and the gap is at least the buffer
    covered = np.zeros_like(val)
    for r, c in pos:
        covered[r : r + 12, c : c + 12] = True
    assert not (covered & val).any()
    sample = pos[np.random.default_rng(seed).choice(len(pos), 200, replace=False)]
    assert _min_gap(split, sample) >= split.buffer
    # the positions are maximal: a patch one cell closer would violate the buffer somewhere
    assert _min_gap(split, pos) == split.buffer


def test_block_split_is_deterministic_and_roundtrips() -> None:
    a = make_block_split(96, 96, seed=5)
    b = make_block_split(96, 96, seed=5)
    assert a.to_dict() == b.to_dict()
    c = Split.from_dict(a.to_dict())
    assert np.array_equal(c.train_positions(), a.train_positions())
    assert c.val_windows == a.val_windows
    others = {tuple(map(tuple, make_block_split(96, 96, seed=s).val_rects)) for s in range(6)}
    assert len(others) > 1, "the seed should change the split"


def test_nodata_excluded() -> None:
    valid = np.ones((60, 60), dtype=bool)
    valid[:, :30] = False  # left half has no data
    split = make_block_split(60, 60, patch=6, block_patches=2, val_fraction=0.2, seed=0, valid=valid)
    pos = split.train_positions(valid)
    assert (pos[:, 1] >= 30 - 3).all()  # at most half of a patch may be nodata
    for r, c in split.val_windows:
        assert valid[r : r + 6, c : c + 6].mean() >= 0.5


def test_too_small_raises() -> None:
    with pytest.raises(UsageError, match="smaller than one"):
        make_block_split(10, 40, patch=12)
    with pytest.raises(UsageError, match="no training patch"):
        make_block_split(24, 24, patch=12, block_patches=2, val_fraction=0.5)


def test_bbox_region() -> None:
    transform = Affine(1000.0, 0, 500_000.0, 0, -1000.0, 4_000_000.0)
    mask, method = parse_val_region("500000,3952000,524000,4000000", transform, 96, 96)
    assert method == "bbox"
    assert mask[:48, :24].all() and not mask[48:].any() and not mask[:, 24:].any()
    split = make_region_split(mask, patch=12, source="bbox")
    assert split.val_windows == [(r, c) for r in (0, 12, 24, 36) for c in (0, 12)]
    pos = split.train_positions()
    assert ((pos[:, 1] >= 24 + 12) | (pos[:, 0] >= 48 + 12)).all()
    assert ((pos[:, 1] == 36) & (pos[:, 0] == 0)).any()
    with pytest.raises(MissingInputError):
        parse_val_region("1,2,3", transform, 96, 96)
    with pytest.raises(UsageError, match="minx < maxx"):
        parse_val_region("5,0,1,1", transform, 96, 96)


def test_small_grid_falls_back_to_smaller_blocks() -> None:
    split = make_block_split(36, 36, patch=12, block_patches=3, val_fraction=0.2, seed=0)
    assert split.block_patches < 3
    assert len(split.train_positions()) > 0 and split.val_windows
