"""Helpers of the downscale tests: synthetic rasters, tiny checkpoints, an independent checker.

The conservation checker here re-implements the contract with plain rasterio/numpy, so it does
not share code with ``carbonsr_cli.downscale.check_written_conservation``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from raster_files import write_north_up

#: A model configuration small enough for CPU tests (untrained weights are fine).
TEST_MODEL = dict(
    widths=(4, 4, 4, 4),
    depths=(0, 0, 0, 0),
    kernel_sizes=(3,),
    dilations=(1,),
    n_experts=2,
    top_k=1,
    expert_hidden_mult=1,
    attn_heads=1,
    attn_pool=2,
    state_size=2,
    temporal_kernel=1,
)


def write_tif(
    path: Path,
    data: np.ndarray,
    *,
    res: float | tuple[float, float],
    origin: tuple[float, float],
    crs: str,
    **kw: Any,
) -> Path:
    """Write ``data`` ``[bands, rows, cols]`` (or ``[rows, cols]``) as a north-up GeoTIFF
    (float32, nodata -9999 unless given; :func:`raster_files.write_north_up`)."""
    return write_north_up(path, data, res=res, origin=origin, crs=crs, **kw)


def synthetic_totals(rows: int, cols: int, years: int = 2, *, seed: int = 0, nodata: float = -9999.0) -> np.ndarray:
    """``[years, rows, cols]`` float32 totals: heavy-tailed, some exact zeros, nodata cells.

    Nodata cells sit at a raster corner, on an edge and inside; zeros are scattered; every
    raster-edge row/column keeps nonzero totals too.
    """
    rng = np.random.default_rng(seed)
    t = rng.gamma(0.7, 50.0, size=(years, rows, cols)).astype(np.float32)
    t[rng.random((years, rows, cols)) < 0.15] = 0.0
    t[:, 0, 1] = 123.0  # edge, nonzero
    t[:, -1, -2] = 77.0
    t[:, 0, 0] = nodata
    t[:, rows // 2, -1] = nodata
    t[:, rows // 3, cols // 3] = nodata
    return t


def make_checkpoint(
    path: Path,
    aux_names: Sequence[str],
    *,
    factor: int = 10,
    years_window: int = 1,
    seed: int = 0,
    prior_coef: Sequence[float] | None = None,
    selection: dict | None = None,
) -> Path:
    """Save an untrained carbonsr checkpoint with the given aux layer names.

    ``prior_coef`` (one per layer, power 1, no neighbourhood) adds a fitted layer mix as
    ``train`` records it; ``selection`` adds the record ``--method auto`` reads.
    """
    import torch

    from carbonsr_cli.checkpoints import save_checkpoint
    from models.config import preset
    from models.network import DSTCarbonFormer

    cfg = preset("tiny", len(aux_names), **TEST_MODEL)
    torch.manual_seed(seed)
    net = DSTCarbonFormer(cfg)
    if net.pointwise is not None:  # a trained-looking head (it starts at 0): children differ from uniform
        with torch.no_grad():
            net.pointwise.out.weight.normal_(0.0, 0.5)
    stats = {
        "aux": [
            {"name": n, "transform": "log1p", "mean": 0.5, "std": 2.0, "clip_lo": -5.0, "clip_hi": 20.0}
            for n in aux_names
        ],
        "main": {},
    }
    payload = {
        "model_config": cfg.to_dict(),
        "model_state": net.state_dict(),
        "aux_names": list(aux_names),
        "stats": stats,
        "factor": factor,
        "years_window": years_window,
    }
    if prior_coef is not None:
        payload["prior_fit"] = {"exponents": [1.0], "smooth": [1], "coef": [float(c) for c in prior_coef], "floor": 1e-3,
                                "ref": [1.0] * len(aux_names), "cells": 0, "terms": {}}
    if selection is not None:
        payload["selection"] = dict(selection)
    save_checkpoint(path, payload)
    return path


def _nd(a: np.ndarray, nodata: float | None) -> np.ndarray:
    if nodata is None:
        return np.zeros(a.shape, bool)
    if math.isnan(nodata):
        return np.isnan(a)
    return a == nodata


def assert_conserves(
    out_path: Path,
    main_path: Path,
    factor: int,
    *,
    bands: Sequence[int] | None = None,
    window: Any = None,
    mask: np.ndarray | None = None,
    rtol: float = 1e-6,
) -> dict[str, Any]:
    """Assert the contract of a written child raster against its parent totals.

    For every parent cell: float64 sum of the written children == total within ``rtol``
    relative, exactly 0 children where the total is 0, no negatives, no NaN, children nodata
    exactly where the parent is nodata (or outside ``mask``). Also checks the grid.

    Returns:
        Some figures (blocks checked, max relative error) for further assertions.
    """
    import rasterio
    from affine import Affine

    with rasterio.open(main_path) as m, rasterio.open(out_path) as o:
        idx = list(bands) if bands else list(range(1, m.count + 1))
        tot = m.read(idx, window=window).astype(np.float64)
        par_nd = _nd(tot, m.nodata)
        mtrans = m.window_transform(window) if window is not None else m.transform
        kids = o.read().astype(np.float64)
        assert o.crs == m.crs
        assert o.transform.almost_equals(mtrans @ Affine.scale(1.0 / factor), precision=1e-9)
        onodata = o.nodata
    if mask is not None:
        par_nd |= ~mask[None]
    b, h, w = tot.shape
    assert kids.shape == (b, h * factor, w * factor), (kids.shape, tot.shape)
    kid_nd = _nd(kids, onodata)
    nd_blocks = kid_nd.reshape(b, h, factor, w, factor)
    assert np.array_equal(nd_blocks.all(axis=(2, 4)), par_nd), "children nodata where the parent is valid (or not)"
    assert np.array_equal(nd_blocks.any(axis=(2, 4)), par_nd), "a block is partly nodata"
    valid_kids = kids[~kid_nd]
    assert np.isfinite(valid_kids).all(), "NaN/inf children"
    assert (valid_kids >= 0).all(), "negative children"
    sums = np.where(kid_nd, 0.0, kids).reshape(b, h, factor, w, factor).sum(axis=(2, 4))
    s = tot[~par_nd]
    got = sums[~par_nd]
    zero = s == 0
    assert np.all(got[zero] == 0.0), "nonzero children in a block whose total is 0"
    zero_blocks = (tot == 0) & ~par_nd
    kb = np.where(kid_nd, 0.0, kids).reshape(b, h, factor, w, factor)
    assert not (kb != 0).any(axis=(2, 4))[zero_blocks].any()
    rel = np.abs(got[~zero] - s[~zero]) / s[~zero]
    max_rel = float(rel.max()) if rel.size else 0.0
    assert max_rel <= rtol, f"block-sum error {max_rel:.3g} > {rtol}"
    return {"blocks": int((~par_nd).sum()), "max_rel": max_rel, "zeros": int(zero.sum()), "nodata": int(par_nd.sum())}


def no_temp_files(directory: Path) -> list[str]:
    """Hidden temp files left by the atomic writer in ``directory`` (should be empty)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and ".tmp" in p.name)


class _StandInStack:
    """A picklable stand-in for AuxStack: ``read`` fills ``out`` (or a new array) from ``values``."""

    channels: int
    years = ["2020"]

    def reader_copy(self) -> "_StandInStack":
        return self

    def values(self, window: Any) -> np.ndarray:
        raise NotImplementedError

    def read(self, window: Any, out: np.ndarray | None = None) -> np.ndarray:
        arr = self.values(window)
        if out is not None:
            out[...] = arr
            return out
        return arr

    def close(self) -> None:
        pass


class FailingStack(_StandInStack):
    """A stand-in whose reads fail from child row ``fail_from`` on (values: the window's row offset).

    Used to test errors raised inside spawned reader processes.
    """

    def __init__(self, channels: int, fail_from: int, path: str) -> None:
        self.channels, self.fail_from, self.path = channels, fail_from, path

    def values(self, window: Any) -> np.ndarray:
        from carbonsr_cli.errors import InputDataError

        if int(window.row_off) >= self.fail_from:
            raise InputDataError("cannot read aux data (truncated or corrupt file?): test", self.path)
        return np.full((self.channels, 1, int(window.height), int(window.width)), float(window.row_off), np.float32)


class ValuesStack(_StandInStack):
    """A stand-in whose values encode channel, child row and child col.

    ``[C, 1, h, w]`` float32: ``channel * 1e6 + row * 1000 + col`` (exact in float32 for the
    small grids of the tests), so any strip misplaced or overwritten too early shows.
    """

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def values(self, window: Any) -> np.ndarray:
        c, r, h, w = int(window.col_off), int(window.row_off), int(window.height), int(window.width)
        rows = np.arange(r, r + h)[:, None]
        cols = np.arange(c, c + w)[None, :]
        return np.stack([(ch * 1_000_000 + rows * 1000 + cols).astype(np.float32)[None]
                         for ch in range(self.channels)])
