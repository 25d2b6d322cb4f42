"""Dasymetric structure: per-pixel weights from the aux layers, shared by the fitted baseline and
the network's prior.

A child cell's emission is modelled as an additive mix of sectors, each proportional to a power
of one aux layer in its raw units (road length, persons, radiance, t CO2 of a listed plant)::

    w(x) = floor + sum_k sum_j coef[k, j] * (u_k(x) / ref_k) ** p_j          (coef >= 0)

where ``u_k`` is the raw value of aux channel ``k`` recovered from its normalised value (see
:class:`PriorBasis`). Because the mix is linear in ``coef``, the block sum of ``w`` is the same
mix of block sums of the basis, so ``coef`` can be fitted by non-negative least squares on the
parent cells alone (:func:`fit_prior`), which is WorldPop's popRF idea with a model that is exact
under aggregation: a point layer keeps its weight in the one child cell that holds the point.

Children are then ``S * w / sum_block(w)`` (:func:`softmax_children` in the log domain), which
is non-negative and sums to every block total ``S`` exactly (float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from models.physics import from_blocks, to_blocks, water_fill

__all__ = [
    "DEFAULT_EXPONENTS",
    "DEFAULT_SMOOTH",
    "DasymetricPrior",
    "PriorBasis",
    "children_from_raw",
    "fit_prior",
    "share_loss",
    "log_children",
    "nnls",
    "softmax_children",
]

#: Powers ``p_j`` of each layer's basis functions.
DEFAULT_EXPONENTS: tuple[float, ...] = (0.5, 1.0, 2.0)
#: Neighbourhoods (odd edges, child cells) each layer is averaged over before the powers: the
#: pixel itself and its 3 x 3 neighbourhood (line sources such as roads emit around the line).
DEFAULT_SMOOTH: tuple[int, ...] = (1, 3)
#: Coefficient value standing for "off" in the log parametrisation (exp(-30) ~ 1e-13).
_LOG_ZERO = -30.0


def neighbourhood_mean(v: Tensor, k: int) -> Tensor:
    """Mean over each ``k x k`` neighbourhood (odd ``k``; cells outside the raster not counted) of
    ``[B, C, T, H, W]``; ``k = 1`` returns ``v``."""
    if k == 1:
        return v
    return torch.nn.functional.avg_pool3d(v, (1, k, k), stride=1, padding=(0, k // 2, k // 2), count_include_pad=False)


class PriorBasis(nn.Module):
    """Raw-unit basis functions of every aux channel, from its normalised value.

    The normaliser of :mod:`carbonsr_cli.stats` maps a raw value ``v`` to
    ``x = (clip(f(v)) - mean) / std`` with ``f = log1p`` or the identity. This module inverts it:
    ``u = expm1(x * std + mean)`` (log1p channels) or ``u = x * std + mean - lo`` (identity
    channels, shifted so that the smallest value is 0), clamped at 0, then divided by ``ref``
    (a typical positive value, for conditioning) and raised to each power of ``exponents``.
    Each value is first averaged over a ``k x k`` neighbourhood for every ``k`` in ``smooth``
    (``1``: the pixel itself). Until :meth:`set_normalisation` is called, ``u = max(x, 0)``.

    Shapes:
        ``[B, C, T, H, W] -> [B, C * S * J, T, H, W]`` (float32), channel ``(k * S + i) * J + j``
        = layer ``k`` averaged over ``smooth[i]``, to power ``exponents[j]``.
    """

    def __init__(self, channels: int, exponents: Sequence[float] = DEFAULT_EXPONENTS,
                 smooth: Sequence[int] = DEFAULT_SMOOTH) -> None:
        super().__init__()
        self.channels = int(channels)
        self.exponents = tuple(float(p) for p in exponents)
        self.smooth = tuple(int(k) for k in smooth)
        if any(k < 1 or k % 2 == 0 for k in self.smooth):
            raise ValueError(f"smooth sizes must be odd and >= 1, got {self.smooth}")
        c = self.channels
        self.register_buffer("is_log", torch.zeros(c))
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("std", torch.ones(c))
        self.register_buffer("lo", torch.zeros(c))
        self.register_buffer("ref", torch.ones(c))

    @property
    def size(self) -> int:
        """Number of basis functions ``C * S * J``."""
        return self.channels * len(self.smooth) * len(self.exponents)

    def labels(self, names: Sequence[str]) -> list[str]:
        """A readable name per basis function (``roads:length (3x3)^1``)."""
        return [f"{n}{'' if k == 1 else f' ({k}x{k})'}^{p:g}" for n in names for k in self.smooth for p in self.exponents]

    def set_normalisation(self, is_log: Sequence[bool], mean: Sequence[float], std: Sequence[float],
                          lo: Sequence[float], ref: Sequence[float] | None = None) -> None:
        """Store the normaliser's constants (transformed units) and the conditioning scale ``ref``."""
        def vec(v: Sequence[float]) -> Tensor:
            t = torch.as_tensor([float(a) for a in v], dtype=torch.float32)
            if t.shape != (self.channels,):
                raise ValueError(f"expected {self.channels} values, got {tuple(t.shape)}")
            return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)

        self.is_log.copy_(vec([1.0 if b else 0.0 for b in is_log]))
        self.mean.copy_(vec(mean))
        self.std.copy_(vec(std))
        self.lo.copy_(vec([0.0 if not math.isfinite(float(v)) else float(v) for v in lo]))
        if ref is not None:
            r = vec(ref)
            self.ref.copy_(torch.where(r > 0, r, torch.ones_like(r)))

    def raw(self, x: Tensor) -> Tensor:
        """Raw (non-negative) values ``u`` ``[B, C, T, H, W]`` from normalised ``x`` (float32)."""
        shape = (1, self.channels, 1, 1, 1)
        x = x.float()
        z = x * self.std.view(shape) + self.mean.view(shape)
        logm = self.is_log.view(shape) > 0.5
        u = torch.where(logm, torch.expm1(z.clamp(max=60.0)), z - self.lo.view(shape))
        return u.clamp(min=0.0)

    def forward(self, x: Tensor) -> Tensor:
        """Basis ``[B, C * S * J, T, H, W]`` (float32)."""
        v = self.raw(x) / self.ref.view(1, self.channels, 1, 1, 1)
        b, c, t, h, w = v.shape
        parts = []
        for k in self.smooth:
            vk = neighbourhood_mean(v, k)
            parts.extend(vk if p == 1.0 else vk.pow(p) for p in self.exponents)
        n = len(self.smooth) * len(self.exponents)
        return torch.stack(parts, dim=2).reshape(b, c * n, t, h, w)


class DasymetricPrior(nn.Module):
    """Log-weights of the additive mix ``log(floor + sum coef * basis)`` (see the module docstring).

    Coefficients are stored as logs (so they stay positive under gradient descent); a coefficient
    the fit set to 0 is ``exp(-30)``. That is not nothing: where every fitted term of a cell is 0,
    these tiny terms still rank the cells before the floor spreads evenly (measured on the points
    region, 36 km, seed 1: 726 vs 906 t/cell Nonzero-MAE at 100 m when they were dropped). Only
    the basis functions marked in the ``active`` buffer (all, by default) are computed.
    Initialised uniform (floor 1, every coefficient ``exp(-30)``).

    Shapes:
        ``[B, C, T, H, W] (normalised aux) -> [B, 1, T, H, W]`` log-weights (float32).
    """

    def __init__(self, channels: int, exponents: Sequence[float] = DEFAULT_EXPONENTS,
                 smooth: Sequence[int] = DEFAULT_SMOOTH) -> None:
        super().__init__()
        self.basis = PriorBasis(channels, exponents, smooth)
        self.log_coef = nn.Parameter(torch.full((self.basis.size,), _LOG_ZERO))
        self.log_floor = nn.Parameter(torch.zeros(()))
        self.register_buffer("active", torch.ones(self.basis.size, dtype=torch.bool))

    def set_coefficients(self, coef: Sequence[float] | np.ndarray, floor: float) -> None:
        """Set the mix from linear coefficients (>= 0, one per basis function) and the floor (> 0)."""
        c = torch.as_tensor(np.asarray(coef, dtype=np.float64), dtype=torch.float64)
        if c.shape != self.log_coef.shape:
            raise ValueError(f"expected {self.log_coef.numel()} coefficients, got {tuple(c.shape)}")
        if not floor > 0:
            raise ValueError(f"floor must be > 0, got {floor}")
        with torch.no_grad():
            self.log_coef.copy_(torch.where(c > 0, c.clamp(min=1e-300).log(), torch.full_like(c, _LOG_ZERO)).clamp(min=_LOG_ZERO).float())
            self.log_floor.fill_(math.log(float(floor)))

    def _plan(self) -> list[tuple[int, list[int], list[tuple[int, list[int], list[int]]]]]:
        """``[(smooth index, channels, [(power index, positions in channels, flat basis indices)])]``
        of the active basis functions; computed on the host once (reset by :meth:`set_active` and
        by loading a state dict), so the forward pass makes no host-device synchronisation and
        can be captured in a CUDA graph; it also works on inference-mode copies of the module."""
        if getattr(self, "_plan_cache", None) is None:
            b = self.basis
            c, n_s, n_p = b.channels, len(b.smooth), len(b.exponents)
            act = self.active.detach().to("cpu").view(c, n_s, n_p).numpy()
            plan = []
            for i in range(n_s):
                chans = [ch for ch in range(c) if act[ch, i].any()]
                if not chans:
                    continue
                powers = []
                for j in range(n_p):
                    pos = [q for q, ch in enumerate(chans) if act[ch, i, j]]
                    if pos:
                        powers.append((j, pos, [(chans[q] * n_s + i) * n_p + j for q in pos]))
                plan.append((i, chans, powers))
            self._plan_cache = plan
        return self._plan_cache

    def set_active(self, mask: Tensor | np.ndarray) -> None:
        """Compute (and train) only the basis functions where ``mask`` is True."""
        with torch.no_grad():
            self.active.copy_(torch.as_tensor(np.asarray(mask, dtype=bool)))
        self._plan_cache = self._device_cache = None

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        self._plan_cache = self._device_cache = None  # ``active`` may change
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]

    def _device_plan(self, device: torch.device) -> list[tuple[int, Tensor, list[tuple[int, Tensor, Tensor]]]]:
        """:meth:`_plan` with index tensors on ``device`` (cached: no host-to-device copy, so no
        CPU tensor is touched while a CUDA graph is captured)."""
        cache = getattr(self, "_device_cache", None)
        if cache is None or cache[0] is not self._plan() or cache[1] != device:
            def idx(v: list[int]) -> Tensor:
                return torch.tensor(v, dtype=torch.long, device=device)

            plan = [(i, idx(chans), [(j, idx(pos), idx(flat)) for j, pos, flat in powers]) for i, chans, powers in self._plan()]
            self._device_cache = cache = (self._plan(), device, plan)
        return cache[2]

    def weights(self, x: Tensor) -> Tensor:
        """Linear weights ``[B, 1, T, H, W]`` (float32, > 0), from the active basis functions only."""
        b = self.basis
        c = b.channels
        coef = self.log_coef.float().exp()
        out = self.log_floor.float().exp().expand(x.shape[0], 1, *x.shape[2:])
        plan = self._device_plan(x.device)
        if not plan:
            return out.contiguous()
        v = b.raw(x) / b.ref.view(1, c, 1, 1, 1)
        for i, chans, powers in plan:
            k = b.smooth[i]
            vk = neighbourhood_mean(v.index_select(1, chans), k)
            for j, pos, flat in powers:
                p = b.exponents[j]
                t = vk.index_select(1, pos)
                t = t if p == 1.0 else t.pow(p)
                out = out + (t * coef.index_select(0, flat).view(1, -1, 1, 1, 1)).sum(dim=1, keepdim=True)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Log-weights ``[B, 1, T, H, W]`` (float32)."""
        return torch.log(self.weights(x))


def softmax_children(log_w: Tensor, totals: Tensor, block: int) -> Tensor:
    """Share every block total in proportion to ``exp(log_w)`` (float64, differentiable).

    Args:
        log_w: Child log-weights ``[..., H, W]`` (any offset per block cancels).
        totals: Block totals ``[..., H / block, W / block]``; NaN = nodata (children NaN).
        block: Block edge in child cells.

    Returns:
        ``[..., H, W]`` float64 children, >= 0, summing to each total within float64 rounding.
    """
    s = totals.to(torch.float64)
    lw = to_blocks(log_w.to(torch.float64), block)
    lw = torch.nan_to_num(lw, nan=-1e30, posinf=1e30, neginf=-1e30)
    share = torch.softmax(lw, dim=-1)
    flat = s.reshape(-1, 1)
    nodata = torch.isnan(flat)
    x = share * torch.where(nodata, torch.zeros_like(flat), flat)
    x = torch.where(nodata, torch.full_like(x, float("nan")), x)
    return from_blocks(x, log_w.shape, block)


def log_children(log_w: Tensor, main: Tensor, block: int) -> Tensor:
    """``log1p`` of the children of ``softmax_children`` with totals recovered from ``main``.

    ``main = log1p(S / block**2)`` broadcast over each block (the network's input), so
    ``S = expm1(main) * block**2`` (float32 rounding; the water-fill that follows restores
    exactness). Used at inference, where tiles are blended in the log1p-children domain.

    Shapes:
        ``log_w, main [B, 1, T, H, W] -> [B, 1, T, H, W]`` (float32).
    """
    s = torch.expm1(main[..., ::block, ::block].to(torch.float64)) * float(block * block)
    return torch.log1p(softmax_children(log_w, s, block)).to(torch.float32)


def children_from_raw(raw: Tensor, totals: Tensor, block: int, allocation: str = "water_fill",
                      use_physics: bool = True) -> Tensor:
    """Linear child totals (float64) from a network's raw output, by its allocation.

    ``water_fill``: ``raw`` is log1p of children; ``expm1(raw)`` is projected onto the totals
    (or clamped at 0 when ``use_physics`` is off, for ablations). ``dasymetric``: ``raw`` is
    log-weights; children are ``softmax_children`` (exact by construction).
    """
    if allocation == "dasymetric":
        return softmax_children(raw, totals, block)
    values = torch.expm1(raw.double())
    if use_physics:
        return water_fill(values, totals, block)
    return values.clamp(min=0)


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None, tol: float = 1e-10) -> np.ndarray:
    """Non-negative least squares ``argmin ||a x - b||, x >= 0`` (Lawson-Hanson active set).

    Args:
        a: ``[N, K]`` design matrix.
        b: ``[N]`` target.

    Returns:
        ``[K]`` float64 solution.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n, k = a.shape
    x = np.zeros(k)
    passive = np.zeros(k, dtype=bool)
    max_iter = max_iter or 3 * k + 10
    ata, atb = a.T @ a, a.T @ b
    scale = max(float(np.abs(atb).max()), 1e-300)

    def solve(mask: np.ndarray) -> np.ndarray:
        z = np.zeros(k)
        idx = np.flatnonzero(mask)
        if idx.size:
            sub = ata[np.ix_(idx, idx)]
            z[idx] = np.linalg.lstsq(sub + 1e-12 * np.trace(sub) / idx.size * np.eye(idx.size), atb[idx], rcond=None)[0]
        return z

    for _ in range(max_iter):
        grad = atb - ata @ x
        cand = ~passive & (grad > tol * scale)
        if not cand.any():
            break
        passive[np.argmax(np.where(cand, grad, -np.inf))] = True
        for _ in range(max_iter):
            z = solve(passive)
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / np.maximum(x[neg] - z[neg], 1e-300))
            x = x + alpha * (z - x)
            passive &= x > tol * max(float(x.max()), 1e-300)
            x[~passive] = 0.0
    return x


def share_blocks_of(basis: np.ndarray, n_children: np.ndarray, totals: np.ndarray, usable: np.ndarray,
                    scales: Sequence[int] = (2, 3)) -> list[tuple[np.ndarray, np.ndarray]]:
    """Groups of ``s x s`` parent cells for :func:`fit_prior`'s share refinement.

    Args:
        basis: ``[K, H, W]`` block sums of the basis per parent cell.
        n_children: ``[H, W]`` children per parent cell.
        totals: ``[H, W]`` parent totals (NaN = nodata).
        usable: bool ``[H, W]``: cells the fit may use (a group needs all its cells usable).
        scales: Group edges in parent cells.

    Returns:
        ``[(design [G, s*s, K + 1], totals [G, s*s])]`` per scale, groups with a positive sum only.
    """
    out = []
    a = np.concatenate([basis, n_children[None]], axis=0)
    for s in scales:
        h, w = (totals.shape[0] // s) * s, (totals.shape[1] // s) * s
        if h == 0 or w == 0:
            continue
        t = totals[:h, :w].reshape(h // s, s, w // s, s).transpose(0, 2, 1, 3).reshape(-1, s * s)
        ok = usable[:h, :w].reshape(h // s, s, w // s, s).transpose(0, 2, 1, 3).reshape(-1, s * s).all(axis=1)
        ab = a[:, :h, :w].reshape(a.shape[0], h // s, s, w // s, s).transpose(1, 3, 2, 4, 0).reshape(-1, s * s, a.shape[0])
        ok &= np.isfinite(t).all(axis=1) & np.isfinite(ab).all(axis=(1, 2))
        ok &= np.nan_to_num(t).sum(axis=1) > 0
        if ok.any():
            out.append((ab[ok].astype(np.float64), t[ok].astype(np.float64)))
    return out


def _refine_shares(blocks: list[tuple[np.ndarray, np.ndarray]], x0: np.ndarray, steps: int = 300) -> np.ndarray:
    """Refine the mix so that it shares group totals among parent cells with the least absolute error.

    This is the downscaling task one level up (a group of parent cells plays the parent, the
    parent cells play the children), scored like the product is scored (absolute error, so the
    cells that hold the mass count most).
    """
    mats = [(torch.from_numpy(a), torch.from_numpy(t)) for a, t in blocks]
    norm = sum(float(t.sum()) for _, t in mats)
    theta = torch.tensor(np.log(np.maximum(x0, 1e-300)), requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.05)
    best, best_x = math.inf, x0
    for _ in range(int(steps)):
        opt.zero_grad()
        coef = theta.exp()
        loss = torch.zeros((), dtype=torch.float64)
        for a, t in mats:
            w = a @ coef  # [G, s*s]
            pred = t.sum(dim=1, keepdim=True) * w / w.sum(dim=1, keepdim=True)
            loss = loss + (pred - t).abs().sum()
        loss = loss / norm
        if float(loss.detach()) < best:
            best, best_x = float(loss.detach()), coef.detach().numpy().copy()
        loss.backward()
        opt.step()
    return best_x


def fit_prior(basis_sums: np.ndarray, n_children: np.ndarray, totals: np.ndarray, *,
              max_rows: int = 200_000, seed: int = 0, steps: int = 400,
              share_blocks: list[tuple[np.ndarray, np.ndarray]] | None = None) -> tuple[np.ndarray, float]:
    """Fit the additive mix on parent cells (log-domain least squares, coefficients >= 0).

    Minimises ``mean_p (log(floor * n_p + sum_k coef_k Phi_pk) - log(T_p))**2`` over cells with
    ``T_p > 0``: the loss of relative errors, so that a few huge cells (point sources that no
    layer shows) do not decide the mix alone. Started from a weighted non-negative least-squares
    solution, then refined by Adam on the log-coefficients.

    Args:
        basis_sums: ``Phi [N, K]``, block sums of the basis functions per parent cell.
        n_children: ``[N]`` children per parent cell (the floor's column).
        totals: ``[N]`` parent totals (t CO2 / parent cell / yr); cells with NaN are skipped.
        max_rows: Largest number of cells used (a random subsample beyond).
        steps: Adam steps of the log-domain refinement (and of the share refinement).
        share_blocks: Groups of parent cells (:func:`share_blocks_of`): when given, the mix is
            finally refined to share each group's total among its cells with the least
            absolute error (:func:`_refine_shares`).

    Returns:
        ``(coef [K], floor)``: coefficients >= 0 and a floor > 0 (at least 1e-4 of the mean
        weight per child, so that every child keeps a small share).
    """
    phi = np.asarray(basis_sums, dtype=np.float64)
    t = np.asarray(totals, dtype=np.float64)
    n = np.asarray(n_children, dtype=np.float64)
    ok = np.isfinite(t) & (t > 0) & np.isfinite(phi).all(axis=1) & (n > 0)
    phi, t, n = phi[ok], t[ok], n[ok]
    k = phi.shape[1]
    if t.size == 0:
        return np.zeros(k), 1.0
    if t.size > max_rows:
        keep = np.random.default_rng(seed).choice(t.size, max_rows, replace=False)
        phi, t, n = phi[keep], t[keep], n[keep]
    a = np.concatenate([phi, n[:, None]], axis=1)
    # Start: NNLS with relative-error row weights (1 / T).
    wrow = 1.0 / t
    norms = np.linalg.norm(a * wrow[:, None], axis=0)
    norms = np.where(norms > 0, norms, 1.0)
    x0 = nnls(a * wrow[:, None] / norms, np.ones_like(t)) / norms
    scale = np.where(norms > 0, 1.0 / norms, 1.0)  # typical coefficient size per column
    x0 = np.maximum(x0, 1e-6 * scale)
    # Refine in the log domain.
    at = torch.from_numpy(a)
    logt = torch.from_numpy(np.log(t))
    theta = torch.tensor(np.log(x0), requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(int(steps)):
        opt.zero_grad()
        pred = at @ theta.exp()
        loss = (torch.log(pred.clamp(min=1e-300)) - logt).pow(2).mean()
        loss.backward()
        opt.step()
    x = theta.detach().exp().numpy()
    if share_blocks:
        x = _refine_shares(share_blocks, x, steps=steps)
    x = np.where(x < 1e-6 * scale, 0.0, x)
    coef, floor = x[:k], float(x[k])
    mean_w = float((a[:, :k] @ coef + floor * n).sum() / n.sum())
    floor = max(floor, 1e-4 * mean_w, 1e-12)
    return coef, floor


def share_loss(blocks: list[tuple[np.ndarray, np.ndarray]], coef: np.ndarray, floor: float) -> float:
    """Normalised absolute error of sharing each group's total with the mix ``(coef, floor)``."""
    x = np.concatenate([np.asarray(coef, dtype=np.float64), [float(floor)]])
    err, tot = 0.0, 0.0
    for a, t in blocks:
        w = a @ x
        pred = t.sum(axis=1, keepdims=True) * w / np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
        err += float(np.abs(pred - t).sum())
        tot += float(t.sum())
    return err / max(tot, 1e-300)
