"""Evaluation metrics (linear domain, t CO2 / cell / yr) and the conservation report.

All functions take numpy arrays or torch tensors of equal shape, compute in float64 and ignore
cells where the truth or the prediction is not finite or ``mask`` is False. Definitions (over
the valid cells; "nonzero" means truth > 0):

- MAE = mean |pred - truth|; Nonzero-MAE = MAE over nonzero-truth cells (the primary metric);
- Balanced MAE = 0.5 * MAE(zero-truth cells) + 0.5 * MAE(nonzero-truth cells) (a missing half
  is left out: the other half then has weight 1);
- Top-k% Nonzero-MAE (``q = 1 - k/100``) = MAE over cells whose truth >= the ``q`` quantile
  (linear interpolation, numpy's default) of the nonzero truth of the evaluated set;
- RMSE; R2 = 1 - SSE / SST (SST about the truth mean); Pearson r; relative bias =
  (sum pred - sum truth) / sum truth.

:class:`MetricAccumulator` gives the same numbers over tiles streamed one by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "MetricAccumulator",
    "balanced_mae",
    "compute_metrics",
    "mae",
    "nonzero_mae",
    "pearson",
    "r2",
    "relative_bias",
    "rmse",
    "topk_nonzero_mae",
]

ArrayLike = Any  # numpy array or torch tensor


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of products in float64 without BLAS (BLAS threads are slow on small, busy machines)."""
    return float(np.multiply(a, b).sum())


def _np(x: ArrayLike) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _valid(pred: ArrayLike, truth: ArrayLike, mask: ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
    p, t = _np(pred), _np(truth)
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and truth {t.shape} differ in shape")
    ok = np.isfinite(p) & np.isfinite(t)
    if mask is not None:
        m = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
        ok &= np.broadcast_to(m.astype(bool), ok.shape)
    return p[ok], t[ok]


def _mean_abs(p: np.ndarray, t: np.ndarray) -> float:
    return float(np.abs(p - t).mean()) if p.size else math.nan


def mae(pred: ArrayLike, truth: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Mean absolute error over valid cells (NaN if none)."""
    p, t = _valid(pred, truth, mask)
    return _mean_abs(p, t)


def nonzero_mae(pred: ArrayLike, truth: ArrayLike, mask: ArrayLike | None = None) -> float:
    """MAE over cells whose truth is > 0 (NaN if none): the early-stopping metric."""
    p, t = _valid(pred, truth, mask)
    nz = t > 0
    return _mean_abs(p[nz], t[nz])


def balanced_mae(pred: ArrayLike, truth: ArrayLike, mask: ArrayLike | None = None) -> float:
    """0.5 * MAE(truth == 0) + 0.5 * MAE(truth > 0); a missing half is left out."""
    p, t = _valid(pred, truth, mask)
    nz = t > 0
    return _balanced(_mean_abs(p[~nz], t[~nz]), _mean_abs(p[nz], t[nz]))


def _balanced(m_zero: float, m_nonzero: float) -> float:
    halves = [m for m in (m_zero, m_nonzero) if not math.isnan(m)]
    return float(sum(halves) / len(halves)) if halves else math.nan


def topk_nonzero_mae(pred: ArrayLike, truth: ArrayLike, q: float = 0.99, mask: ArrayLike | None = None) -> float:
    """MAE over cells with truth >= the ``q`` quantile of the nonzero truth (q=0.99: Top-1%)."""
    if not 0.0 <= q < 1.0:
        raise ValueError(f"q must be in [0, 1), got {q}")
    p, t = _valid(pred, truth, mask)
    nz = t > 0
    if not nz.any():
        return math.nan
    thr = float(np.quantile(t[nz], q))
    sel = t >= thr
    return _mean_abs(p[sel], t[sel])


def rmse(pred: ArrayLike, truth: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Root mean squared error over valid cells."""
    p, t = _valid(pred, truth, mask)
    return float(np.sqrt(np.mean((p - t) ** 2))) if p.size else math.nan


def r2(pred: ArrayLike, truth: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Coefficient of determination ``1 - SSE / SST`` (NaN when the truth is constant)."""
    p, t = _valid(pred, truth, mask)
    sst = float(np.sum((t - t.mean()) ** 2)) if t.size else 0.0
    return 1.0 - float(np.sum((p - t) ** 2)) / sst if sst > 0 else math.nan


def pearson(pred: ArrayLike, truth: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Pearson correlation of pred and truth (NaN when either is constant)."""
    p, t = _valid(pred, truth, mask)
    if p.size < 2:
        return math.nan
    dp, dt = p - p.mean(), t - t.mean()
    den = math.sqrt(float(np.sum(dp * dp)) * float(np.sum(dt * dt)))
    return float(np.sum(dp * dt)) / den if den > 0 else math.nan


def relative_bias(pred: ArrayLike, truth: ArrayLike, mask: ArrayLike | None = None) -> float:
    """``(sum pred - sum truth) / sum truth`` (NaN when the truth sums to 0)."""
    p, t = _valid(pred, truth, mask)
    st = float(t.sum())
    return (float(p.sum()) - st) / st if st != 0 else math.nan


def compute_metrics(pred: ArrayLike, truth: ArrayLike, mask: ArrayLike | None = None) -> dict[str, float]:
    """All metrics in one pass over the whole array (keys as :meth:`MetricAccumulator.result`)."""
    acc = MetricAccumulator()
    acc.update(pred, truth, mask)
    return acc.result()


# --------------------------------------------------------------------------------------------
# Streaming


@dataclass
class _Moments:
    """Count, means and centred (co)moments, merged exactly-in-spirit (Chan et al. 1979)."""

    n: int = 0
    mean_p: float = 0.0
    mean_t: float = 0.0
    m2_p: float = 0.0
    m2_t: float = 0.0
    c_pt: float = 0.0

    def add(self, p: np.ndarray, t: np.ndarray) -> None:
        nb = int(p.size)
        if nb == 0:
            return
        mp, mt = float(p.mean()), float(t.mean())
        dp, dt = p - mp, t - mt
        m2p, m2t, cpt = float(_dot(dp, dp)), float(_dot(dt, dt)), float(_dot(dp, dt))
        n = self.n + nb
        delta_p, delta_t = mp - self.mean_p, mt - self.mean_t
        f = self.n * nb / n
        self.m2_p += m2p + delta_p * delta_p * f
        self.m2_t += m2t + delta_t * delta_t * f
        self.c_pt += cpt + delta_p * delta_t * f
        self.mean_p += delta_p * nb / n
        self.mean_t += delta_t * nb / n
        self.n = n


@dataclass
class MetricAccumulator:
    """Accumulate metrics over tiles; :meth:`result` equals :func:`compute_metrics` on the union.

    Sums (MAE halves, SSE, totals) are accumulated in float64, so they match the one-pass values
    to float rounding; R2 and Pearson r use merged centred moments. The Top-k thresholds need the
    quantiles of the nonzero truth of the whole evaluated set:

    - ``keep_for_quantiles=True`` (default) stores ``(truth, |pred - truth|)`` of nonzero-truth
      cells as float32 (8 bytes per nonzero cell; nonzero cells are a minority of emission
      grids, so this is small even at country scale). Result within float32 rounding (~1e-7).
    - ``keep_for_quantiles=False`` keeps a fixed log-spaced histogram of nonzero truth
      (``bins`` bins over ``10**log10_range``) with per-bin error sums; the threshold bin is
      included in proportion, so Top-k values are approximate (bin width ~1.4 % of the value).

    Args:
        keep_for_quantiles: Store nonzero cells (exact) or use a histogram (bounded memory).
        bins: Histogram bins (histogram mode).
        log10_range: log10 of the smallest and largest truth value binned (histogram mode).
    """

    keep_for_quantiles: bool = True
    bins: int = 4096
    log10_range: tuple[float, float] = (-12.0, 12.0)
    n_zero: int = 0
    n_nonzero: int = 0
    abs_zero: float = 0.0
    abs_nonzero: float = 0.0
    sse: float = 0.0
    sum_pred: float = 0.0
    sum_truth: float = 0.0
    _mom: _Moments = field(default_factory=_Moments)
    _kept_t: list[np.ndarray] = field(default_factory=list)
    _kept_e: list[np.ndarray] = field(default_factory=list)
    _hist_n: np.ndarray | None = None
    _hist_e: np.ndarray | None = None

    def update(self, pred: ArrayLike, truth: ArrayLike, mask: ArrayLike | None = None) -> None:
        """Add one tile (any shape; pred and truth equal shapes; mask True = valid)."""
        p, t = _valid(pred, truth, mask)
        err = np.abs(p - t)
        nz = t > 0
        self.n_zero += int((~nz).sum())
        self.n_nonzero += int(nz.sum())
        self.abs_zero += float(err[~nz].sum())
        self.abs_nonzero += float(err[nz].sum())
        self.sse += float(_dot(p - t, p - t))
        self.sum_pred += float(p.sum())
        self.sum_truth += float(t.sum())
        self._mom.add(p, t)
        if self.keep_for_quantiles:
            self._kept_t.append(t[nz].astype(np.float32))
            self._kept_e.append(err[nz].astype(np.float32))
        else:
            if self._hist_n is None:
                self._hist_n = np.zeros(self.bins, dtype=np.int64)
                self._hist_e = np.zeros(self.bins, dtype=np.float64)
            idx = self._bin(t[nz])
            self._hist_n += np.bincount(idx, minlength=self.bins)
            self._hist_e += np.bincount(idx, weights=err[nz], minlength=self.bins)

    def _bin(self, t: np.ndarray) -> np.ndarray:
        lo, hi = self.log10_range
        pos = (np.log10(t) - lo) / (hi - lo) * self.bins
        return np.clip(pos, 0, self.bins - 1).astype(np.int64)

    def _topk(self, q: float) -> float:
        if self.n_nonzero == 0:
            return math.nan
        if self.keep_for_quantiles:
            t = np.concatenate(self._kept_t)
            e = np.concatenate(self._kept_e)
            thr = np.quantile(t.astype(np.float64), q)
            sel = t >= thr
            return float(e[sel].astype(np.float64).mean())
        hn, he = self._hist_n, self._hist_e
        # Cells above the threshold: (1 - q) of the nonzero cells, counted from the top bin.
        want = (1.0 - q) * self.n_nonzero
        cum = np.cumsum(hn[::-1])
        k = int(np.searchsorted(cum, want))  # bins fully above + the threshold bin
        k = min(k, self.bins - 1)
        above_n = cum[k - 1] if k > 0 else 0
        above_e = he[::-1][:k].sum()
        b = self.bins - 1 - k
        frac = (want - above_n) / hn[b] if hn[b] else 0.0
        n = above_n + frac * hn[b]
        return float((above_e + frac * he[b]) / n) if n > 0 else math.nan

    def result(self) -> dict[str, float]:
        """Metrics so far: ``mae, nonzero_mae, zero_mae, balanced_mae, top1_nonzero_mae,
        top5_nonzero_mae, rmse, r2, pearson, relative_bias, sum_pred, sum_truth, n, n_zero,
        n_nonzero``."""
        n = self.n_zero + self.n_nonzero
        zero_mae = self.abs_zero / self.n_zero if self.n_zero else math.nan
        nz_mae = self.abs_nonzero / self.n_nonzero if self.n_nonzero else math.nan
        m = self._mom
        r2v = 1.0 - self.sse / m.m2_t if m.m2_t > 0 else math.nan
        den = math.sqrt(m.m2_p * m.m2_t)
        return {
            "mae": (self.abs_zero + self.abs_nonzero) / n if n else math.nan,
            "nonzero_mae": nz_mae,
            "zero_mae": zero_mae,
            "balanced_mae": _balanced(zero_mae, nz_mae),
            "top1_nonzero_mae": self._topk(0.99),
            "top5_nonzero_mae": self._topk(0.95),
            "rmse": math.sqrt(self.sse / n) if n else math.nan,
            "r2": r2v,
            "pearson": m.c_pt / den if den > 0 and m.n >= 2 else math.nan,
            "relative_bias": (self.sum_pred - self.sum_truth) / self.sum_truth if self.sum_truth != 0 else math.nan,
            "sum_pred": self.sum_pred,
            "sum_truth": self.sum_truth,
            "n": float(n),
            "n_zero": float(self.n_zero),
            "n_nonzero": float(self.n_nonzero),
        }
