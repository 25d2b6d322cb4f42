"""The layer mix corrected per pixel by a small network, fitted to parent totals (disaggregation
regression).

The additive layer mix of :mod:`models.dasymetric` cannot say "roads *inside* the city emit
more" or "no emissions over forest, whatever the road": those are products of layers. This
module multiplies the fitted mix by a learned per-pixel factor::

    m(x) = exp(log_scale) * mix(x) * exp(h(z(x)))            (t CO2 / child cell / yr)

- ``mix``: the fitted :class:`models.dasymetric.DasymetricPrior` (kept fixed by the fit);
- ``z(x)``: for every aux channel, ``log1p(u / ref)`` of its raw value ``u`` at the pixel and
  averaged over its 3 x 3 neighbourhood, standardised;
- ``h``: an MLP whose last layer starts at 0, so ``m`` starts as the mix; with ``members`` > 1 it
  is the mean of that many MLPs fitted independently from different initial weights (an
  ensemble, stored as one MLP ``members * hidden`` wide whose middle layer is block-diagonal).

``h`` is fitted on the training parent cells only (:func:`fit_mass_prior`): the block sums of
``m`` should match the parent totals (least absolute error of ``log``), the "disaggregation
regression" of epidemiology (aggregate-level likelihood, pixel-level model; unlike popRF it never
regresses on block *means*). Without the mix as anchor, the same fit placed mass inside the
blocks very differently from run to run for the same block error (measured: 100 m error 8.5 to
16 on one region); anchored, the network only corrects the mix where the totals ask for it.
Children are ``S * m / sum_block(m)`` (the network's softmax allocation), non-negative and
exact. ``forward`` returns ``log m`` up to a constant, so this is a drop-in prior of
:class:`models.network.DSTCarbonFormer` (``prior_kind="mass"``).

Why an ensemble: one MLP's fit depends on its initial weights. On a street region (traffic,
48 km, seed 3) three weight seeds gave corrections that validated 0.838 / 0.850 / 0.866 x the
mix at 1 km and 100 m errors 2.60 / 2.75 (kept) and 4.86 (dropped by the gate of
:mod:`carbonsr_cli.train.validation`). The mean of several fits should vary less from seed to
seed; measured in session 9 (4 members) it helped a little on average and removed one failed
fit, at 4 x the fit's time, so every preset still uses one member (``ModelConfig.mass_members``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.dasymetric import DEFAULT_EXPONENTS, DEFAULT_SMOOTH, DasymetricPrior, neighbourhood_mean

__all__ = ["CORRECTION_LIMIT", "MASS_FIT_STEPS", "MassPrior", "block_samples", "fit_mass_prior"]

#: Largest magnitude of the log factor ``h`` (natural log; ``h`` is clamped). ``exp(30)`` is no
#: practical limit. Tried in session 9: ``3 * tanh(h / 3)`` (a factor of at most 20 on the mix)
#: gave the same geometric mean over 54 generated regions (0.681 against 0.682, short schedule)
#: with larger moves both ways (traffic 4: 0.861 -> 0.763, urban 4: 1.030 -> 1.115, traffic 15:
#: 0.419 -> 0.549); not kept.
CORRECTION_LIMIT = 30.0
#: Full-batch Adam steps of the correction's fit. 300 until session 11, which measured 600 on the
#: 48 km street regions (seeds 1-16, short schedule, 2-core CPU): model / best baseline 0.649 ->
#: 0.603 (better on 6, worse on none, the other 8 drop the correction either way; 1,000 steps:
#: 0.599), points and urban 0.723 -> 0.723 (30 of 32 unchanged, urban 4 1.016 -> 0.976, points 16
#: 0.685 -> 0.698); benchmarks/README.md.
MASS_FIT_STEPS = 600


class MassPrior(nn.Module):
    """Log of the mix times a learned per-pixel factor (see the module docstring).

    Args:
        channels: Aux channels ``C``.
        hidden: Width of the two hidden layers of one member MLP.
        smooth: Neighbourhood edges (odd, child cells) each channel is averaged over for ``z``.
        exponents: Powers of the mix's basis.
        mix_smooth: Neighbourhood edges of the mix's basis.
        members: MLPs averaged in ``h`` (the stored MLP is ``members * hidden`` wide).

    Shapes:
        ``[B, C, T, H, W]`` (normalised aux) -> ``[B, 1, T, H, W]`` log-weights (float32).
    """

    def __init__(self, channels: int, hidden: int = 16, smooth: Sequence[int] = (1, 3),
                 exponents: Sequence[float] = DEFAULT_EXPONENTS, mix_smooth: Sequence[int] = DEFAULT_SMOOTH,
                 members: int = 1) -> None:
        super().__init__()
        if members < 1 or hidden < 1:
            raise ValueError(f"members and hidden must be >= 1, got {members} and {hidden}")
        self.channels = int(channels)
        self.hidden = int(hidden)
        self.members = int(members)
        self.smooth = tuple(int(k) for k in smooth)
        if any(k < 1 or k % 2 == 0 for k in self.smooth):
            raise ValueError(f"smooth sizes must be odd and >= 1, got {self.smooth}")
        self.mix = DasymetricPrior(self.channels, exponents, mix_smooth)
        k = self.channels * len(self.smooth)
        self.register_buffer("feat_mean", torch.zeros(k))
        self.register_buffer("feat_std", torch.ones(k))
        width = self.members * self.hidden
        self.mlp = nn.Sequential(nn.Linear(k, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.log_scale = nn.Parameter(torch.zeros(()))
        # The correction is fitted to the parent totals (fit_mass_prior, on its own copies of the
        # weights) and frozen here: trained further by the network's patch loss it got worse on
        # validation every time (traffic region, 48 km: val score 0.91 at the start, 2.4-2.7
        # after 1-6 epochs).
        for p in [*self.mlp.parameters(), self.log_scale]:
            p.requires_grad_(False)

    @property
    def features_size(self) -> int:
        """Number of input features of the MLP (``C * len(smooth)``)."""
        return self.channels * len(self.smooth)

    def raw_features(self, x: Tensor) -> Tensor:
        """Unstandardised features ``[B, C * S, T, H, W]``: ``log1p(u / ref)`` per smoothing."""
        b = self.mix.basis
        v = torch.log1p(b.raw(x) / b.ref.view(1, self.channels, 1, 1, 1))
        return torch.cat([neighbourhood_mean(v, k) for k in self.smooth], dim=1)

    def correction(self, feats: Tensor) -> Tensor:
        """``h``: ``feats [..., K]`` (unstandardised) -> ``[...]`` (log factor, clamped to +-:data:`CORRECTION_LIMIT`)."""
        return self.mlp((feats - self.feat_mean) / self.feat_std).squeeze(-1).clamp(-CORRECTION_LIMIT, CORRECTION_LIMIT)

    def reset_correction(self) -> None:
        """Set ``h`` to 0 (the module becomes its mix)."""
        self.scale_correction(0.0)

    def scale_correction(self, factor: float) -> None:
        """Multiply ``h`` by ``factor`` (in place: the last layer's weights and bias; 0 = the mix)."""
        with torch.no_grad():
            self.mlp[-1].weight.mul_(float(factor))
            self.mlp[-1].bias.mul_(float(factor))

    def forward(self, x: Tensor) -> Tensor:
        """Log-weights ``[B, 1, T, H, W]`` (float32): ``log mix + h``."""
        x = x.float()
        h = self.correction(self.raw_features(x).movedim(1, -1)).unsqueeze(1)
        return self.mix(x) + h


def trend_terms(coords: Tensor, degree: int) -> Tensor:
    """Monomials ``y^i x^j`` with ``1 <= i + j <= degree`` of block coordinates ``[N, 2]`` (each
    scaled to ``[-1, 1]`` over the region) -> ``[N, P]`` (``P = 0`` for degree 0)."""
    y, x = coords[:, 0:1].double(), coords[:, 1:2].double()
    cols = [y**i * x ** (d - i) for d in range(1, degree + 1) for i in range(d, -1, -1)]
    return torch.cat(cols, dim=1) if cols else coords.new_zeros((coords.shape[0], 0), dtype=torch.float64)


def fit_mass_prior(prior: MassPrior, feats: Tensor, mix_log: Tensor, totals: Tensor, *, steps: int = MASS_FIT_STEPS,
                   lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0, coords: Tensor | None = None,
                   trend: int = 0) -> float:
    """Fit ``h`` (and the scale) so that the block sums of ``m`` match parent totals (in place).

    Each of the ``prior.members`` MLPs is fitted on its own (its own initial weights and scale,
    the same data and loss), all in one batched pass; ``h`` is then their mean.

    Args:
        prior: The module to fit (its mix already fitted; the mix is not changed).
        feats: Unstandardised features ``[N, P, K]`` of ``N`` training parent cells with ``P``
            child cells each (:meth:`MassPrior.raw_features`).
        mix_log: The mix's log-weights ``[N, P]`` of the same cells.
        totals: Parent totals ``[N]`` (> 0, t CO2 / parent cell / yr).
        steps: Full-batch Adam steps.
        lr: Learning rate.
        weight_decay: L2 penalty on the MLPs (coupled, pulls ``h`` towards 0).
        seed: Seed of the MLPs' initial weights (member by member, in order).
        coords: Block coordinates ``[N, 2]`` (row, column of the parent cell, any units), for ``trend``.
        trend: Degree of a smooth polynomial of the block coordinates added to ``log S`` during the
            fit only (0: none). It takes up smooth differences between regions of the raster (a
            climate gradient of heating, a regional fuel mix: "regional effects" of a disaggregation
            regression) that would otherwise be put on whatever aux layer happens to follow them,
            moving mass inside the blocks; nearly constant inside a block, it would not change the
            shares, so it is fitted and then dropped (not stored in ``prior``).

    Returns:
        The fitted module's loss: mean ``|log(S + eps) - log(T + eps)|`` with ``eps`` = 1 % of the
        median total (with the trend, when fitted).
    """
    feats = feats.float()
    mix_log = mix_log.double()
    t = totals.double()
    if feats.ndim != 3 or mix_log.shape != feats.shape[:2] or t.shape != feats.shape[:1]:
        raise ValueError(f"bad shapes: feats {tuple(feats.shape)}, mix_log {tuple(mix_log.shape)}, totals {tuple(t.shape)}")
    n, p, k = feats.shape
    if n == 0:
        return float("nan")
    m, hd = prior.members, prior.hidden
    with torch.no_grad():
        flat = feats.reshape(-1, k)
        prior.feat_mean.copy_(flat.mean(0))
        prior.feat_std.copy_(flat.std(0).clamp(min=1e-6) if flat.shape[0] > 1 else torch.ones(k))
        # per block, mix_log is shifted so that its largest weight is 1 (exp stays finite)
        shift = mix_log.max(dim=1, keepdim=True).values
        base = (mix_log - shift).float()
        shift = shift.squeeze(1)
        med = float(t.median())
        log_s0 = torch.log(t.clamp(min=1e-30)) - shift - torch.logsumexp(base.double(), 1)
    members = _Members(k, hd, m, float(log_s0.median()), torch.Generator().manual_seed(int(seed)))
    z = ((feats - prior.feat_mean) / prior.feat_std).reshape(n * p, k)
    eps = 0.01 * max(med, 1e-30)
    log_t = torch.log(t + eps).float()
    log_eps = torch.tensor(math.log(eps), dtype=torch.float32)
    shift = shift.float()
    groups: list[dict[str, Any]] = [{"params": members.mlp_parameters(), "weight_decay": weight_decay},
                                    {"params": [members.log_scale], "weight_decay": 0.0}]
    g_terms = None
    if trend > 0:
        if coords is None or coords.shape != (n, 2):
            raise ValueError(f"trend needs block coordinates [N, 2], got {None if coords is None else tuple(coords.shape)}")
        c = coords.double()
        lo, hi = c.min(0).values, c.max(0).values
        g_terms = trend_terms(2 * (c - lo) / (hi - lo).clamp(min=1e-9) - 1, trend).float()  # [N, P]
        g_coef = nn.Parameter(torch.zeros(m, g_terms.shape[1]))
        groups.append({"params": [g_coef], "weight_decay": 0.0})
    opt = torch.optim.Adam(groups, lr=lr)
    for _ in range(max(0, steps)):
        h = members(z).reshape(m, n, p)
        log_s = members.log_scale[:, None] + shift + torch.logsumexp(base + h, 2)  # [M, N]
        if g_terms is not None:
            log_s = log_s + g_coef @ g_terms.t()
        loss = (torch.logaddexp(log_s, log_eps) - log_t).abs().mean(1).sum()  # each member's own loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    members.store(prior)
    with torch.no_grad():
        log_s = prior.log_scale + shift + torch.logsumexp(base + prior.correction(feats), 1)
        if g_terms is not None:
            log_s = log_s + (g_coef.mean(0) @ g_terms.t())
        return float((torch.logaddexp(log_s, log_eps) - log_t).abs().mean())


class _Members(nn.Module):
    """``M`` member MLPs ``K -> H -> H -> 1`` (GELU) evaluated in one batched pass, for the fit.

    Initial weights as ``nn.Linear``'s (uniform in ``+-1/sqrt(fan_in)``), drawn member by member
    from ``gen``; the last layer starts at 0. :meth:`store` writes their mean into a
    :class:`MassPrior`.
    """

    def __init__(self, k: int, hidden: int, m: int, log_scale: float, gen: torch.Generator) -> None:
        super().__init__()

        def uniform(shape: tuple[int, ...], fan_in: int) -> Tensor:
            bound = 1.0 / math.sqrt(fan_in)
            return torch.rand(shape, generator=gen) * 2 * bound - bound

        w1, b1, w2, b2 = [], [], [], []
        for _ in range(m):  # the draw order of one nn.Sequential: layer by layer, weight then bias
            w1.append(uniform((hidden, k), k))
            b1.append(uniform((hidden,), k))
            w2.append(uniform((hidden, hidden), hidden))
            b2.append(uniform((hidden,), hidden))
        self.w1 = nn.Parameter(torch.cat(w1).t().contiguous())  # [K, M * H]
        self.b1 = nn.Parameter(torch.cat(b1))  # [M * H]
        self.w2 = nn.Parameter(torch.stack(w2).transpose(1, 2).contiguous())  # [M, H, H] (in, out)
        self.b2 = nn.Parameter(torch.stack(b2)[:, None, :])  # [M, 1, H]
        self.w3 = nn.Parameter(torch.zeros(m, hidden, 1))
        self.b3 = nn.Parameter(torch.zeros(m, 1, 1))
        self.log_scale = nn.Parameter(torch.full((m,), log_scale))
        self.m, self.hidden = m, hidden

    def mlp_parameters(self) -> list[nn.Parameter]:
        return [self.w1, self.b1, self.w2, self.b2, self.w3, self.b3]

    def forward(self, z: Tensor) -> Tensor:
        """Standardised features ``[R, K]`` -> each member's ``h`` ``[M, R]`` (clamped like :meth:`MassPrior.correction`)."""
        r = z.shape[0]
        h1 = nn.functional.gelu(z @ self.w1 + self.b1).reshape(r, self.m, self.hidden).transpose(0, 1)  # [M, R, H]
        h2 = nn.functional.gelu(torch.baddbmm(self.b2, h1, self.w2))
        return torch.baddbmm(self.b3, h2, self.w3).squeeze(-1).clamp(-CORRECTION_LIMIT, CORRECTION_LIMIT)

    @torch.no_grad()
    def store(self, prior: MassPrior) -> None:
        """Write the members' mean into ``prior``'s MLP (block-diagonal middle layer) and scale."""
        if (prior.members, prior.hidden) != (self.m, self.hidden):
            raise ValueError(f"the prior has {prior.members} members of {prior.hidden}, the fit {self.m} of {self.hidden}")
        first, middle, last = prior.mlp[0], prior.mlp[2], prior.mlp[-1]
        first.weight.copy_(self.w1.t())
        first.bias.copy_(self.b1)
        middle.weight.copy_(torch.block_diag(*self.w2.transpose(1, 2)))
        middle.bias.copy_(self.b2.reshape(-1))
        last.weight.copy_(self.w3.reshape(1, -1) / self.m)
        last.bias.copy_(self.b3.mean().reshape(1))
        prior.log_scale.copy_(self.log_scale.mean())


def block_samples(feats: np.ndarray, factor: int) -> np.ndarray:
    """``[K, h * f, w * f]`` -> ``[h, w, f * f, K]`` (child cells of each parent cell, row-major)."""
    k, hc, wc = feats.shape
    h, w = hc // factor, wc // factor
    return feats.reshape(k, h, factor, w, factor).transpose(1, 3, 2, 4, 0).reshape(h, w, factor * factor, k)
