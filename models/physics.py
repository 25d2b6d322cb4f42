"""Mass-conserving physics layer: water-filling projection of child cells onto block totals.

Every ``block x block`` group of child cells ("block") must sum exactly to its known total
``S`` (a parent cell at inference, a coarse block of ``s x s`` parent cells in training) and
every child must be >= 0. :func:`water_fill` maps raw, unconstrained child values ``v``
(linear domain, t CO2 / child cell / yr, may be negative) to the closest such field in the
Euclidean sense::

    x = argmin ||x - v||_2  subject to  x >= 0,  sum(x) = S      (per block)

whose solution is ``x_i = max(v_i - tau, 0)`` with the "water level" ``tau`` chosen so that
the block sums to ``S``. ``tau`` is found exactly by sorting (Held et al. 1974; Duchi et al.
2008): sort ``u = v - max(v)`` descending, ``rho`` = the number of ``k`` with
``u_(k) > (cumsum_k(u) - S) / k``, ``tau = (cumsum_rho(u) - S) / rho``. Everything is batched
over all blocks at once (no Python loop) and computed in float64: float32 cancellation gives
block-sum errors near 1e-2 relative, float64 about 1e-15. The result is differentiable through
autograd (sort, cumsum, gather and clamp all have gradients), which gives the projection's
Jacobian ``dx_i/dv_j = delta_ij - 1/|support|`` on the support.

Block arithmetic (:func:`block_sum`, :func:`block_broadcast`) is shared with
:mod:`models.baselines`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "PhysicsHead",
    "block_broadcast",
    "block_sum",
    "project_blocks",
    "to_blocks",
    "from_blocks",
    "water_fill",
]


def _check_block(shape: torch.Size, block: int) -> tuple[int, int]:
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if len(shape) < 2:
        raise ValueError(f"expected a tensor [..., H, W], got shape {tuple(shape)}")
    h, w = shape[-2], shape[-1]
    if h % block or w % block:
        raise ValueError(f"H={h} and W={w} must be multiples of block={block}")
    return h // block, w // block


def block_sum(x: Tensor, block: int) -> Tensor:
    """Sum-pool the last two dimensions over non-overlapping ``block x block`` blocks.

    Args:
        x: Child values ``[..., H, W]`` (e.g. ``[B, 1, T, H, W]``), H and W multiples of block.
        block: Block edge in child cells.

    Returns:
        Block totals ``[..., H / block, W / block]``, same dtype (NaN propagates).
    """
    hb, wb = _check_block(x.shape, block)
    if block == 1:
        return x
    return x.reshape(*x.shape[:-2], hb, block, wb, block).sum(dim=(-3, -1))


def block_broadcast(t: Tensor, block: int) -> Tensor:
    """Nearest-neighbour upsample: repeat every cell of ``t`` over a ``block x block`` block.

    Args:
        t: Block values ``[..., h, w]``.
        block: Block edge in child cells.

    Returns:
        ``[..., h * block, w * block]`` (a contiguous copy; values are not divided).
    """
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if block == 1:
        return t
    *lead, h, w = t.shape
    return t[..., :, None, :, None].expand(*lead, h, block, w, block).reshape(*lead, h * block, w * block)


def to_blocks(x: Tensor, block: int, dtype: torch.dtype | None = None) -> Tensor:
    """Rearrange ``[..., H, W]`` into one row per block: ``[N, block * block]`` (a copy).

    Rows are ordered like ``block_sum(x, block).reshape(-1)``. ``dtype`` casts in the same
    pass (default: keep ``x.dtype``). Differentiable.
    """
    hb, wb = _check_block(x.shape, block)
    lead = tuple(x.shape[:-2])
    out = torch.empty((*lead, hb, wb, block, block), dtype=dtype or x.dtype, device=x.device)
    out.copy_(x.reshape(*lead, hb, block, wb, block).transpose(-3, -2))
    return out.reshape(-1, block * block)


def from_blocks(
    xb: Tensor, shape: torch.Size | tuple[int, ...], block: int, dtype: torch.dtype | None = None
) -> Tensor:
    """Inverse of :func:`to_blocks`: ``[N, block * block]`` back to ``shape`` ``[..., H, W]`` (a copy)."""
    hb, wb = _check_block(torch.Size(shape), block)
    lead = tuple(shape[:-2])
    out = torch.empty((*lead, hb, block, wb, block), dtype=dtype or xb.dtype, device=xb.device)
    out.copy_(xb.reshape(*lead, hb, wb, block, block).transpose(-3, -2))
    return out.reshape(*lead, hb * block, wb * block)


def _water_level_numpy(u: Tensor, s: Tensor, chunk: int = 1 << 15) -> tuple[Tensor, Tensor]:
    """Water level ``tau`` and support threshold (rho-th largest value) per row, on the CPU.

    numpy's vectorised sort is several times faster than ``torch.sort`` on CPU rows.
    """
    import numpy as np

    a = u.detach().numpy()
    sv = s.detach().numpy()
    n = a.shape[-1]
    k = np.arange(1, n + 1, dtype=np.float64)
    tau = np.empty(a.shape[0], dtype=np.float64)
    kth = np.empty(a.shape[0], dtype=np.float64)
    for i in range(0, a.shape[0], chunk):
        srt = np.sort(a[i : i + chunk], axis=-1)[:, ::-1]
        cs = np.cumsum(srt, axis=-1)
        cs -= sv[i : i + chunk, None]
        rho = np.maximum(np.count_nonzero(srt * k > cs, axis=-1), 1)
        rows = np.arange(srt.shape[0])
        tau[i : i + chunk] = cs[rows, rho - 1] / rho
        kth[i : i + chunk] = srt[rows, rho - 1]
    return torch.from_numpy(tau).unsqueeze(-1), torch.from_numpy(kth).unsqueeze(-1)


def _water_level_torch(u: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Water level ``tau`` and support threshold per row with ``torch.sort`` (any device)."""
    n = u.shape[-1]
    srt = torch.sort(u, dim=-1, descending=True).values
    cs = srt.cumsum(dim=-1).sub_(s.unsqueeze(-1))
    k = torch.arange(1, n + 1, dtype=u.dtype, device=u.device)
    rho = (srt * k > cs).sum(dim=-1, keepdim=True).clamp_(min=1)
    tau = cs.gather(-1, rho - 1) / rho.to(u.dtype)
    return tau, srt.gather(-1, rho - 1)


def project_blocks(v: Tensor, s: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` onto the simplex ``{x >= 0, sum x = s}``.

    The core of :func:`water_fill`, for callers that already have blocks as rows.

    Args:
        v: Finite float64 values ``[N, n]``.
        s: Finite float64 totals ``[N]``, all >= 0.

    Returns:
        ``[N, n]`` float64, >= 0; each row sums to ``s`` within a few ulps (the float rounding of
        the projection is removed by rescaling the positive entries by ``s / sum``). Rows with
        ``s == 0`` are exactly zero. Differentiable in ``v`` and ``s``: the support is found
        without gradient, then ``tau = (sum_support(v) - s) / |support|`` is recomputed with
        autograd, which gives the projection's exact Jacobian.
    """
    s_col = s.unsqueeze(-1)
    # The projection is shift-invariant; shifting by the (detached) row max keeps the values
    # that matter (those within s of the max) free of cancellation against huge magnitudes.
    u = v - v.detach().amax(dim=-1, keepdim=True)
    with torch.no_grad():
        if u.device.type == "cpu":
            tau, kth = _water_level_numpy(u, s)
        else:
            tau, kth = _water_level_torch(u.detach(), s.detach())
    differentiable = torch.is_grad_enabled() and (u.requires_grad or s.requires_grad)
    if differentiable:
        support = u.detach() >= kth
        count = support.sum(dim=-1, keepdim=True).to(u.dtype)
        tau = (torch.where(support, u, torch.zeros_like(u)).sum(dim=-1, keepdim=True) - s_col) / count
        x = (u - tau).clamp(min=0)
    else:  # in place: no new temporaries (allocation is a large share of the CPU time)
        x = u.sub_(tau).clamp_(min=0)
    tot = x.sum(dim=-1, keepdim=True)
    # Remove the float rounding of tau: sum(x) == s to ~1e-15 relative. For s > 0 the row max
    # gets -tau > 0, so tot > 0; rows with s == 0 are already exactly zero (tau = 0 = max u).
    pos = tot > 0
    scale = torch.where(pos, s_col / torch.where(pos, tot, torch.ones_like(tot)), torch.ones_like(tot))
    return x * scale if differentiable else x.mul_(scale)


def _sanitize(v: Tensor, s_safe: Tensor) -> Tensor:
    """Make every row finite without changing the projection's meaning.

    NaN and -inf values get a zero share; if a row has +inf values, they share the total
    equally; a row with no finite value (all NaN / -inf) becomes uniform.
    """
    posinf = torch.isposinf(v)
    has_posinf = posinf.any(dim=-1, keepdim=True)
    neg_inf = torch.full_like(v, float("-inf"))
    v = torch.where(has_posinf, torch.where(posinf, torch.zeros_like(v), neg_inf), v)
    v = torch.where(torch.isnan(v), neg_inf, v)
    finite = torch.isfinite(v)
    none_finite = ~finite.any(dim=-1, keepdim=True)
    v = torch.where(none_finite, torch.zeros_like(v), v)
    finite = finite | none_finite
    vmax = torch.where(finite, v, neg_inf).amax(dim=-1, keepdim=True).detach()
    # Any value below vmax - s stays below the water level (tau >= vmax - s): zero share.
    low = vmax - s_safe.unsqueeze(-1) - 1.0 - vmax.abs()
    return torch.where(finite, v, low)


def water_fill(
    values: Tensor,
    totals: Tensor,
    block: int,
    *,
    allow_signed: bool = False,
    out_dtype: torch.dtype | None = None,
    totals_counts: tuple[int, int, int] | None = None,
) -> Tensor:
    """Project every ``block x block`` block of ``values`` onto ``{x >= 0, sum x = total}``.

    Args:
        values: Raw child values ``[B, 1, T, H, W]`` (any ``[..., H, W]`` works), linear domain
            (t CO2 / child cell / yr); may be negative. NaN and -inf values get a zero share,
            +inf values share their block's total equally, and a block with no finite value is
            filled uniformly, so the output is finite wherever the total is.
        totals: Block totals ``[B, 1, T, H / block, W / block]`` (same leading dims), t CO2 /
            block / yr. NaN = nodata: all children of that block are NaN.
        block: Block edge in child cells (``factor`` at inference, ``s * factor`` in training).
        allow_signed: If False (default), a negative total raises ``ValueError``. If True, a
            block with a negative total is projected onto the hyperplane ``{sum x = S}`` only
            (``x = v + (S - sum v) / n``: a uniform shift, children may have either sign), since
            a sign constraint is meaningless for a net sink; blocks with ``S >= 0`` are
            unaffected.
        out_dtype: dtype of the result; None means float64. The projection is always float64;
            for a float32 output every child is >= 0, so the float64 sum of the float32
            children is within 2**-24 (6e-8) relative of ``S`` (for totals above float32's
            smallest normal number, 1.2e-38). In signed blocks (``allow_signed``) the largest
            child absorbs the cast's rounding residual instead.
        totals_counts: ``(infinite, negative, NaN)`` counts of ``totals`` when the caller
            knows them (e.g. computed on the host before the upload). Then the function never
            waits for the device: non-finite values are handled branch-free (same result)
            instead of after a check that copies counts back to the host.

    Returns:
        Children ``[B, 1, T, H, W]`` in ``out_dtype``: >= 0, finite where the total is finite,
        exactly 0 in blocks with ``S == 0``, block sums equal to ``S`` (float64: ~1e-15
        relative). Differentiable in ``values`` and ``totals``.

    Raises:
        ValueError: Bad shapes, infinite totals, or negative totals without ``allow_signed``.
    """
    hb, wb = _check_block(values.shape, block)
    expected = torch.Size((*values.shape[:-2], hb, wb))
    if totals.shape != expected:
        raise ValueError(f"totals must have shape {tuple(expected)} for values {tuple(values.shape)} "
                         f"and block={block}, got {tuple(totals.shape)}")
    out_dtype = torch.float64 if out_dtype is None else out_dtype
    f64 = torch.float64
    v = to_blocks(values, block, dtype=f64)
    s = totals.to(f64).reshape(-1)
    if v.shape[0] == 0:
        return values.to(out_dtype)

    nan_s = torch.isnan(s)
    neg_s = s < 0
    # A NaN/inf value makes its row sum non-finite (an overflowing sum only costs the slow path).
    if totals_counts is None:
        n_inf, n_neg, n_nan, all_finite = torch.stack(
            [torch.isinf(s).sum(), neg_s.sum(), nan_s.sum(), torch.isfinite(v.detach().sum(dim=-1)).all().to(torch.long)]
        ).tolist()
    else:  # no device-to-host sync: the values are sanitised unconditionally (a no-op when finite)
        (n_inf, n_neg, n_nan), all_finite = totals_counts, False
    if n_inf:
        raise ValueError(f"{n_inf} block total(s) are infinite; use NaN for nodata")
    if n_neg and not allow_signed:
        raise ValueError(f"{n_neg} block total(s) are negative; pass allow_signed=True to allow net sinks")

    zero = torch.zeros_like(s)
    s_safe = torch.where(nan_s, zero, s) if n_nan else s
    s_proj = torch.where(neg_s, zero, s_safe) if n_neg else s_safe
    if not all_finite:
        v = _sanitize(v, s_safe)

    x = project_blocks(v, s_proj)
    if n_neg:
        n = v.shape[-1]
        shifted = v + (s_safe - v.sum(dim=-1)).unsqueeze(-1) / n
        x = torch.where(neg_s.unsqueeze(-1), shifted, x)

    # Children are all >= 0 in ordinary blocks, so the cast to float32 changes each block sum by
    # at most 2**-24 * S (< 6e-8 relative): no correction needed, and the cast is fused into
    # the final copy. Signed blocks may have sum |x| >> |S|, so there
    if out_dtype != f64 and n_neg:
        x = x.to(out_dtype)
        with torch.no_grad():
            # the largest child of each block absorbs the cast's rounding residual. Written in
            # place through a detached alias: the cast's backward saves nothing, so the gradient
            # stays the identity.
            xd = x.detach()
            resid = s_safe - xd.sum(dim=-1, dtype=f64)
            idx = xd.argmax(dim=-1, keepdim=True)
            top = xd.gather(-1, idx).to(f64) + resid.unsqueeze(-1)
            top = torch.where(neg_s.unsqueeze(-1), top, top.clamp(min=0))
            xd.scatter_(-1, idx, top.to(out_dtype))

    if n_nan:
        x = torch.where(nan_s.unsqueeze(-1), torch.full_like(x, float("nan")), x)
    return from_blocks(x, values.shape, block, dtype=out_dtype)


class PhysicsHead(nn.Module):
    """Water-filling head: makes raw child values conserve their block totals.

    Args:
        enabled: If False the head is the identity (raw output, for ablations).
        allow_signed: Passed to :func:`water_fill`.
        out_dtype: Passed to :func:`water_fill` (None = float64).
    """

    def __init__(self, enabled: bool = True, *, allow_signed: bool = False, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.enabled = enabled
        self.allow_signed = allow_signed
        self.out_dtype = out_dtype

    def forward(self, values: Tensor, totals: Tensor, block: int) -> Tensor:
        """Project ``values [B, 1, T, H, W]`` (linear domain) onto ``totals [B, 1, T, H/block, W/block]``."""
        if not self.enabled:
            return values
        return water_fill(values, totals, block, allow_signed=self.allow_signed, out_dtype=self.out_dtype)

    def extra_repr(self) -> str:  # noqa: D102
        return f"enabled={self.enabled}, allow_signed={self.allow_signed}, out_dtype={self.out_dtype}"
