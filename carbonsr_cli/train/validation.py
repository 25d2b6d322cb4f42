"""Validation of a training run: the held-out windows, every baseline's and the model's scores.

Used by :mod:`.loop` at the start (baselines, the fitted prior) and after every epoch (the
model), and by :func:`evaluate_split` / :func:`evaluate_against_truth` on a finished run. Scores
are parent-level metrics (linear domain) on the fixed validation windows of the run's split.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from carbonsr_cli.errors import UsageError
from carbonsr_cli.train.config import MASS_GATE_RAMP, TrainConfig
from carbonsr_cli.train.dataset import AuxCache, Batch, BatchSpec, MainData, build_batch, load_main
from carbonsr_cli.train.prior_fit import PriorFit, build_fitted_prior
from carbonsr_cli.train.split import Split
from carbonsr_cli.train.step import _children, autocast_factory

__all__ = ["METRIC_KEYS", "MASS_GATE_RAMP", "describe_mass_gate", "gate_strength", "mass_strength", "score_initial_state", "selection", "evaluate_split", "evaluate_against_truth"]

log = logging.getLogger("carbonsr.train")

METRIC_KEYS = ("nonzero_mae", "balanced_mae", "top1_nonzero_mae", "top5_nonzero_mae")


@dataclass
class _ValSet:
    items: list[tuple[int, int, int]]  # (row, col, year0)
    baselines: dict[int, dict[str, Any]]  # scale -> {"uniform": metrics, "dasymetric": metrics, "dasy_layer": name}


def _scores(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Parent-level metrics (linear domain, t CO2 / parent cell / yr) on valid cells."""
    from models import metrics as M

    return {
        "nonzero_mae": float(M.nonzero_mae(pred, true)),
        "balanced_mae": float(M.balanced_mae(pred, true)),
        "top1_nonzero_mae": float(M.topk_nonzero_mae(pred, true, q=0.99)),
        "top5_nonzero_mae": float(M.topk_nonzero_mae(pred, true, q=0.95)),
    }


def _truth_scores(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Child-level metrics against a fine truth: those of :func:`_scores` and ``r2`` (coefficient
    of determination over every valid child cell, zeros included)."""
    from models import metrics as M

    return {**_scores(pred, true), "r2": float(M.r2(pred, true))}


def _val_batches(items: Sequence[tuple[int, int, int]], scale: int, main: MainData, cache: AuxCache, cfg: TrainConfig, t: int) -> Iterator[tuple[list[tuple[int, int, int]], Batch]]:
    bs = max(1, cfg.val_batch_size)
    for k in range(0, len(items), bs):
        chunk = list(items[k : k + bs])
        spec = BatchSpec.windows(scale, [i[0] for i in chunk], [i[1] for i in chunk], [i[2] for i in chunk])
        yield chunk, build_batch(spec, main, cache, factor=cfg.factor, patch=cfg.patch, years_window=t)


def _val_items(split: Split, n_years: int, t: int, max_items: int) -> list[tuple[int, int, int]]:
    items = [(r, c, y0) for (r, c) in split.val_windows for y0 in range(n_years - t + 1)]
    if len(items) > max_items:
        keep = np.linspace(0, len(items) - 1, max_items).round().astype(int)
        items = [items[i] for i in sorted(set(keep.tolist()))]
    return items


def _baseline_scores(items: list[tuple[int, int, int]], scales: Sequence[int], main: MainData, cache: AuxCache, stack: Any, cfg: TrainConfig, t: int, fitted: Any = None) -> dict[int, dict[str, Any]]:
    """Every registered baseline (each variant: uniform, dasymetric per layer, points per surface)
    and the fitted layer mix on the validation items, at parent level (computed once).

    Returns:
        ``{scale: {"uniform", "dasymetric", "dasy_layer", "fitted", "points", "points_layer",
        "best", "best_label", "all": {label: metrics}}}``; ``best`` is the baseline with the
        lowest Nonzero-MAE at that scale (the one the model must beat).
    """
    import torch
    from rasterio.windows import Window

    from models.dasymetric import softmax_children
    from models.physics import block_sum

    f, p = cfg.factor, cfg.patch
    names = list(stack.names)
    variants, layer_idx = _host_variants(names, list(getattr(stack, "point_names", [])))
    raw_cache: dict[tuple[int, int], np.ndarray] = {}
    out: dict[int, dict[str, Any]] = {}
    for s in scales:
        preds: dict[str, list[np.ndarray]] = {v.label: [] for v in variants}
        if fitted is not None:
            preds["fitted"] = []
        truths: list[np.ndarray] = []
        for chunk, b in _val_batches(items, s, main, cache, cfg, t):
            totals = torch.from_numpy(b.totals).double()
            block = s * f
            m = b.mask
            truths.append(b.truth[m])
            raws = []
            for r, c, y0 in chunk:
                key = (r, c)
                if key not in raw_cache:
                    if len(raw_cache) > 64:
                        raw_cache.clear()
                    raw_cache[key] = np.asarray(stack.read(Window(c * f, r * f, p * f, p * f)), dtype=np.float32)
                raws.append(raw_cache[key][:, y0 : y0 + t])
            raw = torch.from_numpy(np.stack(raws)).double().movedim(1, 0)[:, :, None]  # [C, B, 1, T, P, P]
            for v in variants:
                layers = raw[layer_idx[v.label]] if layer_idx[v.label] else None
                preds[v.label].append(block_sum(v.method.fill(totals, layers, block), f).numpy()[m])
            if fitted is not None:
                with torch.no_grad():
                    lw = fitted(torch.from_numpy(b.aux))
                preds["fitted"].append(block_sum(softmax_children(lw, totals, block), f).numpy()[m])
        truth = np.concatenate(truths)
        out[s] = _summarise_baselines({k: _scores(np.concatenate(v), truth) for k, v in preds.items()})
    return out


def _host_variants(names: Sequence[str], point_names: Sequence[str]) -> tuple[list[Any], dict[str, list[int]]]:
    """Every variant of every registered host method (uniform, dasymetric per layer, points per
    surface) and, per variant label, the channels of ``names`` its ``fill`` reads."""
    from carbonsr_cli.methods import REGISTRY

    variants = [v for m in REGISTRY.values() if not m.runs_model and m.name != "auto" for v in m.variants(names, point_names)]
    layer_idx = {v.label: [list(names).index(n) for n in v.method.layers(v, names, point_names)] for v in variants}
    return variants, layer_idx


def _summarise_baselines(every: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Baseline scores by variant label -> ``{"uniform", "dasymetric", "dasy_layer",
    "all_dasymetric", "points", "points_layer", "fitted", "best", "best_label", "all"}`` (the best
    layer / surface / baseline by Nonzero-MAE; points and fitted only when scored)."""
    dasy = {k.split(":", 1)[1]: v for k, v in every.items() if k.startswith("dasymetric:")}
    best_layer = min(dasy, key=lambda n: (dasy[n]["nonzero_mae"], n))
    res: dict[str, Any] = {"uniform": every["uniform"], "dasymetric": dasy[best_layer], "dasy_layer": best_layer,
                           "all_dasymetric": dasy, "all": every}
    pts = {k: v for k, v in every.items() if k.startswith("points:")}
    if pts:
        best_p = min(pts, key=lambda k: (pts[k]["nonzero_mae"], k))
        res["points"], res["points_layer"] = pts[best_p], best_p
    if "fitted" in every:
        res["fitted"] = every["fitted"]
    best_label = min(every, key=lambda k: (every[k]["nonzero_mae"], k))
    res["best"], res["best_label"] = every[best_label], best_label
    return res


def _val_score(model_s: dict[int, dict[str, float]], base: dict[int, dict[str, Any]], scales: Sequence[int],
               against: str = "best") -> float:
    """Validation score: model Nonzero-MAE / the ``against`` baseline's (``best``: the best at that
    scale; ``uniform``), averaged over scales with weights ``1 / s`` (the smallest scales, closest
    to the 100 m task, weigh most). Below 1 the model wins.

    A baseline error below 1 % of uniform's counts as 1 % of uniform's: a layer can share a few
    windows' totals exactly at one scale (urban seed 12, s=2: one parent cell with that land
    cover per block, error 4e-14), and a ratio to ~0 says nothing but swamps the other scales.
    """
    w = np.array([1.0 / s for s in scales])
    r = np.array([model_s[s]["nonzero_mae"] / max(base[s][against]["nonzero_mae"], 0.01 * base[s]["uniform"]["nonzero_mae"], 1e-12)
                  for s in scales])
    return float((w * r).sum() / w.sum())


def _vs_uniform(row: dict[str, Any], scales: Sequence[int]) -> float:
    """:func:`_val_score` against uniform, from a history row's ``s<s>_model/uniform_nonzero_mae``."""
    return _val_score({s: {"nonzero_mae": row[f"s{s}_model_nonzero_mae"]} for s in scales},
                      {s: {"uniform": {"nonzero_mae": row[f"s{s}_uniform_nonzero_mae"]}} for s in scales}, scales, against="uniform")


def selection(history: list[dict[str, Any]], base: dict[int, dict[str, Any]], scales: Sequence[int],
              initial_score: float | None = None, initial_vs_uniform: float | None = None) -> dict[str, Any]:
    """What ``downscale --method auto`` uses, with the reason in words.

    The state with the best validation score (the initial one or an epoch's) is judged. It is the
    model unless it is worse than spreading evenly at 1 km (:func:`_val_score` against uniform
    >= 1: broken aux, a wrong layer taking the mass); then the baseline that validated best at
    the smallest scale. That the model did not beat the best baseline at 1 km is said in the
    reason, but it does not hand the region to that baseline: a 1 km score cannot see placement
    inside a 1 km cell, and on the generated regions it pointed the wrong way (benchmarks/README.md,
    session 8): 1 km scores of 0.94-1.22 x the fitted mix on the street regions, where the model
    was 0.55-0.96 x it at 100 m; 1.51 x a road-length layer on urban seed 9 and 1.9-2.3 x a
    land-cover class on urban seed 12, layers 9.8 x and 9.1 x worse than the model at 100 m.

    Returns:
        ``{"method", "reason", "score", "vs_uniform", "baseline"}``: ``method`` is ``model`` or a
        baseline label (``fitted``, ``dasymetric:LAYER``, ...); ``baseline`` the best baseline at
        the smallest scale; ``score`` / ``vs_uniform`` the judged state's scores (NaN if unknown).
    """
    s0 = min(scales)
    best_base = base[s0]["best_label"]
    states = [(float(h["val_score"]), _vs_uniform(h, scales) if f"s{s0}_uniform_nonzero_mae" in h else float("nan")) for h in history]
    if initial_score is not None:
        states.append((float(initial_score), float("nan") if initial_vs_uniform is None else float(initial_vs_uniform)))
    if not states:
        return {"method": best_base, "baseline": best_base, "reason": "no epoch finished; the best baseline on validation is used"}
    score, vs_uniform = min(states, key=lambda sv: sv[0])
    rec = {"score": score, "vs_uniform": vs_uniform, "baseline": best_base}
    if score < 0.99:
        return {"method": "model", **rec,
                "reason": f"the model's held-out Nonzero-MAE is {score:.3f} x the best baseline's ({best_base}; validation at 1 km)"}
    if not vs_uniform >= 1.0:  # NaN (a checkpoint without the figure) keeps the model
        return {"method": "model", **rec,
                "reason": f"the model did not beat the best baseline at 1 km ({score:.3f} x {best_base} on held-out blocks; "
                          f"{vs_uniform:.3f} x uniform), but a 1 km score cannot see placement inside a 1 km cell and misled "
                          f"on the generated regions; the model is replaced only when it is worse than uniform"}
    return {"method": best_base, **rec,
            "reason": f"the model's held-out 1 km Nonzero-MAE is {vs_uniform:.3f} x uniform's ({score:.3f} x the best baseline's); "
                      f"{best_base} validated best at s={s0}"}


def mass_strength(ratio: float, ramp: tuple[float, float] = MASS_GATE_RAMP) -> float:
    """The share of the mass prior's correction kept for a validation ``ratio`` (with / without).

    1 below ``ramp[0]``, 0 above ``ramp[1]`` (and for a ratio that is not finite), linear in
    between: a ratio that moves a little from one weight seed to the next moves the output a
    little, where a hard threshold flipped it (traffic 48 km seed 3 at 0.85: 0.838 / 0.850 kept,
    0.866 dropped; 100 m error 2.60 / 2.75 against 4.86).
    """
    lo, hi = ramp
    if not math.isfinite(ratio):
        return 0.0
    return float(min(1.0, max(0.0, (hi - ratio) / (hi - lo))))


def gate_strength(gate: dict[str, Any]) -> float:
    """The correction's strength in a ``mass_gate`` record (records from before the ramp have
    only ``kept``: 1 or 0)."""
    return float(gate.get("strength", 1.0 if gate.get("kept") else 0.0))


def describe_mass_gate(gate: dict[str, Any]) -> str | None:
    """One plain sentence on what the gate did with the mass prior's correction (None without one).

    ``gate``: a checkpoint's ``mass_gate`` (:func:`score_initial_state`; records written before
    the ramp have ``kept`` and no ``strength``; records before session 13 no ``ramp``: the default).
    """
    if not gate or "with_correction" not in gate or "mix" not in gate:
        return None
    mix = float(gate["mix"])
    ratio = float(gate["with_correction"]) / mix if mix > 0 else float("nan")
    strength = gate_strength(gate)
    lo, hi = (float(v) for v in gate.get("ramp", MASS_GATE_RAMP))
    what = ("kept in full" if strength >= 1.0 else "dropped (the model is the fitted mix)" if strength <= 0.0
            else f"kept at {strength:.0%} of its strength")
    return (f"Per-pixel correction of the layer mix: {what}; with it the model validated {ratio:.3f} x the mix "
            f"alone at 1 km (kept in full below {lo:.2f}, dropped above {hi:.2f}).")


def score_initial_state(model: Any, score: Callable[[], dict[int, dict[str, float]]], base: dict[int, dict[str, Any]],
                        scales: Sequence[int], ramp: Sequence[float] = MASS_GATE_RAMP) -> tuple[float, float, dict[str, Any]]:
    """Score the untrained network (its fitted prior) on the validation windows.

    For a mass prior (a prior with ``scale_correction``) the fitted mix alone is scored too, and
    the per-pixel correction is scaled by :func:`mass_strength` of the ratio of the two scores
    (1: kept, 0: the network starts at the mix). This compares two states of one network, not a
    state with the fitted baseline (which a 1 km score favours). On the generated regions (48 km,
    seeds 1-18, benchmarks/README.md, session 8) the ramp's middle (0.85, then a hard threshold)
    was set on seeds 1-12: the correction validated 0.56-0.83 x the mix on the street regions where
    it was kept (100 m: 0.40-1.03 x the model without it) and 0.90-1.01 x on the urban regions
    where it cost 1-6 % at 100 m; the earlier rule (below 0.95 x the best baseline) kept it on five
    of those.

    Args:
        model: The network (``model.prior`` set).
        score: Scores the model as it is now: ``{scale: metrics}`` (:func:`_model_scores`).
        base: Baseline scores (:func:`_baseline_scores`).
        scales: Validation scales.
        ramp: ``(lo, hi)`` of :func:`mass_strength`.

    Returns:
        ``(val score, val score against uniform, mass_gate)`` of the state the network starts
        from; ``mass_gate`` is ``{"with_correction", "mix", "strength", "kept"}`` (``kept``:
        strength > 0) for a mass prior, else empty.
    """
    s0 = score()
    first = (_val_score(s0, base, scales), _val_score(s0, base, scales, against="uniform"))
    log.info("initial state (the fitted prior): val score %.4f", first[0])
    if getattr(model.prior, "scale_correction", None) is None:
        return first[0], first[1], {}
    kept_state = copy.deepcopy(model.prior.state_dict())
    model.prior.reset_correction()
    s1 = score()
    mix = (_val_score(s1, base, scales), _val_score(s1, base, scales, against="uniform"))
    lo, hi = float(ramp[0]), float(ramp[1])
    strength = mass_strength(first[0] / mix[0] if mix[0] > 0 else float("nan"), (lo, hi))
    gate = {"with_correction": first[0], "mix": mix[0], "strength": strength, "kept": strength > 0, "ramp": [lo, hi]}
    if strength == 0.0:
        log.info("the mass prior's correction did not validate %.0f %% better than the fitted mix (%.4f vs %.4f); "
                 "the network starts at the fitted mix", 100 * (1 - hi), first[0], mix[0])
        return mix[0], mix[1], gate
    model.prior.load_state_dict(kept_state)
    if strength == 1.0:
        return first[0], first[1], gate
    model.prior.scale_correction(strength)
    s2 = score()
    scaled = (_val_score(s2, base, scales), _val_score(s2, base, scales, against="uniform"))
    gate["scaled"] = scaled[0]
    log.info("the mass prior's correction is kept at %.2f of its strength (val score %.4f with it, %.4f without, %.4f at that strength)",
             strength, first[0], mix[0], scaled[0])
    return scaled[0], scaled[1], gate


def _model_scores(model: Any, items: list[tuple[int, int, int]], scales: Sequence[int], main: MainData, cache: AuxCache, cfg: TrainConfig, t: int, device: Any, autocast: Any, ctx: Any = None) -> dict[int, dict[str, float]]:
    """The model's parent-level metrics on the validation items, per scale.

    Under torchrun (``ctx`` an active :class:`~carbonsr_cli.distributed.DistContext`) each rank
    predicts a contiguous share of the validation batches (the same batches as one process)
    and the ranks exchange their predictions, so every rank returns the one-process scores and
    validation takes 1/N of the time; ``model`` must then be the bare model (no DDP hooks).
    """
    import torch

    from carbonsr_cli.distributed import share_bounds
    from models.physics import block_sum

    f = cfg.factor
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None and ctx.active else (0, 1)
    bs = max(1, cfg.val_batch_size)
    n_batches = -(-len(items) // bs)
    b0, b1 = share_bounds(n_batches, rank, world)
    mine = items[b0 * bs : b1 * bs]  # whole batches: the same batches as in one process
    was_training = model.training
    model.eval()
    out: dict[int, dict[str, float]] = {}
    try:
        with torch.no_grad():
            for s in scales:
                preds, truths = [], []
                for _, b in _val_batches(mine, s, main, cache, cfg, t):
                    aux = torch.from_numpy(b.aux).to(device)
                    mi = torch.from_numpy(b.main).to(device)
                    with autocast():
                        raw, _ = model(aux, mi, context_block=s * f)
                    children = _children(model, raw, torch.from_numpy(b.totals).to(device), s * f)
                    parent = block_sum(children, f).cpu().numpy()
                    preds.append(parent[b.mask])
                    truths.append(b.truth[b.mask])
                if world > 1:  # every rank's share, in rank order = batch order
                    shares = ctx.all_gather((preds, truths))
                    preds = [p for sp, _ in shares for p in sp]
                    truths = [q for _, sq in shares for q in sq]
                out[s] = _scores(np.concatenate(preds), np.concatenate(truths))
    finally:
        model.train(was_training)
    return out

def evaluate_split(checkpoint: str | os.PathLike[str], *, device: str = "cpu") -> dict[int, dict[str, Any]]:
    """Re-score a checkpoint on its own run's validation windows (model and baselines).

    Returns:
        ``{scale: {"model": metrics, "uniform": metrics, "dasymetric": metrics,
        "dasy_layer": name}}`` at parent level.
    """
    import torch

    from carbonsr_cli.aux import AuxStack, categorical_kinds, discover_aux
    from carbonsr_cli.stats import AuxNormalizer
    from carbonsr_cli.checkpoints import load_model_for_inference

    loaded = load_model_for_inference(checkpoint, device)
    from carbonsr_cli.checkpoints import load_checkpoint

    ck = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(ck["train_config"])
    main = load_main(cfg.main)
    child = main.grid.child(cfg.factor)
    with AuxStack(discover_aux(cfg.aux, kinds=categorical_kinds(cfg.categorical)), child, main.years, fill_missing=cfg.fill_missing) as stack:
        norm = AuxNormalizer.from_stats(ck["stats"], stack.names)
        cache = AuxCache.build(stack, norm.apply, child.shape, len(main.years))
        split = Split.from_dict(ck["split"])
        t = int(ck["years_window"])
        items = _val_items(split, len(main.years), t, cfg.max_val_windows)
        base = _baseline_scores(items, cfg.val_scales, main, cache, stack, cfg, t)
    dev = torch.device(device)
    model_s = _model_scores(loaded.model, items, cfg.val_scales, main, cache, cfg, t, dev, autocast_factory(dev, "fp32"))
    return {s: {"model": model_s[s], **{k: v for k, v in base[s].items() if k != "all_dasymetric"}} for s in cfg.val_scales}

def evaluate_against_truth(
    checkpoint: str | os.PathLike[str],
    truth_path: str | os.PathLike[str],
    *,
    device: str = "cpu",
    batch_size: int = 8,
    expected_path: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]] | None = None,
) -> dict[str, Any]:
    """Score a checkpoint at child resolution on its run's validation windows, with a fine truth.

    Each validation window (``patch x patch`` parent cells) of each year is downscaled as at
    inference: ``main = log1p(parent total / factor**2)``, the model's children are
    shared onto every parent cell (``block = factor``). Every registered host method variant
    (uniform, dasymetric per layer, points per surface) and the fitted layer mix get the same
    parent totals; the best layer / surface is chosen on the same windows (with the truth, so the
    comparison favours it). The truth is used **only** here, never in training.

    Args:
        checkpoint: A run's checkpoint (its ``train_config`` names the main and aux inputs).
        truth_path: Child-resolution truth raster (same child grid, one band per year).
        device: Torch device for the model.
        batch_size: Windows per forward pass.
        expected_path: The truth's expected field without its per-cell noise (a generator's
            noise-free twin, same grid), or None. Shared onto each parent cell in proportion, it
            is scored as ``"floor"``: the best placement a method could reach (kept out of the
            baselines). Or ``{name: path}``: each such field scored under its own name, in the
            same pass.

    Returns:
        ``{"model": metrics, "cells": n}`` (and ``"floor"``, or each name of ``expected_path``) plus the keys of :func:`_summarise_baselines`
        (``uniform``, ``dasymetric``, ``dasy_layer``, ``all_dasymetric``, ``points``,
        ``points_layer``, ``fitted``, ``best``, ``best_label``, ``all``), metrics as in
        :func:`_truth_scores` (t CO2 / child cell / yr; ``r2`` unitless).
    """
    import torch
    from rasterio.windows import Window

    from carbonsr_cli.aux import AuxStack, categorical_kinds, discover_aux
    from carbonsr_cli.rasters import open_raster, read_window
    from carbonsr_cli.stats import AuxNormalizer
    from carbonsr_cli.checkpoints import load_checkpoint, load_model_for_inference
    from carbonsr_cli.train.dataset import degrade
    from models.dasymetric import softmax_children
    from models.host_baselines import dasymetric_children

    ck = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(ck["train_config"])
    loaded = load_model_for_inference(checkpoint, device)
    dev = torch.device(device)
    main = load_main(cfg.main)
    child = main.grid.child(cfg.factor)
    split = Split.from_dict(ck["split"])
    f, p, t = cfg.factor, split.patch, int(ck["years_window"])
    pc = p * f
    items = [(r, c, y0) for (r, c) in split.val_windows for y0 in range(len(main.years) - t + 1)]
    preds: dict[str, list[np.ndarray]] = {}
    truths: list[np.ndarray] = []
    with (AuxStack(discover_aux(cfg.aux, kinds=categorical_kinds(cfg.categorical)), child, main.years, fill_missing=cfg.fill_missing) as stack,
          open_raster(truth_path) as tds, contextlib.ExitStack() as extra):
        if (tds.height, tds.width) != child.shape:
            raise UsageError(f"truth grid {tds.height}x{tds.width} does not match the child grid {child.shape}", truth_path)
        fields = {} if expected_path is None else (
            dict(expected_path) if isinstance(expected_path, Mapping) else {"floor": expected_path})
        expected_ds = {}
        for name, path in fields.items():
            eds = expected_ds[name] = extra.enter_context(open_raster(path))
            if (eds.height, eds.width) != child.shape:
                raise UsageError(f"grid {eds.height}x{eds.width} does not match the child grid {child.shape}", path)
        norm = AuxNormalizer.from_stats(ck["stats"], stack.names)
        names = list(stack.names)
        fitted = build_fitted_prior(PriorFit.from_dict(ck["prior_fit"]), norm) if ck.get("prior_fit") else None
        variants, layer_idx = _host_variants(names, list(getattr(stack, "point_names", [])))
        for k in range(0, len(items), batch_size):
            chunk = items[k : k + batch_size]
            raws, parents, fine = [], [], []
            for r, c, y0 in chunk:
                win = Window(c * f, r * f, pc, pc)
                raws.append(np.asarray(stack.read(win))[:, y0 : y0 + t])
                parents.append(main.values[y0 : y0 + t, r : r + p, c : c + p])
                fine.append(read_window(tds, win, list(range(y0 + 1, y0 + t + 1)), out_dtype="float32"))
            raw = np.stack(raws).astype(np.float32)  # [B, C, T, P, P]
            par = np.stack(parents)[:, None]  # [B, 1, T, p, p]
            ok_parent = np.isfinite(par)
            par0 = np.where(ok_parent, par, 0.0).astype(np.float32)
            totals, main_in = degrade(par0, 1, f)
            truth = np.stack(fine)[:, None].astype(np.float64)
            mask = np.repeat(np.repeat(ok_parent, f, axis=-2), f, axis=-1) & np.isfinite(truth)
            if tds.nodata is not None:
                mask &= truth != tds.nodata
            tt = torch.from_numpy(totals)
            with torch.no_grad():
                xn = torch.from_numpy(norm.apply(raw))
                out, _ = loaded.model(xn.to(dev), torch.from_numpy(main_in).to(dev))
                model_children = _children(loaded.model, out, tt.to(dev), f).cpu().numpy()
                if fitted is not None:
                    preds.setdefault("fitted", []).append(softmax_children(fitted(xn), tt, f).numpy()[mask])
            preds.setdefault("model", []).append(model_children[mask])
            for name, eds in expected_ds.items():
                expected = np.stack([read_window(eds, Window(cc * f, rr * f, pc, pc), list(range(yy + 1, yy + t + 1)), out_dtype="float32")
                                     for rr, cc, yy in chunk])[:, None]
                preds.setdefault(name, []).append(dasymetric_children(totals, expected, f)[mask])
            layers_all = torch.from_numpy(raw).double().movedim(1, 0)[:, :, None]  # [C, B, 1, T, P, P]
            for v in variants:
                idx = layer_idx[v.label]
                kids = v.method.fill(tt.double(), layers_all[idx] if idx else None, f)
                preds.setdefault(v.label, []).append(kids.numpy()[mask])
            truths.append(truth[mask])
    y = np.concatenate(truths)
    every = {k: _truth_scores(np.concatenate(v), y) for k, v in preds.items()}
    floors = {name: every.pop(name) for name in fields if name in every}
    return {"model": every.pop("model"), **floors, **_summarise_baselines(every), "cells": int(y.size)}
