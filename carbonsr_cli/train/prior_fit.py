"""Fit the additive layer mix (:class:`models.dasymetric.DasymetricPrior`) on training parent cells.

This is the "fitted dasymetric" baseline (popRF's idea: a regression from aux layers to emissions
fitted on the parent cells, predicted per child cell, rescaled per block) and the initial state of
a dasymetric network's prior. Only parent cells outside the buffered validation region are used,
so validation stays held out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["PriorFit", "build_network_prior", "build_point_sites", "surface_active", "fit_mass_on_cache", "fit_prior_on_cache", "prior_module"]


@dataclass(frozen=True)
class PriorFit:
    """A fitted layer mix (everything needed to rebuild the prior module).

    Attributes:
        exponents: Powers of the basis.
        smooth: Neighbourhood sizes of the basis.
        coef: ``[C * S * J]`` coefficients (>= 0), per unit of ``(u / ref) ** p``.
        floor: Weight of every child cell (> 0).
        ref: Per-channel conditioning scale (mean positive raw value).
        cells: Parent cells (x years) the fit used.
        terms: ``{"<layer>^p": share of the fitted weight}``, the mix in words, largest first.
        basis: The basis offered to the fit (e.g. ``pixel + 3x3, p=0.5,1,2``).
        share_loss: Normalised absolute error of sharing the training groups' totals among their
            parent cells with the fitted mix (in-sample; ``models.dasymetric.share_loss``).
        mass: The fitted mass prior (:func:`fit_mass_on_cache`) when the network uses one, else None
            (fitted on the surface mix when ``sites`` is set).
        sites: The point-site prior's fit (:func:`models.point_sites`), else None:
            ``{"point_channels", "signature", "profile", "coef", "floor", "abs_coef", "abs_floor",
            "cells", "outliers", "unlisted_ratio", "point_cells"}``: the surface mix (point layers
            off) fitted on the training parent cells without a listed point and, after a first
            fit, without the ``outliers`` far above it (unlisted sources), ``abs_*`` by the
            log-domain loss alone (absolute t CO2: the surplus over it goes to the sites),
            ``coef``/``floor`` the average of that fit and the share-refined one (the network's
            initial prior; :func:`_fit_surface`); ``unlisted_ratio`` (:func:`unlisted_ratio`) and
            ``profile`` (mean normalised aux of the listed points' cells) place unlisted sources.
    """

    exponents: tuple[float, ...]
    smooth: tuple[int, ...]
    coef: tuple[float, ...]
    floor: float
    ref: tuple[float, ...]
    cells: int
    terms: dict[str, float]
    basis: str = ""
    share_loss: float = float("nan")
    mass: dict[str, Any] | None = None
    sites: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PriorFit:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(float(v) for v in d["exponents"]), tuple(int(v) for v in d["smooth"]),
                   tuple(float(v) for v in d["coef"]), float(d["floor"]),
                   tuple(float(v) for v in d["ref"]), int(d.get("cells", 0)), dict(d.get("terms", {})),
                   str(d.get("basis", "")), float(d.get("share_loss", float("nan"))), d.get("mass"), d.get("sites"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (stored in checkpoints and run files)."""
        return {"exponents": list(self.exponents), "smooth": list(self.smooth), "coef": list(self.coef), "floor": self.floor,
                "ref": list(self.ref), "cells": self.cells, "terms": dict(self.terms), "basis": self.basis,
                "share_loss": self.share_loss, "mass": self.mass, "sites": self.sites}


def prior_module(normalizer: Any, exponents: tuple[float, ...], smooth: tuple[int, ...],
                 ref: tuple[float, ...] | None = None) -> Any:
    """A :class:`DasymetricPrior` whose basis inverts ``normalizer`` (an ``AuxNormalizer``)."""
    from models.dasymetric import DasymetricPrior

    prior = DasymetricPrior(len(normalizer.names), exponents, smooth)
    prior.basis.set_normalisation(normalizer.log1p, normalizer.mean, normalizer.std, normalizer.clip_lo, ref)
    return prior


def fit_prior_on_cache(cache: Any, main: Any, train_mask: np.ndarray, normalizer: Any, factor: int, *,
                       exponents: tuple[float, ...], smooth: tuple[int, ...], rows_per_chunk: int = 16,
                       mass: bool = False, mass_hidden: int = 16, mass_members: int = 1, seed: int = 0,
                       mass_steps: int | None = None, point_channels: tuple[int, ...] = (),
                       mass_smooth: tuple[int, ...] | None = None, mass_trend: int = 0) -> PriorFit:
    """Fit the layer mix on the training parent cells of every year.

    Args:
        cache: ``AuxCache`` (normalised aux, float16 ``[C, Y, H * f, W * f]``).
        main: ``MainData`` (parent totals ``[Y, H, W]``, NaN = nodata).
        train_mask: bool ``[H, W]``: parent cells the fit may use (outside the buffered
            validation region).
        normalizer: The ``AuxNormalizer`` the cache was built with.
        factor: Child cells per parent cell along an axis.
        exponents: Powers of the basis.
        smooth: Neighbourhood sizes of the basis.
        mass: Also fit the mass prior (:func:`fit_mass_on_cache`; ``PriorFit.mass``).
        mass_hidden: Hidden width of one member MLP of the mass prior.
        mass_members: Member MLPs of the mass prior.
        seed: Seed of the mass prior's fit.
        mass_steps: Adam steps of the mass prior's fit (None: ``MASS_FIT_STEPS``).
        point_channels: Aux channels holding listed point mass (raw t CO2 / yr); when given, the
            point-site prior is fitted too (``PriorFit.sites``).
        mass_smooth: Neighbourhood edges of the mass prior's features (None: ``smooth``).
        mass_trend: Degree of the regional trend fitted beside the correction (0: none).

    Returns:
        The :class:`PriorFit`.
    """
    import torch

    from models.dasymetric import fit_prior, neighbourhood_mean, share_blocks_of, share_loss
    from models.physics import block_sum
    from models.point_sites import listed_mass, site_signature

    arr = cache.array
    c, n_years, hc, wc = arr.shape
    h, w = hc // factor, wc // factor
    prior = prior_module(normalizer, exponents, smooth)
    # Conditioning scale: mean positive raw value per channel over the cache (subsampled).
    with torch.no_grad():
        sample = torch.from_numpy(np.asarray(arr[:, :, ::7, ::7], dtype=np.float32))[None]
        raw = prior.basis.raw(sample)[0].reshape(c, -1)
        pos = raw > 0
        ref = tuple(float(raw[k][pos[k]].mean()) if bool(pos[k].any()) else 1.0 for k in range(c))
    prior.basis.set_normalisation(normalizer.log1p, normalizer.mean, normalizer.std, normalizer.clip_lo, ref)

    margin = max(smooth) // 2
    sums, totals, counts, groups, listed, surface_groups = [], [], [], [], [], []
    k = prior.basis.size
    pts = list(point_channels)
    contrast_all, contrast_pts, prof_pts, n_cells, n_pts = np.zeros(c), np.zeros(c), np.zeros(c), 0, 0  # for the site signature
    point_mask = torch.zeros(c)
    point_mask[pts] = 1.0
    listed_any = np.zeros((h, w), dtype=bool)  # parent cells with a listed point in any year
    with torch.no_grad():
        for y in range(n_years):
            grid = np.zeros((k, h, w))
            pgrid = np.zeros((h, w))
            for r0, r1, x, cut in _row_chunks(arr, y, factor, margin, rows_per_chunk):
                phi = prior.basis(x)[..., cut, :]
                grid[:, r0:r1] = block_sum(phi.double(), factor)[0, :, 0].numpy()  # [K, r1 - r0, W]
                if pts:
                    xc = x[..., cut, :]
                    pm = listed_mass(prior.basis, xc, point_mask, pts)[0, 0, 0]  # [rows, W * f] listed t CO2 / yr
                    pgrid[r0:r1] = block_sum(pm.double(), factor).numpy()
                    dev = (x - neighbourhood_mean(x.float(), 3))[0, :, 0][:, cut].abs().double()  # [C, rows, W * f]
                    contrast_all += dev.sum(dim=(1, 2)).numpy()
                    n_cells += dev.shape[1] * dev.shape[2]
                    contrast_pts += dev[:, pm > 0].sum(dim=1).numpy()
                    prof_pts += xc[0, :, 0][:, pm > 0].double().sum(dim=1).numpy()
                    n_pts += int((pm > 0).sum())
            keep = train_mask & np.isfinite(main.values[y])
            sums.append(grid.transpose(1, 2, 0)[keep])
            totals.append(main.values[y][keep].astype(np.float64))
            counts.append(np.full(int(keep.sum()), float(factor * factor)))
            listed.append(pgrid[keep] > 0)
            listed_any |= pgrid > 0
            groups.extend(share_blocks_of(grid, np.full((h, w), float(factor * factor)), main.values[y].astype(np.float64), keep))
            if pts:
                surface_groups.extend(share_blocks_of(grid, np.full((h, w), float(factor * factor)), main.values[y].astype(np.float64),
                                                      keep & ~(pgrid > 0)))
    phi_all = np.concatenate(sums) if sums else np.zeros((0, k))
    t_all = np.concatenate(totals) if totals else np.zeros(0)
    n_all = np.concatenate(counts) if counts else np.zeros(0)
    sites = None
    if pts and n_pts:
        sites = _fit_surface(phi_all, n_all, t_all, np.concatenate(listed), pts, prior.basis, surface_groups)
        sites["signature"] = site_signature(contrast_pts / n_pts, contrast_all / max(n_cells, 1), pts).tolist()
        sites["profile"] = (prof_pts / n_pts).tolist()
        sites["point_cells"] = int(n_pts)
    # Every basis function is offered (pixel and 3x3, three powers). Choosing a smaller basis by the
    # held-out share loss of groups of parent cells was tried (nested bases: pixel p=1; + powers;
    # + 3x3; all): it picked bases that were worse at 100 m on the generated regions (traffic 25.3
    # vs 15.8, points 906 vs 726; 36 km, seed 1): sharing among parent cells does not measure
    # placement inside a cell.
    coef, floor = fit_prior(phi_all, n_all, t_all, share_blocks=groups)
    nonzero = t_all > 0
    phi_all, n_all = phi_all[nonzero], n_all[nonzero]
    names = prior.basis.labels(normalizer.names)
    contrib = coef * (phi_all.sum(axis=0) if len(phi_all) else np.zeros(k))
    total = float(contrib.sum() + floor * n_all.sum()) or 1.0
    terms = {n: float(v / total) for n, v in sorted(zip(names, contrib), key=lambda kv: -kv[1]) if v > 0}
    terms["(floor)"] = float(floor * n_all.sum() / total)
    basis = " + ".join("pixel" if k == 1 else f"{k}x{k}" for k in smooth) + ", p=" + ",".join(f"{p:g}" for p in exponents)
    mass_fit = None
    if mass:
        if sites is not None:  # the correction of the surface, on cells without a listed point
            prior.set_coefficients(np.asarray(sites["coef"]), float(sites["floor"]))
            prior.set_active(surface_active(prior.basis, pts))
        else:
            prior.set_coefficients(coef, floor)
        mass_fit = fit_mass_on_cache(cache, main, train_mask & ~listed_any if sites is not None else train_mask, prior, factor, hidden=mass_hidden, members=mass_members, smooth=mass_smooth or smooth, seed=seed,
                                     steps=mass_steps, rows_per_chunk=rows_per_chunk, trend=mass_trend)
    return PriorFit(tuple(float(p) for p in exponents), tuple(int(k) for k in smooth), tuple(float(v) for v in coef), float(floor), ref,
                    int(t_all.size), terms, basis, share_loss(groups, coef, floor) if groups else float("nan"), mass_fit, sites)


def surface_active(basis: Any, point_channels: Any) -> np.ndarray:
    """Active mask of the surface mix's basis ``[C * S * J]``: every function but the point layers'."""
    per = len(basis.smooth) * len(basis.exponents)
    mask = np.ones(basis.channels * per, dtype=bool)
    for ch in point_channels:
        mask[ch * per : (ch + 1) * per] = False
    return mask


def _fit_surface(phi: np.ndarray, n: np.ndarray, t: np.ndarray, listed: np.ndarray, point_channels: list[int],
                 basis: Any, groups: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """The surface mix (point layers off), fitted on the training cells without a listed point.

    Two fits of the same mix: by the relative error of the parent totals alone (absolute
    t CO2, which the surplus needs) and refined to share groups of parent cells (``groups``)
    like the fitted baseline. Neither wins everywhere at 100 m, and no 1 km score says which
    one does (generated regions: the held-out share loss preferred the refined fit on every
    traffic region, where it was 1.8-3 x worse at 100 m; it was better on others). The surface
    that places the rest of each block (``coef``, ``floor``) is their average, the refined fit
    scaled to the first one's level (median ratio of block sums): within 0.5 % of the better
    fit or better on eight of nine regions. The surplus is measured against the first fit alone
    (``abs_coef``, ``abs_floor``): the refined fit let a sparse layer take the mass of unlisted
    plants (points, seed 1: a motorway column got 90 % of a plant's cell), and the average
    inherits that (100 m error 80.7 -> 203 on that region).

    Cells far above the first log-loss fit (``T > unlisted_ratio * S``: unlisted sources) and
    the share groups that hold one are left out of both final fits: on urban seed 8 two such
    cells made a motorway column take 88 % of the city blocks it crosses (100 m error 7.02 with
    them, 1.98 without; the best single layer 2.26).
    """
    from models.dasymetric import fit_prior

    active = surface_active(basis, point_channels)
    rows = ~listed
    a, n_r, t_r = phi[rows][:, active], n[rows], t[rows]
    coef_abs, floor_abs = fit_prior(a, n_r, t_r)
    sub = [(g[:, :, np.r_[active, True]], tot) for g, tot in groups]
    # Unlisted sources are outliers of the surface: fit again without the cells far above the first
    # fit (and the share groups that hold one), so that no sparse layer is given their mass.
    s_first = a @ coef_abs + floor_abs * n_r
    ratio = unlisted_ratio(t_r, s_first)
    outlier = t_r > ratio * s_first if ratio > 0 else np.zeros(t_r.shape, dtype=bool)
    if outlier.any() and int((~outlier & (t_r > 0)).sum()) >= 20:
        x_abs = np.r_[coef_abs, floor_abs]
        sub = [(g[ok], tot[ok]) for g, tot in sub for ok in [(tot <= ratio * (g @ x_abs)).all(axis=1)] if ok.any()]
        a, n_r, t_r = a[~outlier], n_r[~outlier], t_r[~outlier]
        coef_abs, floor_abs = fit_prior(a, n_r, t_r)
    coef_sh, floor_sh = fit_prior(a, n_r, t_r, share_blocks=sub or None) if sub else (coef_abs, floor_abs)
    s_abs, s_sh = a @ coef_abs + floor_abs * n_r, a @ coef_sh + floor_sh * n_r
    ok = (s_sh > 0) & (s_abs > 0) & (t_r > 0)
    k = float(np.median(s_abs[ok] / s_sh[ok])) if ok.any() else 1.0
    full, absolute = np.zeros(active.size), np.zeros(active.size)
    full[active] = 0.5 * (coef_abs + k * coef_sh)
    absolute[active] = coef_abs
    return {"point_channels": [int(ch) for ch in point_channels], "coef": full.tolist(), "floor": 0.5 * (floor_abs + k * floor_sh),
            "abs_coef": absolute.tolist(), "abs_floor": float(floor_abs), "cells": int(t_r.size), "outliers": int(outlier.sum()),
            "unlisted_ratio": unlisted_ratio(t_r, s_abs)}


#: Smallest ratio of a block's total to the surface's block sum that is read as an unlisted point
#: source (when the robust spread of the training blocks allows less).
MIN_UNLISTED_RATIO = 10.0


def unlisted_ratio(totals: np.ndarray, surface: np.ndarray, spread: float = 5.0) -> float:
    """Ratio ``T / S`` above which a block without a listed point holds an unlisted source.

    The log-ratio of the training blocks' totals to the surface's block sums is centred near 0
    with a spread set by the surface's errors; an unlisted plant (hundreds of times a usual cell)
    is far outside it. The threshold is ``exp(median + spread * 1.4826 * MAD)`` of those
    log-ratios (``MAD``: median absolute deviation; 1.4826 MAD estimates a normal sigma, robust
    to the plants themselves), and at least :data:`MIN_UNLISTED_RATIO`.

    Args:
        totals: Training blocks' totals ``[N]`` (t CO2 / block / yr), blocks without a listed point.
        surface: The surface's block sums on the same blocks ``[N]`` (same units).
        spread: Robust standard deviations above the median.
    """
    ok = (np.asarray(totals) > 0) & (np.asarray(surface) > 0)
    if ok.sum() < 20:
        return 0.0  # too few blocks to tell an outlier: off
    r = np.log(np.asarray(totals, np.float64)[ok] / np.asarray(surface, np.float64)[ok])
    med = float(np.median(r))
    mad = float(np.median(np.abs(r - med)))
    return float(max(np.exp(med + spread * 1.4826 * mad), MIN_UNLISTED_RATIO))


def _row_chunks(arr: Any, year: int, factor: int, margin: int, rows_per_chunk: int,
                wanted: Any = None) -> Any:
    """Yield ``(r0, r1, x, cut)`` for parent rows ``r0:r1`` of year ``year`` of the cache ``arr``
    ``[C, Y, H * f, W * f]``: ``x`` the normalised aux ``[1, C, 1, rows, W * f]`` with ``margin``
    child rows either side (so neighbourhoods see past the chunk), ``cut`` the child rows of the
    chunk in ``x``. ``wanted(r0, r1)`` False skips reading a chunk."""
    import torch

    hc = arr.shape[2]
    h = hc // factor
    for r0 in range(0, h, rows_per_chunk):
        r1 = min(h, r0 + rows_per_chunk)
        if wanted is not None and not wanted(r0, r1):
            continue
        a0, a1 = max(0, r0 * factor - margin), min(hc, r1 * factor + margin)
        x = torch.from_numpy(np.asarray(arr[:, year : year + 1, a0:a1], dtype=np.float32))[None]
        yield r0, r1, x, slice(r0 * factor - a0, r0 * factor - a0 + (r1 - r0) * factor)


def fit_mass_on_cache(cache: Any, main: Any, train_mask: np.ndarray, mix: Any, factor: int, *, hidden: int = 16,
                      members: int = 1, smooth: tuple[int, ...] = (1, 3), seed: int = 0, max_blocks: int = 4000, steps: int | None = None,
                      rows_per_chunk: int = 16, trend: int = 0) -> dict[str, Any]:
    """Fit the per-pixel correction of the fitted mix ``mix`` (:class:`models.mass_prior.MassPrior`)
    on (at most ``max_blocks``, drawn with ``seed``) training parent cells with a total > 0, all
    years; see :func:`models.mass_prior.fit_mass_prior`.

    Returns:
        ``{"hidden", "members", "smooth", "blocks", "loss", "trend", "state"}`` (``state`` = the module's state dict
        as nested lists, mix included), for :func:`build_network_prior`.
    """
    import torch

    from models.mass_prior import MASS_FIT_STEPS, MassPrior, block_samples, fit_mass_prior

    arr = cache.array
    c, n_years = arr.shape[:2]
    prior = MassPrior(c, hidden, smooth, mix.basis.exponents, mix.basis.smooth, members)
    prior.mix.load_state_dict(mix.state_dict())
    values = np.asarray(main.values, dtype=np.float64)
    chosen = [np.argwhere(train_mask & np.isfinite(values[y]) & (np.nan_to_num(values[y]) > 0)) for y in range(n_years)]
    index = np.concatenate([np.column_stack([np.full(len(b), y), b]) for y, b in enumerate(chosen)]) if chosen else np.zeros((0, 3), int)
    if len(index) > max_blocks:
        rng = np.random.default_rng(seed)
        index = index[np.sort(rng.choice(len(index), max_blocks, replace=False))]
    margin = max(max(smooth), max(mix.basis.smooth)) // 2
    feats, mixes, tots, coords = [], [], [], []
    with torch.no_grad():
        for y in range(n_years):
            rows_y = index[index[:, 0] == y]
            wanted = lambda r0, r1, rows_y=rows_y: bool(((rows_y[:, 1] >= r0) & (rows_y[:, 1] < r1)).any())  # noqa: E731
            for r0, r1, x, cut in _row_chunks(arr, y, factor, margin, rows_per_chunk, wanted):
                sel = rows_y[(rows_y[:, 1] >= r0) & (rows_y[:, 1] < r1)]
                fb = block_samples(prior.raw_features(x)[0, :, 0, cut].numpy(), factor)  # [rows, w, P, K]
                mb = block_samples(prior.mix(x)[0, :, 0, cut].double().numpy(), factor)[..., 0]  # [rows, w, P]
                feats.append(fb[sel[:, 1] - r0, sel[:, 2]])
                mixes.append(mb[sel[:, 1] - r0, sel[:, 2]])
                tots.append(values[y, sel[:, 1], sel[:, 2]])
                coords.append(sel[:, 1:3].astype(np.float64))
    p2 = factor * factor
    ft = torch.from_numpy(np.concatenate(feats)) if feats else torch.zeros((0, p2, prior.features_size))
    mt = torch.from_numpy(np.concatenate(mixes)) if mixes else torch.zeros((0, p2), dtype=torch.float64)
    tt = torch.from_numpy(np.concatenate(tots)) if tots else torch.zeros(0, dtype=torch.float64)
    ct = torch.from_numpy(np.concatenate(coords)) if coords else torch.zeros((0, 2), dtype=torch.float64)
    loss = fit_mass_prior(prior, ft, mt, tt, steps=MASS_FIT_STEPS if steps is None else steps, seed=seed, coords=ct, trend=trend)
    state = {k: v.detach().cpu().tolist() for k, v in prior.state_dict().items()}
    return {"hidden": int(hidden), "members": int(members), "smooth": [int(k) for k in smooth], "blocks": int(len(tt)), "loss": float(loss),
            "trend": int(trend), "state": state}


def build_point_sites(fit: PriorFit, normalizer: Any, window: int = 3, delta: float = 1.0, point_weight: float = 1.0,
                      unlisted: bool = False) -> Any:
    """The :class:`models.point_sites.PointSites` of a fit (its frozen surface = the log-loss
    surface mix, whatever the network's prior kind), or None when the fit has no sites."""
    from models.point_sites import PointSites

    if fit.sites is None:
        return None
    # the surplus is measured against the log-loss fit alone (see _fit_surface), for every prior
    # kind: the mass prior starts from the averaged mix, which inherits the share fit's errors
    # (points seeds 1-2 with the mass preset: 1.63 and 1.93 x the best baseline when it was used)
    surface = _surface_mix(fit, normalizer, fit.sites["abs_coef"], fit.sites["abs_floor"])
    sites = PointSites(len(normalizer.names), surface, window, delta, point_weight)
    sites.set_sites(fit.sites["point_channels"], fit.sites["signature"])
    if unlisted and fit.sites.get("profile") is not None:
        sites.set_unlisted(fit.sites["profile"], float(fit.sites.get("unlisted_ratio", 0.0)))
    return sites.eval()


def build_network_prior(fit: PriorFit, normalizer: Any, kind: str = "mix") -> Any:
    """The prior module a network of ``prior_kind`` ``kind`` starts from (eval mode): the
    surface mix when the fit has sites, else the fitted mix; with its mass correction for ``mass``."""
    import torch

    if kind != "mass":
        if fit.sites is None:
            return build_fitted_prior(fit, normalizer)
        return _surface_mix(fit, normalizer, fit.sites["coef"], fit.sites["floor"])
    if fit.mass is None:
        raise ValueError("the prior fit holds no mass prior (fit with mass=True)")
    from models.mass_prior import MassPrior

    m = fit.mass
    prior = MassPrior(len(normalizer.names), int(m["hidden"]), tuple(m["smooth"]), fit.exponents, fit.smooth, int(m.get("members", 1)))
    ref_state = prior.state_dict()
    prior.load_state_dict({k: torch.as_tensor(v, dtype=ref_state[k].dtype).reshape(ref_state[k].shape) for k, v in m["state"].items()})
    return prior.eval()


def _surface_mix(fit: PriorFit, normalizer: Any, coef: Any, floor: float) -> Any:
    """A surface mix of ``fit``'s basis (point layers off) with the given coefficients (eval mode)."""
    surface = prior_module(normalizer, fit.exponents, fit.smooth, fit.ref)
    surface.set_coefficients(np.asarray(coef), float(floor))
    surface.set_active(surface_active(surface.basis, fit.sites["point_channels"]))  # type: ignore[index]
    return surface.eval()


def build_fitted_prior(fit: PriorFit, normalizer: Any) -> Any:
    """The prior module of a fit (eval mode)."""
    prior = prior_module(normalizer, fit.exponents, fit.smooth, fit.ref)
    prior.set_coefficients(np.asarray(fit.coef), fit.floor)
    return prior.eval()
