"""Listed point sources on their sites; the rest of each block by the surface prior.

A point catalogue (``--aux plants.gpkg:co2_t_yr``) gives each listed plant's emission at one
coordinate, while a plant covers a few 100 m cells (its site) and its 1 km total is rarely the
listed figure (other years, other fuels, reporting errors). Sharing a block among layers, as
the additive mix does, spreads a plant's mass over every cell that shows any layer. This module
instead splits each block total ``T`` (t CO2 / block / yr) into:

- the surplus ``P = clip(T - S, 0, T)`` over the fitted surface's block sum ``S`` (absolute
  t CO2: the surface prior is fitted to the totals of blocks without listed points), in blocks
  that hold a listed point, placed on the sites in proportion to the listed mass;
- with unlisted sources on (:meth:`PointSites.set_unlisted`): in a block without a listed point
  whose total is far above the surface (``T > ratio * S``, ``ratio`` from the spread of the
  training blocks, :func:`carbonsr_cli.train.prior_fit.unlisted_ratio`), the excess ``T - S``,
  placed evenly on the block's cells that look like a listed point's cell (a catalogue never
  lists every plant); nothing moves where no cell does, nor where more cells than a site holds
  (``window**2``) do unless the total is above ``UNLISTED_CERTAIN * ratio * S`` (a built-up
  district under a busy road is 10-30 x its surface on the generated street regions, a plant
  100 x and more), nor where the block is not a lone spike: its ``T / S`` must be at least
  ``UNLISTED_ISOLATION`` times the second largest ``T / S`` of its 8 neighbour blocks. A point
  source raises one block (two when a neighbour holds another); a line source the surface
  misses (a motorway) enters and leaves the block, so at least two neighbours are raised too
  (measured, benchmarks/README.md session 11: unlisted plants 34-11,000 x their second
  neighbour, a motorway block 2.9-3.0 x);
- the remainder ``T - P``, shared as the network's log-weights say (surface prior + heads).

A point's *site* is the cells of its ``window x window`` neighbourhood that look like the
point's own cell: ``sum_k s_k |z_k(y) - z_k(p)| <= delta`` over the normalised aux channels
``z`` (point layers excluded), with ``s`` the *site signature*: how much more the listed points'
cells stand out from their neighbours than an average cell does, per channel (normalised to sum
1; e.g. no residents, a built-up fraction unlike the street around; :func:`site_signature`). The listed mass of a point is shared among its site's cells, the point's
own cell with weight ``point_weight`` (>= 1; the catalogue coordinate usually marks the largest
unit), each other site cell with weight 1.
Placement inside a 1 km cell cannot be learned from 1 km totals, so this rule is a stated
assumption, not a fit (measured against the generator's truth in benchmarks/README.md).

Shapes: aux ``[B, C, T, H, W]`` (normalised), log-weights ``[B, 1, T, H, W]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from models.physics import block_broadcast, block_sum, from_blocks, to_blocks

__all__ = ["PointSites", "UNLISTED_CERTAIN", "UNLISTED_ISOLATION", "listed_mass", "second_neighbour", "site_signature"]

#: A block this many times above the unlisted threshold holds a point source however many of its
#: cells look like one (see the module docstring).
UNLISTED_CERTAIN = 10.0
#: An unlisted source's block has ``T / S`` at least this many times the second largest of its 8
#: neighbours' (a lone spike, not a line the surface misses; see the module docstring).
UNLISTED_ISOLATION = 8.0


def second_neighbour(q: Tensor) -> Tensor:
    """Second largest value among the 8 neighbours of every cell ``[..., h, w]`` (missing
    neighbours beyond the edge count as 0)."""
    h, w = q.shape[-2:]
    lead = q.shape[:-2]
    padded = torch.nn.functional.pad(q.reshape(-1, 1, h, w), (1, 1, 1, 1))
    shifts = [padded[:, 0, 1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w] for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc]
    return torch.stack(shifts).topk(2, dim=0).values[1].reshape(*lead, h, w)


def listed_mass(basis: nn.Module, x: Tensor, point_mask: Tensor, channels: Sequence[int] | None = None) -> Tensor:
    """Listed point mass per child cell ``[B, 1, T, H, W]`` (raw units, e.g. t CO2 / yr).

    Args:
        basis: The prior's :class:`models.dasymetric.PriorBasis` (inverts the normaliser).
        x: Normalised aux ``[B, C, T, H, W]``; the training cache stores it as float16, so a raw 0
            comes back as a tiny positive value: values within two float16 steps of the
            normalised zero count as 0.
        point_mask: ``[C]`` 1 for the point layers to sum, else 0.
        channels: The indices where ``point_mask`` is 1, when known (only those are inverted).
    """
    if channels is None:
        channels = [int(i) for i in torch.nonzero(point_mask.detach().cpu() > 0).flatten()]
    if not channels:
        return x.new_zeros((x.shape[0], 1, *x.shape[2:]), dtype=torch.float32)
    idx = torch.tensor(list(channels), device=x.device)
    shape = (1, -1, 1, 1, 1)
    is_log, mean, std, lo = (v.index_select(0, idx).view(shape) for v in (basis.is_log, basis.mean, basis.std, basis.lo))
    xs = x.index_select(1, idx).float()
    z0 = torch.where(is_log > 0.5, -mean, lo - mean) / std.clamp(min=1e-12)
    step = torch.exp2(torch.floor(torch.log2(z0.abs().clamp(min=2.0**-14)))) * 2.0**-10  # float16 spacing at z0
    empty = (xs - z0).abs() <= 2.0 * step + 1e-6
    z = xs * std + mean
    raw = torch.where(is_log > 0.5, torch.expm1(z.clamp(max=60.0)), z - lo).clamp(min=0.0)
    return torch.where(empty, torch.zeros_like(raw), raw).sum(dim=1, keepdim=True)


def site_signature(contrast_points: np.ndarray, contrast_all: np.ndarray, point_channels: Sequence[int]) -> np.ndarray:
    """Channel weights ``[C]`` (sum 1, 0 on point channels): how much more a listed point's cell
    stands out from its 3 x 3 neighbourhood than an average cell does, per channel.

    ``s_k = c_k(points) / max(c_k(all), m / 10)`` with ``c_k`` the mean of ``|z_k - mean_3x3 z_k|``
    (normalised aux) and ``m`` the mean of ``c(all)`` over channels (so that a channel that is
    almost constant everywhere cannot take every weight). A layer that is also high around the
    plant (land cover of a city, blurred lights) or that varies from cell to cell everywhere (a
    road network) gets little weight; one that marks the plant's own cells (no residents, a
    built-up fraction unlike the street around it) gets most. Measured on the generated points
    regions: the contrast with the region's average (the first signature) gave road length 31 %
    of the weight where listed plants lay in a street grid, and a site that took two houses and
    missed a plant cell (points, seed 4).

    Args:
        contrast_points: ``c`` per channel over the listed points' cells ``[C]``.
        contrast_all: ``c`` per channel over all cells ``[C]``.
        point_channels: Indices of the point layers (weight 0).
    """
    cp = np.nan_to_num(np.asarray(contrast_points, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    ca = np.nan_to_num(np.asarray(contrast_all, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    others = np.ones(ca.size, dtype=bool)
    others[list(point_channels)] = False
    m = float(ca[others].mean()) if others.any() else 0.0
    s = np.where(others, cp / np.maximum(ca, max(m / 10.0, 1e-12)), 0.0)
    total = float(s.sum())
    return s / total if total > 0 else s


class PointSites(nn.Module):
    """Surplus of each block over the surface prior, placed on the listed points' sites.

    Args:
        channels: Aux channels ``C``.
        surface: The fitted surface mix, a ``DasymetricPrior`` (aux -> log of absolute weights,
            t CO2 / child cell / yr); a frozen copy, used only for the surplus ``P``.
        window: Site neighbourhood edge (odd, child cells).
        delta: Largest signature-weighted distance of a site cell from the point's cell.
        point_weight: Weight of the point's own cell in its site (each other site cell: 1).
    """

    def __init__(self, channels: int, surface: nn.Module, window: int = 3, delta: float = 1.0, point_weight: float = 1.0) -> None:
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window must be odd and >= 1, got {window}")
        if not delta >= 0:
            raise ValueError(f"delta must be >= 0, got {delta}")
        if not point_weight >= 1:
            raise ValueError(f"point_weight must be >= 1, got {point_weight}")
        self.point_weight = float(point_weight)
        self.channels = int(channels)
        self.window = int(window)
        self.delta = float(delta)
        self.surface = surface
        for p in self.surface.parameters():
            p.requires_grad_(False)
        self.register_buffer("point_mask", torch.zeros(self.channels))
        self.register_buffer("signature", torch.zeros(self.channels))
        self.register_buffer("profile", torch.zeros(self.channels))
        self.register_buffer("unlisted_ratio", torch.zeros(()))

    def set_sites(self, point_channels: Sequence[int], signature: Sequence[float]) -> None:
        """Store which channels are point layers (listed mass, raw units) and the signature."""
        mask = torch.zeros(self.channels)
        mask[list(point_channels)] = 1.0
        sig = torch.as_tensor(np.asarray(signature, np.float64), dtype=torch.float32)
        if sig.shape != (self.channels,):
            raise ValueError(f"expected {self.channels} signature weights, got {tuple(sig.shape)}")
        with torch.no_grad():
            self.point_mask.copy_(mask)
            self.signature.copy_(sig)
        self._point_channels = None

    def set_unlisted(self, profile: Sequence[float], ratio: float) -> None:
        """Turn on unlisted sources: a block without a listed point whose total is above ``ratio``
        times the surface's block sum gives the excess to its cells that look like a listed point's
        cell (signature-weighted L1 distance <= ``delta`` from ``profile``, the mean normalised aux
        of the listed points' cells ``[C]``), when there are at most ``window**2`` such cells or
        the total is above ``UNLISTED_CERTAIN * ratio`` times the surface. ``ratio`` 0 turns it off."""
        prof = torch.as_tensor(np.asarray(profile, np.float64), dtype=torch.float32)
        if prof.shape != (self.channels,):
            raise ValueError(f"expected {self.channels} profile values, got {tuple(prof.shape)}")
        if not ratio >= 0:
            raise ValueError(f"ratio must be >= 0, got {ratio}")
        with torch.no_grad():
            self.profile.copy_(prof)
            self.unlisted_ratio.fill_(float(ratio))
        self._unlisted_on = None

    def _unlisted(self) -> bool:
        """Whether unlisted sources are placed (read from the buffer once)."""
        if getattr(self, "_unlisted_on", None) is None:
            self._unlisted_on = bool(float(self.unlisted_ratio.detach().cpu()) > 0)
        return self._unlisted_on

    def _channels(self) -> list[int]:
        """The point channels (read from the buffer once, after construction or loading)."""
        if getattr(self, "_point_channels", None) is None:
            self._point_channels = [int(i) for i in torch.nonzero(self.point_mask.detach().cpu() > 0).flatten()]
        return self._point_channels

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        self._point_channels = self._unlisted_on = None
        for name in ("profile", "unlisted_ratio"):  # checkpoints written before unlisted sources: off
            state_dict.setdefault(prefix + name, torch.zeros_like(getattr(self, name)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    def listed_mass(self, x: Tensor) -> Tensor:
        """Listed point mass per child cell ``[B, 1, T, H, W]`` (see :func:`listed_mass`)."""
        return listed_mass(self.surface.basis, x, self.point_mask, self._channels())

    def spread(self, x: Tensor, block: int) -> Tensor:
        """Listed mass shared among each point's site cells ``[B, 1, T, H, W]``, the point's own
        cell weighing ``point_weight`` (a site stays inside its point's ``block x block`` block).

        On the CPU only the cells that hold listed mass are looked at (a gather); on a GPU the
        same rule runs densely, without a host synchronisation (CUDA graphs, no stall per step)."""
        return self._spread(x, self.listed_mass(x), block)

    def _spread(self, x: Tensor, mass: Tensor, block: int) -> Tensor:
        return self._spread_dense(x, mass, block) if x.is_cuda else self._spread_sparse(x, mass, block)

    def _offsets(self) -> list[tuple[int, int]]:
        r = self.window // 2
        return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]

    def _spread_sparse(self, x: Tensor, mass: Tensor, block: int) -> Tensor:
        m = mass[:, 0]  # [B, T, H, W]
        pts = torch.nonzero(m > 0)  # [K, 4]: b, t, y, x
        out = torch.zeros_like(m)
        if pts.shape[0] == 0:
            return out[:, None]
        h, w = x.shape[-2:]
        bi, ti, yi, xi = pts.unbind(1)
        sig = self.signature.to(x.device)
        zp = x[bi, :, ti, yi, xi].float() * sig  # [K, C]
        sims, cells = [], []
        for dy, dx in self._offsets():
            yy, xx = yi + dy, xi + dx
            ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w) & (yy // block == yi // block) & (xx // block == xi // block)
            yc, xc = yy.clamp(0, h - 1), xx.clamp(0, w - 1)
            zo = x[bi, :, ti, yc, xc].float() * sig
            sims.append(ok & ((zo - zp).abs().sum(dim=1) <= self.delta))
            cells.append((yc, xc))
        sim = torch.stack(sims, dim=1)  # [K, window**2]; the point's own cell is always in
        extra = self.point_weight - 1.0
        share = m[bi, ti, yi, xi] / (sim.sum(dim=1) + extra)
        for k, (yc, xc) in enumerate(cells):
            out.index_put_((bi, ti, yc, xc), share * sim[:, k], accumulate=True)
        if extra:
            out.index_put_((bi, ti, yi, xi), share * extra, accumulate=True)
        return out[:, None]

    def _spread_dense(self, x: Tensor, mass: Tensor, block: int) -> Tensor:
        z = x.float() * self.signature.view(1, -1, 1, 1, 1)  # signature-weighted: distance = L1
        r = self.window // 2
        h, w = x.shape[-2:]
        zp = torch.nn.functional.pad(z, (r, r, r, r))
        rows = torch.arange(h, device=x.device) // block
        cols = torch.arange(w, device=x.device) // block
        rows_p = torch.nn.functional.pad(rows[None, None], (r, r), value=-1)[0, 0]
        cols_p = torch.nn.functional.pad(cols[None, None], (r, r), value=-1)[0, 0]
        offsets = self._offsets()
        sims = []
        for dy, dx in offsets:  # sim[o](p): is p + o part of p's site
            zo = zp[..., r + dy : r + dy + h, r + dx : r + dx + w]
            same = (rows_p[r + dy : r + dy + h] == rows)[:, None] & (cols_p[r + dx : r + dx + w] == cols)[None, :]
            sims.append(((zo - z).abs().sum(dim=1, keepdim=True) <= self.delta) & same)
        extra = self.point_weight - 1.0
        n = torch.stack(sims).sum(dim=0) + extra  # >= 1: the offset (0, 0) is always in
        share = mass / n
        out = share * extra
        for (dy, dx), sim in zip(offsets, sims, strict=True):  # move each point's share to p + o
            part = torch.nn.functional.pad(share * sim, (r, r, r, r))
            out = out + part[..., r - dy : r - dy + h, r - dx : r - dx + w]
        return out

    def forward(self, log_w: Tensor, x: Tensor, main: Tensor, block: int) -> Tensor:
        """Log-weights whose block shares put the surplus on the sites (see the module docstring).

        Args:
            log_w: The network's log-weights ``[B, 1, T, H, W]`` (surface prior + heads).
            x: Normalised aux ``[B, C, T, H, W]``.
            main: ``log1p(T / block**2)`` broadcast over each block ``[B, 1, T, H, W]``.
            block: Block edge in child cells.

        Returns:
            ``log`` of weights summing to about ``T`` per block ``[B, 1, T, H, W]`` (float32);
            the remainder's shares (and their gradient) come from ``log_w``. ``log_w`` itself
            (same shares) when no cell holds listed mass: always when the module has no point
            channel and places no unlisted source; otherwise checked on the CPU only (on a GPU
            the check would stall every step).
        """
        unlisted = self._unlisted()
        if not unlisted and not self._channels():
            return log_w  # nothing can hold listed mass (known from the buffers: no device sync)
        with torch.autocast(device_type=x.device.type, enabled=False):
            with torch.no_grad():
                mass = self.listed_mass(x)
                if not x.is_cuda and not unlisted and not bool((mass > 0).any()):
                    return log_w
                sites = self._spread(x, mass, block).double()
            totals = torch.expm1(main[..., ::block, ::block].double()).clamp(min=0) * float(block * block)
            with torch.no_grad():
                surface = block_sum(torch.exp(self.surface(x).double()), block)
                site_sum = block_sum(sites, block)
                excess = (totals - surface).clamp(min=0)  # <= totals
                surplus = torch.where(site_sum > 0, excess, torch.zeros_like(totals))
                if unlisted:  # blocks far above the surface without a listed point
                    like = self.like_a_point(x).double()
                    like_sum = block_sum(like, block)
                    ratio = self.unlisted_ratio.double()
                    compact = (like_sum > 0) & (like_sum <= self.window * self.window)  # no larger than a site
                    q = totals / surface.clamp(min=1e-300)
                    alone = q >= UNLISTED_ISOLATION * second_neighbour(q)  # a spike, not a line through the block
                    far = (site_sum == 0) & alone & (((totals > ratio * surface) & compact)
                                                     | ((totals > UNLISTED_CERTAIN * ratio * surface) & (like_sum > 0)))
                    sites = sites + like * block_broadcast(torch.where(far, excess / like_sum.clamp(min=1e-300), torch.zeros_like(totals)), block)
                    surplus = torch.where(far, excess, surplus)
                    site_sum = torch.where(far, excess, site_sum)  # the unlisted cells already carry their mass
            up = block_broadcast(torch.where(site_sum > 0, surplus / site_sum.clamp(min=1e-300), torch.zeros_like(totals)), block)
            lw = log_w.double()
            shares = torch.softmax(to_blocks(lw, block), dim=-1)
            rest = from_blocks(shares * (totals - surplus).reshape(-1, 1), lw.shape, block)
            weights = rest + sites * up
            return torch.log(weights.clamp(min=1e-300)).float()

    def like_a_point(self, x: Tensor) -> Tensor:
        """1 where a cell looks like a listed point's cell (signature-weighted L1 distance of its
        normalised aux from ``profile`` <= ``delta``), else 0 ``[B, 1, T, H, W]`` (float32)."""
        d = ((x.float() - self.profile.view(1, -1, 1, 1, 1)).abs() * self.signature.view(1, -1, 1, 1, 1)).sum(dim=1, keepdim=True)
        return (d <= self.delta).float()
