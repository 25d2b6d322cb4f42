"""The uniform and dasymetric baselines in numpy, for the downscale engine (a run of them never
imports torch, which costs 1-3 s): the same arithmetic as :mod:`models.baselines`, bit for bit.

:mod:`models.baselines` (torch) defines the formulas and stays the reference (training,
evaluation, CUDA); these twins repeat its operations one for one, float64 sums in torch's
CPU order (:func:`models.torch_sum_order.torch_sums`), so that a CPU run gives the same
bits either way (``tests/downscale/test_host_fills.py`` compares them). The per-block factors
are applied to the children in place, on the raster layout, instead of on one row per block:
the same products, without the two copies of ``to_blocks`` / ``from_blocks``.
"""

from __future__ import annotations

import numpy as np

from models.torch_sum_order import torch_sums

__all__ = ["block_columns", "clean_weights", "dasymetric_children", "uniform_children"]


def uniform_children(totals: np.ndarray, block: int) -> np.ndarray:
    """``models.baselines.uniform_fill`` in numpy, bit for bit: float64 ``S / block**2`` repeated
    over each ``block x block`` block of children (``[..., h, w]`` -> ``[..., h * block, w * block]``)."""
    s = np.asarray(totals).astype(np.float64) / float(block * block)
    *lead, h, w = s.shape
    return np.broadcast_to(s[..., :, None, :, None], (*lead, h, block, w, block)).reshape(*lead, h * block, w * block)


def block_columns(x: np.ndarray, block: int) -> np.ndarray:
    """``models.physics.to_blocks`` transposed, in numpy: ``[..., H, W]`` -> ``[block * block, N]``
    (a copy): column ``j`` holds block ``j``'s children row-major, blocks in
    ``[..., H / block, W / block]`` order (each child position contiguous over the blocks)."""
    *lead, h, w = x.shape
    if h % block or w % block:
        raise ValueError(f"shape {x.shape} is not a multiple of block {block}")
    nd = len(lead)
    v = x.reshape(*lead, h // block, block, w // block, block)
    v = v.transpose(nd + 1, nd + 3, *range(nd), nd, nd + 2)  # [dy, dx, ..., hb, wb]
    return np.ascontiguousarray(v).reshape(block * block, -1)


def clean_weights(weights: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Weights broadcast to ``shape`` as a new float64 array, NaN, infinite and negative values 0
    (torch's ``nan_to_num_(0, 0, 0).clamp_(min=0)``; the sign of a zero may differ, which no
    result of :func:`dasymetric_children` shows: ``share + 0.0`` turns ``-0`` into ``0``).

    Raises:
        ValueError: ``weights`` do not broadcast to ``shape``.
    """
    a = np.asarray(weights)
    out = np.empty(shape, dtype=np.float64)
    try:
        np.fmax(a, 0.0, out=out)  # NaN, -inf and negative values -> 0 (cast to float64 on the way)
    except ValueError:
        raise ValueError(f"weights of shape {tuple(a.shape)} do not broadcast to children {shape}") from None
    out[out == np.inf] = 0.0
    return out


def _power(w: np.ndarray, power: float) -> np.ndarray:
    """``w ** power`` as torch's ``pow_`` computes it: ``w * w`` and ``w * w * w`` for 2 and 3 (bit
    for bit); other exponents with numpy's ``power`` (torch uses SLEEF: within 1-2 ulp)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if power == 2.0:
            return np.multiply(w, w, out=w)
        if power == 3.0:
            sq = w * w
            return np.multiply(sq, w, out=w)
        return np.power(w, power, out=w)


def dasymetric_children(totals: np.ndarray, weights: np.ndarray, block: int, power: float = 1.0) -> np.ndarray:
    """``models.baselines.dasymetric_fill`` in numpy: every block total shared in proportion to
    ``weights ** power`` (uniform where they sum to 0; negative, NaN and infinite weights count as 0).

    Bit for bit the torch function on the CPU for ``power`` 1, 2 and 3; for other exponents
    within a few float64 ulps (torch's ``pow`` differs from numpy's in the last bits).

    Args:
        totals: Block totals ``[..., h, w]`` (t CO2 / block / yr); NaN = nodata.
        weights: Child weights broadcastable to ``[..., h * block, w * block]`` (any unit, e.g.
            raw float32 aux values with NaN for nodata).
        block: Block edge in child cells.
        power: Exponent applied to the weights (> 0).

    Returns:
        ``[..., h * block, w * block]`` float64 children; NaN where the total is NaN.
    """
    if not power > 0:
        raise ValueError(f"power must be > 0, got {power}")
    s = np.asarray(totals, dtype=np.float64)
    *lead, hb, wb = s.shape
    shape = (*lead, hb * block, wb * block)
    w = clean_weights(weights, shape)
    if power != 1.0:
        w = np.nan_to_num(_power(w, power), copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    wsum = torch_sums(block_columns(w, block), axis=0)  # [N] block sums, torch's order
    empty = wsum <= 0
    with np.errstate(divide="ignore"):
        inv = np.where(empty, 0.0, 1.0 / np.where(empty, 1.0, wsum))
    uniform = empty.astype(np.float64) / (block * block)
    # torch: share = wb * inv + uniform, then share * S, on one row per block; here the same
    # per-block factors multiply the children where they lie, a band of block rows at a time.
    kids = w.reshape(*lead, hb, block, wb * block)

    def per_block(a: np.ndarray) -> np.ndarray:  # [N] -> [..., hb, 1, W]
        return np.repeat(a.reshape(*lead, hb, 1, wb), block, axis=-1)

    with np.errstate(invalid="ignore", over="ignore"):
        np.multiply(kids, per_block(inv), out=kids)
        np.add(kids, per_block(uniform), out=kids)
        np.multiply(kids, per_block(s), out=kids)
    return w
