"""Baselines every learned result must beat: uniform and dasymetric redistribution.

Both conserve mass exactly per block (float64) and share the block arithmetic of
:mod:`models.physics`. Totals are t CO2 / block / yr; children are t CO2 / child cell / yr.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from models.physics import block_broadcast, from_blocks, to_blocks

__all__ = ["dasymetric_fill", "point_first_fill", "uniform_fill"]


def _as_f64(x: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(x).to(torch.float64)


def uniform_fill(totals: Tensor | np.ndarray, block: int) -> Tensor:
    """Spread every block total evenly over its ``block x block`` children.

    Args:
        totals: Block totals ``[B, 1, T, h, w]`` (any ``[..., h, w]``); NaN = nodata.
        block: Block edge in child cells.

    Returns:
        ``[B, 1, T, h * block, w * block]`` float64: each child = S / block**2 (NaN where S is NaN).
    """
    s = _as_f64(totals)
    return block_broadcast(s / float(block * block), block)


def dasymetric_fill(
    totals: Tensor | np.ndarray,
    weights: Tensor | np.ndarray,
    block: int,
    power: float = 1.0,
) -> Tensor:
    """Share every block total in proportion to ``weights ** power`` (e.g. night lights).

    Negative, NaN and infinite weights count as 0. Blocks whose weights sum to 0 fall back to
    the uniform share.

    Args:
        totals: Block totals ``[B, 1, T, h, w]`` (any ``[..., h, w]``); NaN = nodata.
        weights: Child weights ``[B, 1, T, h * block, w * block]`` (or broadcastable to it, e.g.
            ``[B, 1, 1, H, W]`` for a static layer), any unit.
        block: Block edge in child cells.
        power: Exponent applied to the weights (> 0); larger values concentrate the total.

    Returns:
        ``[B, 1, T, h * block, w * block]`` float64; block sums equal the totals within float64
        rounding; NaN where the total is NaN.
    """
    if not power > 0:
        raise ValueError(f"power must be > 0, got {power}")
    s = _as_f64(totals)
    shape = (*s.shape[:-2], s.shape[-2] * block, s.shape[-1] * block)
    w = _as_f64(weights)
    try:
        w = w.expand(shape)
    except RuntimeError:
        raise ValueError(f"weights of shape {tuple(w.shape)} do not broadcast to children {shape}") from None
    # One row per block: row-wise sums are much faster than strided block pooling; in-place,
    # fused ops (nan_to_num, clamp_) avoid slow torch.where passes on the CPU.
    wb = to_blocks(w, block).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0)
    if power != 1.0:
        wb = wb.pow_(power).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    wsum = wb.sum(dim=-1, keepdim=True)
    empty = wsum <= 0
    inv = torch.where(empty, torch.zeros_like(wsum), 1.0 / torch.where(empty, torch.ones_like(wsum), wsum))
    share = wb.mul_(inv).add_(empty.to(wb.dtype) / (block * block))
    return from_blocks(share.mul_(s.reshape(-1, 1)), shape, block)


def point_first_fill(
    totals: Tensor | np.ndarray,
    point_mass: Tensor | np.ndarray,
    surface: Tensor | np.ndarray,
    block: int,
) -> Tensor:
    """Point-source aware allocation (as ODIAC does): listed point sources first, then a surface.

    In every block, the listed mass ``P = sum(point_mass)`` is placed at the points first, capped
    by the block total ``S`` (each point gets ``min(P, S) * m / P``); the remainder ``S - min(P, S)``
    is shared in proportion to ``surface`` (uniform where the surface sums to 0).

    Args:
        totals: Block totals ``[..., h, w]`` (t CO2 / block / yr); NaN = nodata.
        point_mass: Listed point emissions per child cell ``[..., h * block, w * block]`` (e.g. the
            ``plants:co2_t_yr`` layer), any non-negative unit comparable with the totals.
        surface: Child weights for the remainder (broadcastable like ``dasymetric_fill``'s).
        block: Block edge in child cells.

    Returns:
        ``[..., h * block, w * block]`` float64 children, >= 0, summing to each total.
    """
    s = _as_f64(totals)
    shape = (*s.shape[:-2], s.shape[-2] * block, s.shape[-1] * block)
    pm = to_blocks(_as_f64(point_mass).expand(shape), block).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0)
    p = pm.sum(dim=-1, keepdim=True)
    flat = s.reshape(-1, 1)
    placed = torch.minimum(p, flat.nan_to_num(nan=0.0).clamp(min=0))
    at_points = pm * torch.where(p > 0, placed / torch.where(p > 0, p, torch.ones_like(p)), torch.zeros_like(p))
    rest = dasymetric_fill(flat.view(-1, 1, 1) - placed.view(-1, 1, 1),
                           from_blocks(to_blocks(_as_f64(surface).expand(shape), block), (flat.shape[0], block, block), block), block)
    x = at_points + rest.reshape(-1, block * block)
    x = torch.where(torch.isnan(flat), torch.full_like(x, float("nan")), x)
    return from_blocks(x, shape, block)
