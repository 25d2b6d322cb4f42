"""Dual-layer weighted pixel loss (seed v3.0) for zero-dominated emission grids.

Emission grids are mostly zeros with a heavy-tailed nonzero minority. An unweighted loss is
minimised by predicting "almost zero everywhere"; this loss re-weights pixels on two layers:
a *macro* weight for the nonzero class as a whole (from the global zero/nonzero ratio of the
training set) and a *micro* weight within the nonzero class that grows with the value (so the
heavy tail, where most of the mass is, counts). Weights are normalised by their sum, so the
loss is a weighted mean and its scale does not depend on the weights' scale or the batch size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["DualLayerWeightedLoss"]


class DualLayerWeightedLoss(nn.Module):
    r"""Weighted Charbonnier loss in the log domain on parent-cell totals.

    With ``y = target_log = log1p(target)`` and ``p = pred_log`` (log1p of t CO2 / cell / yr),
    ``L = log(Nz / Nnz)`` (natural log, zero vs nonzero cells of the training set) and
    ``CV = cv_log`` (coefficient of variation of log1p over the nonzero cells)::

        w_macro    = max(1, 1 + L)                       (one value for the nonzero class)
        w_micro(y) = 1 + CV * y / y_ref                  (y_ref = mean_log, or the batch mean of
                                                          y over nonzero valid pixels if None)
        w(y)       = 1                     if y <= zero_log   (zero pixel)
                   = w_macro * w_micro(y)  otherwise
        rho(d)     = sqrt(d^2 + eps^2) - eps              (Charbonnier, d = p - y)
        loss       = sum(m * w * rho(p - y)) / sum(m * w)

    where ``m`` is the validity mask (given ``mask`` and finite target). Properties: zero pixels
    weigh 1; every nonzero pixel weighs at least ``w_macro >= 1``, more when nonzeros are rarer
    (larger ``L``) and more the larger ``y`` is, with a slope set by the spread of the tail
    (``CV``); the loss is unchanged when all weights are multiplied by a constant, and with
    ``mean_log=None`` the weights are unchanged when ``y`` is multiplied by a constant.

    Charbonnier (a smooth L1) rather than L2: in the log domain errors on the heavy tail are
    still large, and L1-like growth keeps them from dominating the gradient; unlike plain L1 it
    is differentiable at 0 (stable near convergence). The seed used the same penalty.

    Args:
        log_nz_over_nnz: ``L = log(Nz / Nnz)`` from ``carbonsr stats`` (``main.log_nz_over_nnz``).
        cv_log: ``CV`` of log1p over nonzero cells from ``carbonsr stats`` (``main.cv_log``), >= 0.
        mean_log: Mean of log1p over nonzero cells (``main.mean_log``); None = per batch.
        eps: Charbonnier smoothing (log units).
        zero_log: Targets with ``y <= zero_log`` count as zero pixels.
    """

    def __init__(
        self,
        log_nz_over_nnz: float,
        cv_log: float,
        *,
        mean_log: float | None = None,
        eps: float = 1e-3,
        zero_log: float = 0.0,
    ) -> None:
        super().__init__()
        for name, val in (("log_nz_over_nnz", log_nz_over_nnz), ("cv_log", cv_log)):
            if not math.isfinite(val):
                raise ValueError(f"{name} must be finite, got {val}")
        if cv_log < 0:
            raise ValueError(f"cv_log must be >= 0, got {cv_log}")
        if mean_log is not None and not (math.isfinite(mean_log) and mean_log > 0):
            raise ValueError(f"mean_log must be finite and > 0, got {mean_log}")
        self.log_nz_over_nnz = float(log_nz_over_nnz)
        self.cv_log = float(cv_log)
        self.mean_log = mean_log
        self.eps = float(eps)
        self.zero_log = float(zero_log)

    @property
    def w_macro(self) -> float:
        """Macro weight of the nonzero class: ``max(1, 1 + log(Nz / Nnz))``."""
        return max(1.0, 1.0 + self.log_nz_over_nnz)

    def weights(self, target_log: Tensor, valid: Tensor | None = None) -> Tensor:
        """Per-pixel weights ``w`` (no gradient), same shape as ``target_log``.

        Args:
            target_log: ``log1p`` of target totals, ``[B, 1, T, h, w]``.
            valid: Optional bool mask of valid pixels (for the per-batch ``y_ref``).
        """
        y = target_log.detach()
        finite = torch.isfinite(y)
        valid = finite if valid is None else (valid & finite)
        nonzero = (y > self.zero_log) & finite
        y0 = torch.where(finite, y, torch.zeros_like(y))
        if self.mean_log is not None:
            y_ref = torch.as_tensor(self.mean_log, dtype=y.dtype, device=y.device)
        else:
            sel = nonzero & valid
            cnt = sel.sum()
            y_ref = torch.where(sel, y0, torch.zeros_like(y0)).sum() / cnt.clamp(min=1)
            y_ref = torch.where(y_ref > 0, y_ref, torch.ones_like(y_ref))
        w_nz = self.w_macro * (1.0 + self.cv_log * y0 / y_ref)
        return torch.where(nonzero, w_nz, torch.ones_like(y0))

    def forward(self, pred_log: Tensor, target_log: Tensor, mask: Tensor | None = None) -> Tensor:
        """Weighted mean Charbonnier error (scalar).

        Args:
            pred_log: ``log1p`` of predicted parent totals ``[B, 1, T, h, w]``.
            target_log: ``log1p`` of true parent totals, same shape; NaN = nodata (ignored).
            mask: Optional bool tensor broadcastable to the target, True = valid pixel.

        Returns:
            Scalar loss; 0 (with a gradient path) when no pixel is valid.
        """
        if pred_log.shape != target_log.shape:
            raise ValueError(f"pred_log {tuple(pred_log.shape)} and target_log {tuple(target_log.shape)} differ")
        valid = torch.isfinite(target_log)
        if mask is not None:
            valid = valid & mask.to(torch.bool).expand_as(target_log)
        w = self.weights(target_log, valid)
        w = torch.where(valid, w, torch.zeros_like(w))
        y = torch.where(valid, target_log, torch.zeros_like(target_log))
        p = torch.where(valid, pred_log, torch.zeros_like(pred_log))
        d = p - y
        dt = torch.promote_types(d.dtype, w.dtype)
        d, w = d.to(dt), w.to(dt)
        rho = torch.sqrt(d * d + self.eps * self.eps) - self.eps
        wsum = w.sum()
        return (w * rho).sum() / wsum.clamp(min=torch.finfo(w.dtype).tiny)

    def extra_repr(self) -> str:  # noqa: D102
        return f"log_nz_over_nnz={self.log_nz_over_nnz:.4g}, cv_log={self.cv_log:.4g}, mean_log={self.mean_log}"
