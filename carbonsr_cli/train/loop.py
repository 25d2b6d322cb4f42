"""The training loop: ``train(TrainConfig) -> RunResult``.

One run directory (``<runs_dir>/<run-id>/``) holds ``config.json``, ``stats.json``,
``split.json``, ``metrics.csv``, ``train.log``, ``training_curves.png`` and the
checkpoints (see :mod:`.checkpoints`):

- ``autosave_step_<n>.pth`` every ``autosave_every`` steps (the last ``keep_autosaves``
  kept) and ``autosave_latest.pth`` (the newest autosave; also written on Ctrl-C, at
  ``max_steps`` and at ``max_time_s``);
- ``latest.pth`` at the end of every epoch (after validation);
- ``epoch_<nnn>.pth`` every ``snapshot_every`` epochs (permanent);
- ``best_model.pth`` whenever the validation score improves.

Objective (per step): the model sees a degraded patch (:mod:`.dataset`), predicts log1p
child totals; ``water_fill`` projects ``expm1(raw)`` onto the coarse block totals
(``block = s * factor``, float64); children are sum-pooled to parent cells; the loss is
``DualLayerWeightedLoss(log1p(parent pred), log1p(parent truth), mask) + moe_weight *
model.aux_loss``. AdamW, linear warm-up then cosine decay (``LambdaLR``), gradient-norm
clipping, bf16 autocast on CUDA (the physics step and the loss stay in float64/float32).

Validation (every epoch) on the fixed validation windows at each of ``val_scales``:
the model, the uniform baseline and the dasymetric baseline of every aux layer (the best
layer per scale on the same windows is reported) are scored at parent level against the
true parent totals: Nonzero-MAE, Balanced MAE, Top-1% and Top-5% Nonzero-MAE. The *val
score* (best_model, early stopping) is the mean model Nonzero-MAE over ``val_scales``.

Exact continuation: the batch of ``(epoch, step)`` is a pure function of the seed; model,
optimiser, scheduler and RNG states are in every checkpoint; so an interrupted and resumed
CPU run ends with bitwise the same weights as an uninterrupted one (tested).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from carbonsr_cli import __version__
from carbonsr_cli.errors import CheckpointError, OutputError, UsageError
from carbonsr_cli.train.config import RESUME_MUTABLE, TrainConfig, default_years_window
from carbonsr_cli.train.dataset import (
    AuxCache,
    Batch,
    BatchSpec,
    MainData,
    PatchSampler,
    Prefetcher,
    build_batch,
    load_main,
    parse_scales,
)
from carbonsr_cli.train.prior_fit import PriorFit, build_fitted_prior, build_network_prior, fit_prior_on_cache
from carbonsr_cli.train.split import Split, make_block_split, make_region_split, parse_val_region
from models.dasymetric import DEFAULT_EXPONENTS, DEFAULT_SMOOTH

from carbonsr_cli.devices import resolve_device  # re-exported for callers of train.loop

__all__ = ["RunResult", "train", "training_step", "resolve_device", "evaluate_split", "evaluate_against_truth"]

log = logging.getLogger("carbonsr.train")

METRIC_KEYS = ("nonzero_mae", "balanced_mae", "top1_nonzero_mae", "top5_nonzero_mae")


@dataclass
class RunResult:
    """What a training run produced.

    Attributes:
        run_dir: The run directory.
        best_path: ``best_model.pth`` (None if no epoch finished).
        best_score: Best validation score (mean model Nonzero-MAE over the val scales,
            t CO2 / parent cell / yr), None if no epoch finished.
        epochs_done: Epochs completed.
        global_step: Optimisation steps done.
        stopped: ``completed``, ``early_stop``, ``max_steps`` or ``max_time``.
        history: One dict per finished epoch (also in metrics.csv).
        last_checkpoint: The last checkpoint written.
        initial_score: Validation score of the initial state (the fitted prior), if scored.
    """

    run_dir: Path
    best_path: Path | None
    best_score: float | None
    epochs_done: int
    global_step: int
    stopped: str
    history: list[dict[str, Any]] = field(default_factory=list)
    last_checkpoint: Path | None = None
    initial_score: float | None = None


# --------------------------------------------------------------------------- run setup


def _new_run_dir(cfg: TrainConfig) -> Path:
    root = Path(cfg.runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    if cfg.name:
        d = root / cfg.name
        if d.exists() and any(d.iterdir()):
            raise OutputError("run directory already exists; choose another --name or continue it with --resume latest", d)
        d.mkdir(exist_ok=True)
        return d
    base = datetime.now().strftime("run_%Y%m%d_%H%M%S")
    d, k = root / base, 1
    while True:
        try:
            d.mkdir()
            return d
        except FileExistsError:
            k += 1
            d = root / f"{base}_{k}"


def _write_json(path: Path, obj: Any) -> None:
    from carbonsr_cli.atomic import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def _setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    # train.log gets INFO; the console only with -v (root logger at INFO or below)
    log.propagate = logging.getLogger().getEffectiveLevel() <= logging.INFO
    return handler


class _Interrupt:
    """SIGINT -> flag checked after each step (a second Ctrl-C interrupts at once)."""

    def __init__(self, patient: bool = False) -> None:
        self.flag = False
        self.patient = patient  # distributed: torchrun forwards the Ctrl-C a second time
        self._old: Any = None

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        if self.flag and not self.patient:
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


# --------------------------------------------------------------------------- statistics


def _stats_for_run(cfg: TrainConfig, main: MainData, stack: Any, run_dir: Path) -> dict:
    """The run's statistics: ``cfg.stats`` if given, else computed (main pooled over all files)."""
    from carbonsr_cli import stats as stats_mod

    if cfg.stats:
        return dict(stats_mod.load_stats(cfg.stats))
    log.info("computing statistics of %s and %d aux layers", ", ".join(cfg.main), len(stack.names))
    if len(cfg.main) == 1:
        return stats_mod.compute_stats(cfg.main[0], stack, factor=cfg.factor, fill_missing=cfg.fill_missing)
    return stats_mod.compute_stats(cfg.main, cfg.aux, factor=cfg.factor, fill_missing=cfg.fill_missing,
                                   categorical=cfg.categorical)


# --------------------------------------------------------------------------- validation


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


def _val_batches(items: Sequence[tuple[int, int, int]], scale: int, main: MainData, cache: AuxCache, cfg: TrainConfig, t: int) -> Iterator[tuple[list[tuple[int, int, int]], Batch]]:
    bs = max(1, cfg.val_batch_size)
    for k in range(0, len(items), bs):
        chunk = list(items[k : k + bs])
        spec = BatchSpec(
            scale=scale,
            rows=tuple(i[0] for i in chunk),
            cols=tuple(i[1] for i in chunk),
            year0=tuple(i[2] for i in chunk),
            rot=(0,) * len(chunk),
            flip=(False,) * len(chunk),
        )
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


def _val_score(model_s: dict[int, dict[str, float]], base: dict[int, dict[str, Any]], scales: Sequence[int]) -> float:
    """Validation score: model Nonzero-MAE / best baseline's, averaged over scales with weights
    ``1 / s`` (the smallest scales, closest to the 100 m task, weigh most). Below 1 the model wins."""
    w = np.array([1.0 / s for s in scales])
    r = np.array([model_s[s]["nonzero_mae"] / max(base[s]["best"]["nonzero_mae"], 1e-12) for s in scales])
    return float((w * r).sum() / w.sum())


def selection(history: list[dict[str, Any]], base: dict[int, dict[str, Any]], scales: Sequence[int],
              initial_score: float | None = None) -> dict[str, Any]:
    """What ``downscale --method auto`` uses: the model if its best validation score is below 1
    (it beats the best baseline on held-out blocks), else the baseline that validated best at the
    smallest scale; with the reason in words."""
    s0 = min(scales)
    best_base = base[s0]["best_label"]
    scores = [float(h["val_score"]) for h in history] + ([float(initial_score)] if initial_score is not None else [])
    if not scores:
        return {"method": best_base, "reason": "no epoch finished; the best baseline on validation is used"}
    score = min(scores)
    if score < 0.99:  # 1 % better than the best baseline (the untrained network is the fitted mix)
        return {"method": "model", "score": score,
                "reason": f"the model's held-out Nonzero-MAE is {score:.3f} x the best baseline's (validation, parent level)"}
    return {"method": best_base, "score": score,
            "reason": f"the model did not beat the best baseline on held-out validation (ratio {score:.3f}); "
                      f"{best_base} validated best at s={s0}"}


def _model_scores(model: Any, items: list[tuple[int, int, int]], scales: Sequence[int], main: MainData, cache: AuxCache, cfg: TrainConfig, t: int, device: Any, autocast: Any) -> dict[int, dict[str, float]]:
    import torch

    from models.physics import block_sum

    f = cfg.factor
    was_training = model.training
    model.eval()
    out: dict[int, dict[str, float]] = {}
    try:
        with torch.no_grad():
            for s in scales:
                preds, truths = [], []
                for _, b in _val_batches(items, s, main, cache, cfg, t):
                    aux = torch.from_numpy(b.aux).to(device)
                    mi = torch.from_numpy(b.main).to(device)
                    with autocast():
                        raw, _ = model(aux, mi, context_block=s * f)
                    children = _children(model, raw, torch.from_numpy(b.totals).to(device), s * f)
                    parent = block_sum(children, f).cpu().numpy()
                    preds.append(parent[b.mask])
                    truths.append(b.truth[b.mask])
                out[s] = _scores(np.concatenate(preds), np.concatenate(truths))
    finally:
        model.train(was_training)
    return out


def _children(model: Any, raw: Any, totals: Any, block: int) -> Any:
    """Linear child totals (float64) from the model's raw output, by its allocation (see
    :func:`models.dasymetric.children_from_raw`)."""
    from models.dasymetric import children_from_raw

    cfg = model.config
    return children_from_raw(raw, totals, block, getattr(cfg, "allocation", "water_fill"), getattr(cfg, "use_physics", True))


def training_step(
    model: Any,
    batch: Batch,
    loss_fn: Any,
    optimizer: Any,
    scheduler: Any,
    *,
    device: Any,
    autocast: Any,
    factor: int,
    moe_weight: float,
    grad_clip: float,
    mass_weight: float = 0.0,
    log_loss_weight: float = 1.0,
) -> float:
    """One optimisation step on a batch; returns the loss (float).

    The model predicts log1p child totals from ``batch.aux [B, C, T, P, P]`` and
    ``batch.main``; children are water-filled onto ``batch.totals`` (``block = s * factor``),
    sum-pooled to parent cells and compared with ``batch.truth`` in the log domain.
    """
    import torch

    from models.physics import block_sum

    aux = torch.from_numpy(batch.aux).to(device, non_blocking=True)
    mi = torch.from_numpy(batch.main).to(device, non_blocking=True)
    totals = torch.from_numpy(batch.totals).to(device, non_blocking=True)
    truth = torch.from_numpy(batch.truth).to(device, non_blocking=True)
    mask = torch.from_numpy(batch.mask).to(device, non_blocking=True)
    with autocast():
        raw, _ = model(aux, mi, context_block=batch.scale * factor)
    children = _children(model, raw, totals, batch.scale * factor)
    parent = block_sum(children, factor)
    loss = loss_fn(torch.log1p(parent.clamp(min=0)), torch.log1p(truth.double()), mask)
    if log_loss_weight != 1.0:
        loss = loss * log_loss_weight
    if mass_weight:
        m = mask.to(parent.dtype)
        t = torch.nan_to_num(truth.double(), nan=0.0)
        err = (torch.nan_to_num(parent, nan=0.0) - t).abs()
        loss = loss + mass_weight * (err * m).sum() / (t * m).sum().clamp(min=1e-12)
    aux_loss = getattr(model, "aux_loss", None)
    if moe_weight and aux_loss is not None and torch.is_tensor(aux_loss) and aux_loss.requires_grad:
        loss = loss + moe_weight * aux_loss.double()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


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
    model_s = _model_scores(loaded.model, items, cfg.val_scales, main, cache, cfg, t, dev, _autocast_factory(dev, "fp32"))
    return {s: {"model": model_s[s], **{k: v for k, v in base[s].items() if k != "all_dasymetric"}} for s in cfg.val_scales}


def _autocast_factory(device: Any, precision: str) -> Any:
    import contextlib

    import torch

    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


# --------------------------------------------------------------------------- reporting


def _history_row(epoch: int, global_step: int, train_loss: float, lr: float, elapsed: float, model_s: dict, base: dict, scales: Sequence[int], score: float, best: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"epoch": epoch, "global_step": global_step, "train_loss": train_loss, "lr": lr, "time_s": round(elapsed, 2)}
    for s in scales:
        for k in METRIC_KEYS:
            row[f"s{s}_model_{k}"] = model_s[s][k]
            row[f"s{s}_uniform_{k}"] = base[s]["uniform"][k]
            row[f"s{s}_dasy_{k}"] = base[s]["dasymetric"][k]
            row[f"s{s}_best_{k}"] = base[s]["best"][k]
        row[f"s{s}_dasy_layer"] = base[s]["dasy_layer"]
        row[f"s{s}_best_label"] = base[s]["best_label"]
        if "fitted" in base[s]:
            row[f"s{s}_fitted_nonzero_mae"] = base[s]["fitted"]["nonzero_mae"]
        row[f"s{s}_ratio_model_dasy"] = model_s[s]["nonzero_mae"] / max(base[s]["dasymetric"]["nonzero_mae"], 1e-12)
        row[f"s{s}_ratio_model_best"] = model_s[s]["nonzero_mae"] / max(base[s]["best"]["nonzero_mae"], 1e-12)
    row["val_score"] = score
    row["is_best"] = int(best)
    return row


def _write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    from carbonsr_cli.atomic import atomic_write_bytes

    if not history:
        return
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for row in history:
        w.writerow(row)
    atomic_write_bytes(path, buf.getvalue().encode())


def _epoch_table(row: dict[str, Any], scales: Sequence[int], epochs: int) -> Any:
    from rich.table import Table

    table = Table(title=f"epoch {row['epoch']}/{epochs}  step {row['global_step']}  train loss {row['train_loss']:.4f}", title_justify="left")
    table.add_column("scale")
    table.add_column("method")
    for k, label in zip(METRIC_KEYS, ("Nonzero-MAE", "Balanced MAE", "Top-1% NZ-MAE", "Top-5% NZ-MAE")):
        table.add_column(label, justify="right")
    for s in scales:
        for method, key in (("model", "model"), (f"best baseline ({row[f's{s}_best_label']})", "best"), ("uniform", "uniform"), (f"dasymetric ({row[f's{s}_dasy_layer']})", "dasy")):
            table.add_row(f"s={s}", method, *(f"{row[f's{s}_{key}_{k}']:.4g}" for k in METRIC_KEYS))
    return table


def _plot(path: Path, history: list[dict[str, Any]], scales: Sequence[int]) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from carbonsr_cli.atomic import atomic_path

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 1 + len(scales), figsize=(4.5 * (1 + len(scales)), 3.6))
    axes[0].plot(ep, [h["train_loss"] for h in history], marker="o")
    axes[0].set_title("training loss")
    axes[0].set_xlabel("epoch")
    for ax, s in zip(axes[1:], scales):
        for key, label in (("model", "model"), ("uniform", "uniform"), ("dasy", "best dasymetric")):
            ax.plot(ep, [h[f"s{s}_{key}_nonzero_mae"] for h in history], marker="o", label=label)
        ax.set_title(f"validation Nonzero-MAE, s={s}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("t CO2 / parent cell / yr")
        ax.legend()
    fig.tight_layout()
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- main entry


def _merge_resume_config(cfg: TrainConfig, ck: dict, path: Path) -> TrainConfig:
    """The checkpoint's configuration, with the :data:`RESUME_MUTABLE` fields the caller set.

    A mutable field counts as set when it differs from the ``TrainConfig`` default (so
    ``carbonsr train ... --resume latest`` without ``--epochs`` keeps the run's epochs);
    ``max_steps`` and ``max_time_s`` always come from the caller (limits of one invocation).
    """
    import dataclasses

    saved = TrainConfig.from_dict(ck["train_config"])
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(TrainConfig)}
    changes = {k: getattr(cfg, k) for k in RESUME_MUTABLE if k not in ("main", "aux") and getattr(cfg, k) != defaults.get(k)}
    changes["max_steps"] = cfg.max_steps  # limits of this invocation, never inherited
    changes["max_time_s"] = cfg.max_time_s
    if cfg.main:
        changes["main"] = cfg.main
    if cfg.aux:
        changes["aux"] = cfg.aux
    merged = saved.replace(**changes)
    merged.resume = str(path)
    merged.runs_dir = str(path.parent.parent)
    merged.name = path.parent.name
    return merged


def train(config: TrainConfig) -> RunResult:
    """Train (or resume) a model; see the module docstring for what is written where.

    Args:
        config: The run configuration. With ``config.resume`` set, the checkpoint's own
            configuration is used except for :data:`RESUME_MUTABLE` fields; the inputs
            (aux layer names and order, factor, T, model configuration) must match it.

    Returns:
        :class:`RunResult`.

    Raises:
        UsageError, InputDataError, CheckpointError, OutputError: user-fixable problems.
        KeyboardInterrupt: after Ctrl-C, once ``autosave_latest.pth`` is written.
    """
    import torch

    from carbonsr_cli.aux import AuxStack, categorical_kinds, discover_aux
    from carbonsr_cli.stats import AuxNormalizer, save_stats
    from carbonsr_cli import checkpoints as ckpt_mod
    from carbonsr_cli.train.resume import resolve_resume
    from models.config import preset as model_preset
    from models.losses import DualLayerWeightedLoss
    from models.network import DSTCarbonFormer

    cfg = TrainConfig.from_dict(config.to_dict())
    resume_path = resolve_resume(cfg.resume, cfg.runs_dir, cfg.name)
    ck: dict | None = None
    if resume_path is not None:
        ck = ckpt_mod.load_checkpoint(resume_path)
        cfg = _merge_resume_config(cfg, ck, resume_path)
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    from carbonsr_cli import distributed

    dist_ctx = distributed.context(use_cuda=device.type == "cuda")  # torchrun: DDP (no-op otherwise)
    device = dist_ctx.device(device)
    autocast = _autocast_factory(device, cfg.precision)
    scales = parse_scales(cfg.scales, cfg.patch)

    main = load_main(cfg.main)
    n_years = len(main.years)
    t = cfg.years_window or default_years_window(cfg.preset, n_years)
    if t > n_years:
        raise UsageError(f"--years-window {t} is larger than the number of years in the main raster ({n_years})")
    grid = main.grid
    child = grid.child(cfg.factor)

    if ck is not None:
        run_dir = resume_path.parent  # type: ignore[union-attr]
    else:
        run_dir = dist_ctx.from_main(lambda: _new_run_dir(cfg))
    handler = _setup_logging(run_dir) if dist_ctx.is_main else logging.NullHandler()
    t_setup = time.perf_counter()
    try:
        stack = AuxStack(discover_aux(cfg.aux, kinds=categorical_kinds(cfg.categorical)), child, main.years, fill_missing=cfg.fill_missing)
    except BaseException:
        log.removeHandler(handler)
        handler.close()
        raise
    try:
        if ck is not None:
            ckpt_mod.check_compatible(ck, resume_path, aux_names=stack.names, factor=cfg.factor, years_window=t)  # type: ignore[arg-type]
            stats = dict(ck["stats"])
            split = Split.from_dict(ck["split"])
            if (split.height, split.width) != (grid.height, grid.width):
                raise CheckpointError(
                    f"checkpoint was trained on a {split.height}x{split.width} grid, the main raster is {grid.height}x{grid.width}",
                    resume_path,
                )
            log.info("resuming from %s (epoch %s, step %s)", resume_path, ck.get("epoch"), ck.get("step"))
        else:
            stats = dist_ctx.from_main(lambda: _stats_for_run(cfg, main, stack, run_dir))
            valid = main.valid_all_years
            if cfg.val_region:
                mask, method = parse_val_region(cfg.val_region, grid.transform, grid.height, grid.width, grid.crs)
                split = make_region_split(mask, patch=cfg.patch, valid=valid, max_nodata=cfg.max_nodata, method=method, source=cfg.val_region)
            else:
                split = make_block_split(
                    grid.height, grid.width, patch=cfg.patch, block_patches=cfg.block_patches,
                    val_fraction=cfg.val_fraction, seed=cfg.seed, valid=valid, max_nodata=cfg.max_nodata,
                )
            if dist_ctx.is_main:
                save_stats(stats, run_dir / "stats.json")
                _write_json(run_dir / "split.json", split.to_dict())
        norm = AuxNormalizer.from_stats(stats, stack.names)
        cache = AuxCache.build(
            stack, norm.apply, child.shape, n_years,
            cache_dir=run_dir / dist_ctx.rank_name("cache"), ram_limit_bytes=int(cfg.cache_ram_gb * (1 << 30)),
        )
        positions = split.train_positions(main.valid_all_years)
        sampler = PatchSampler(positions, n_years, t, scales, cfg.batch_size, cfg.seed, cfg.augment)
        items = _val_items(split, n_years, t, cfg.max_val_windows)
        net_cfg = model_preset(cfg.preset, aux_channels=cache.channels, **cfg.model_overrides)
        prior_fit = fit_prior_on_cache(cache, main, ~split.forbidden_mask(), norm, cfg.factor,
                                       exponents=tuple(cfg.model_overrides.get("prior_exponents", DEFAULT_EXPONENTS)),
                                       smooth=tuple(cfg.model_overrides.get("prior_smooth", DEFAULT_SMOOTH)),
                                       mass=net_cfg.use_prior and net_cfg.prior_kind == "mass", mass_hidden=net_cfg.mass_hidden, seed=cfg.seed)
        if prior_fit.mass is not None:
            log.info("fitted mass prior on %d training parent cells (log-abs error of block sums %.4f)", prior_fit.mass["blocks"], prior_fit.mass["loss"])
        log.info("fitted layer mix on %d training parent cells (basis %s; share loss %.4f): %s",
                 prior_fit.cells, prior_fit.basis, prior_fit.share_loss,
                 ", ".join(f"{k} {v:.0%}" for k, v in list(prior_fit.terms.items())[:6]))
        baselines = _baseline_scores(items, cfg.val_scales, main, cache, stack, cfg, t, fitted=build_fitted_prior(prior_fit, norm))
    except BaseException:
        stack.close()
        log.removeHandler(handler)
        handler.close()
        raise
    stack.close()
    log.info(
        "setup %.1fs: grid %dx%d parent cells, %d years, T=%d, %d aux layers, %d training positions, %d validation items",
        time.perf_counter() - t_setup, grid.height, grid.width, n_years, t, cache.channels, len(positions), len(items),
    )

    # ---------------------------------------------------------------- model and optimiser
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    import random as _random

    _random.seed(cfg.seed)
    overrides = dict(cfg.model_overrides)
    overrides.setdefault("max_years", max(t, 1))
    overrides.setdefault("context_pool", cfg.factor)
    mcfg = model_preset(cfg.preset, aux_channels=cache.channels, **overrides)
    if ck is not None:
        ckpt_mod.check_compatible(ck, resume_path, model_config=mcfg.to_dict())  # type: ignore[arg-type]
    model = DSTCarbonFormer(mcfg)
    if model.prior is not None:  # start at the fitted baseline (resume: overwritten by the checkpoint)
        model.prior.load_state_dict(build_network_prior(prior_fit, norm, mcfg.prior_kind).state_dict())
    model = model.to(device)
    total_steps = cfg.epochs * cfg.steps_per_epoch
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    warm, floor = max(0, cfg.warmup_steps), cfg.min_lr_ratio

    def lr_lambda(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        span = max(1, total_steps - warm)
        prog = min(1.0, (step - warm) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    st_main = stats.get("main", {})
    loss_fn = DualLayerWeightedLoss(
        float(st_main.get("log_nz_over_nnz", 0.0)), float(st_main.get("cv_log", 0.0)), mean_log=st_main.get("mean_log") or None
    )

    epoch, step, global_step = 0, 0, 0
    history: list[dict[str, Any]] = []
    if ck is not None:
        model.load_state_dict(ck["model_state"])
        optimizer.load_state_dict(ck["optimizer_state"])
        scheduler.load_state_dict(ck["scheduler_state"])
        epoch, step, global_step = int(ck["epoch"]), int(ck["step"]), int(ck["global_step"])
        history = [dict(h) for h in ck.get("metric_history", [])]
        ckpt_mod.restore_rng_state(ck["rng_state"])
    elif dist_ctx.is_main:
        _write_json(
            run_dir / "config.json",
            {"train_config": cfg.to_dict(), "model_config": mcfg.to_dict(), "aux_names": list(cache.names), "years": main.years,
             "years_window": t, "factor": cfg.factor, "software_version": __version__},
        )
    best_score = min((h["val_score"] for h in history), default=None)
    train_model = dist_ctx.wrap_model(model)  # DDP under torchrun; the model itself otherwise
    loss_fn = dist_ctx.shard_loss(loss_fn)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %d parameters on %s", cfg.preset, n_params, device)

    def payload(ep: int, st: int) -> dict[str, Any]:
        return {
            "model_config": mcfg.to_dict(),
            "model_state": model.state_dict(),
            "aux_names": list(cache.names),
            "stats": stats,
            "factor": cfg.factor,
            "years_window": t,
            "train_config": cfg.to_dict(),
            "epoch": ep,
            "step": st,
            "global_step": global_step,
            "optimizer_state": optimizer.state_dict(),
            "scheduler_state": scheduler.state_dict(),
            "scaler_state": {},
            "rng_state": ckpt_mod.capture_rng_state(),
            "sampler_state": sampler.state(ep, st),
            "split": split.to_dict(),
            "prior_fit": prior_fit.to_dict(),
            "selection": selection(history, baselines, cfg.val_scales, initial_score),
            "initial_val_score": initial_score,
            "metric_history": history,
            "years": list(main.years),
        }

    def link_or_save(src: Path, dest: Path, data: dict | None = None) -> None:
        """Make ``dest`` a second name of ``src`` atomically (hard link), else write it again."""
        tmp = dest.with_name(f".{dest.name}.link.tmp")
        try:
            if tmp.exists():
                tmp.unlink()
            os.link(src, tmp)
            os.replace(tmp, dest)
        except OSError:
            if tmp.exists():
                tmp.unlink()
            ckpt_mod.save_checkpoint(dest, data if data is not None else ckpt_mod.load_checkpoint(src))

    last_ckpt: list[Path] = []

    def autosave(ep: int, st: int, rotate: bool = True) -> None:
        if not dist_ctx.is_main:  # rank 0 writes; the others wait until the file is complete
            last_ckpt.append(run_dir / "autosave_latest.pth")
            dist_ctx.barrier()
            return
        data = payload(ep, st)
        if rotate:
            p = run_dir / f"autosave_step_{global_step}.pth"
            ckpt_mod.save_checkpoint(p, data)
            link_or_save(p, run_dir / "autosave_latest.pth", data)
            olds = sorted(run_dir.glob("autosave_step_*.pth"), key=lambda q: int(q.stem.rsplit("_", 1)[1]))
            for q in olds[: -cfg.keep_autosaves]:
                q.unlink(missing_ok=True)
        else:
            ckpt_mod.save_checkpoint(run_dir / "autosave_latest.pth", data)
        last_ckpt.append(run_dir / "autosave_latest.pth")
        log.info("autosave at epoch %d step %d (global step %d)", ep, st, global_step)
        dist_ctx.barrier()

    def make_batch(ep: int, st: int) -> Batch:
        return build_batch(dist_ctx.shard_spec(sampler.spec(ep, st)), main, cache, factor=cfg.factor, patch=cfg.patch, years_window=t)

    stopped = "completed"
    # The network starts at its fitted prior: score that state and keep it as best_model.pth, so
    # that training can only replace it with a state that validates better.
    initial_score = ck.get("initial_val_score") if ck is not None else None
    if ck is None and model.prior is not None:
        model_s0 = dist_ctx.broadcast(_model_scores(model, items, cfg.val_scales, main, cache, cfg, t, device, autocast))
        initial_score = _val_score(model_s0, baselines, cfg.val_scales)
        log.info("initial state (the fitted prior): val score %.4f", initial_score)
        if getattr(model.prior, "reset_correction", None) is not None and initial_score >= 0.99:
            # The per-pixel correction of the mix did not validate 1 % better than the best
            # baseline on the held-out windows: start from the fitted mix alone (measured on the
            # generated regions: the correction helps where roads and land cover multiply, as in
            # the traffic kind, and costs ~10 % at 100 m on smooth urban regions; the held-out
            # 1 km score told the two apart there, see benchmarks/README.md).
            model.prior.reset_correction()
            model_s0 = dist_ctx.broadcast(_model_scores(model, items, cfg.val_scales, main, cache, cfg, t, device, autocast))
            log.info("the mass prior's correction did not beat the best baseline on validation (%.4f); "
                     "the network starts at the fitted mix: val score %.4f", initial_score, _val_score(model_s0, baselines, cfg.val_scales))
            initial_score = _val_score(model_s0, baselines, cfg.val_scales)
        if dist_ctx.is_main:
            ckpt_mod.save_checkpoint(run_dir / "best_model.pth", payload(0, 0))
        dist_ctx.barrier()
    if initial_score is not None and (best_score is None or initial_score < best_score):
        best_score = float(initial_score)
    t0 = time.perf_counter()
    f = cfg.factor
    from carbonsr_cli.console import err, out

    show = cfg.progress
    with _Interrupt(patient=dist_ctx.active) as intr:
        while epoch < cfg.epochs:
            model.train()
            losses: list[float] = []
            keys = ((epoch, s) for s in range(step, cfg.steps_per_epoch))
            prefetch = Prefetcher(make_batch, keys, workers=cfg.workers)
            halt: str | None = None
            try:
                for b in prefetch:
                    loss = training_step(
                        train_model, b, loss_fn, optimizer, scheduler, device=device, autocast=autocast,
                        factor=f, moe_weight=cfg.moe_weight, grad_clip=cfg.grad_clip, mass_weight=cfg.mass_weight, log_loss_weight=cfg.log_loss_weight,
                    )
                    step += 1
                    global_step += 1
                    lv = dist_ctx.mean_float(loss)  # global-batch loss (rank shares summed)
                    if not math.isfinite(lv):
                        raise UsageError(
                            f"training diverged (loss {lv}) at epoch {epoch} step {step}; try a smaller --lr "
                            f"(now {cfg.lr}) or --precision fp32"
                        )
                    losses.append(lv)
                    if global_step % cfg.autosave_every == 0:
                        autosave(epoch, step)
                    if intr.flag:
                        halt = "interrupted"
                    elif cfg.max_steps is not None and global_step >= cfg.max_steps:
                        halt = "max_steps"
                    elif cfg.max_time_s is not None and time.perf_counter() - t0 >= cfg.max_time_s:
                        halt = "max_time"
                    halt = dist_ctx.agree_halt(halt)
                    if halt:
                        break
            finally:
                prefetch.close()
            if halt:
                if not (last_ckpt and global_step % cfg.autosave_every == 0):
                    autosave(epoch, step, rotate=False)
                log.info("stopped (%s) at epoch %d step %d", halt, epoch, step)
                if halt == "interrupted":
                    log.removeHandler(handler)
                    handler.close()
                    err.print(f"interrupted: saved {run_dir / 'autosave_latest.pth'}; continue with `carbonsr resume {run_dir}`")
                    raise KeyboardInterrupt
                stopped = halt
                break

            # ----------------------------------------------------------- epoch end
            model_s = dist_ctx.broadcast(_model_scores(model, items, cfg.val_scales, main, cache, cfg, t, device, autocast))
            score = _val_score(model_s, baselines, cfg.val_scales)
            # Replacing the fitted prior needs a clear margin: the parent-level score is a noisy
            # proxy of 100 m accuracy (measured: small proxy gains often were 100 m losses).
            at_prior = initial_score is not None and best_score is not None and best_score >= float(initial_score)
            need = best_score * (1.0 - cfg.select_margin) if (best_score is not None and at_prior) else best_score
            improved = need is None or score < need
            train_loss = float(np.mean(losses)) if losses else float("nan")
            row = _history_row(epoch + 1, global_step, train_loss, scheduler.get_last_lr()[0], time.perf_counter() - t0, model_s, baselines, cfg.val_scales, score, improved)
            history.append(row)
            epoch += 1
            step = 0
            last_ckpt.append(run_dir / "latest.pth")
            if improved:
                best_score = score
            if dist_ctx.is_main:  # torchrun: run files from rank 0 only
                data = payload(epoch, 0)
                ckpt_mod.save_checkpoint(run_dir / "latest.pth", data)
                if epoch % cfg.snapshot_every == 0:
                    link_or_save(run_dir / "latest.pth", run_dir / f"epoch_{epoch:03d}.pth", data)
                if improved:
                    link_or_save(run_dir / "latest.pth", run_dir / "best_model.pth", data)
                _write_metrics_csv(run_dir / "metrics.csv", history)
            dist_ctx.barrier()
            log.info(
                "epoch %d: loss %.4f, val score %.4g%s; %s", epoch, train_loss, score, " (best)" if improved else "",
                ", ".join(f"s={s}: model {model_s[s]['nonzero_mae']:.4g} / best baseline {baselines[s]['best']['nonzero_mae']:.4g} ({baselines[s]['best_label']}) / uniform {baselines[s]['uniform']['nonzero_mae']:.4g}" for s in cfg.val_scales),
            )
            if show:
                out.print(_epoch_table(row, cfg.val_scales, cfg.epochs))
            if cfg.patience and len(history) > cfg.patience:
                recent_best = min(h["val_score"] for h in history[-cfg.patience :])
                earlier_best = min(h["val_score"] for h in history[: -cfg.patience])
                if recent_best >= earlier_best:
                    stopped = "early_stop"
                    log.info("early stop: no improvement in %d epochs", cfg.patience)
                    break
            if dist_ctx.any(intr.flag):
                autosave(epoch, 0, rotate=False)
                log.removeHandler(handler)
                handler.close()
                raise KeyboardInterrupt
            if cfg.max_steps is not None and global_step >= cfg.max_steps and epoch < cfg.epochs:
                stopped = "max_steps"
                autosave(epoch, 0, rotate=False)
                break
    try:
        if dist_ctx.is_main:
            _plot(run_dir / "training_curves.png", history, cfg.val_scales)
    except Exception as exc:  # noqa: BLE001 - a plot must never fail a finished run
        log.warning("could not draw the training curves: %s", exc)
    log.info("finished (%s): %d epochs, %d steps, best val score %s", stopped, epoch, global_step, best_score)
    log.removeHandler(handler)
    handler.close()
    best_path = run_dir / "best_model.pth"
    return RunResult(
        run_dir=run_dir,
        best_path=best_path if best_path.exists() else None,
        best_score=best_score,
        epochs_done=epoch,
        global_step=global_step,
        stopped=stopped,
        history=history,
        last_checkpoint=last_ckpt[-1] if last_ckpt else None,
        initial_score=float(initial_score) if initial_score is not None else None,
    )


def evaluate_against_truth(
    checkpoint: str | os.PathLike[str],
    truth_path: str | os.PathLike[str],
    *,
    device: str = "cpu",
    batch_size: int = 8,
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

    Returns:
        ``{"model": metrics, "cells": n}`` plus the keys of :func:`_summarise_baselines`
        (``uniform``, ``dasymetric``, ``dasy_layer``, ``all_dasymetric``, ``points``,
        ``points_layer``, ``fitted``, ``best``, ``best_label``, ``all``), metrics as in
        :func:`_scores` (t CO2 / child cell / yr).
    """
    import torch
    from rasterio.windows import Window

    from carbonsr_cli.aux import AuxStack, categorical_kinds, discover_aux
    from carbonsr_cli.rasters import open_raster, read_window
    from carbonsr_cli.stats import AuxNormalizer
    from carbonsr_cli.checkpoints import load_checkpoint, load_model_for_inference
    from carbonsr_cli.train.dataset import degrade
    from models.dasymetric import softmax_children

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
    with AuxStack(discover_aux(cfg.aux, kinds=categorical_kinds(cfg.categorical)), child, main.years, fill_missing=cfg.fill_missing) as stack, open_raster(truth_path) as tds:
        if (tds.height, tds.width) != child.shape:
            raise UsageError(f"truth grid {tds.height}x{tds.width} does not match the child grid {child.shape}", truth_path)
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
            layers_all = torch.from_numpy(raw).double().movedim(1, 0)[:, :, None]  # [C, B, 1, T, P, P]
            for v in variants:
                idx = layer_idx[v.label]
                kids = v.method.fill(tt.double(), layers_all[idx] if idx else None, f)
                preds.setdefault(v.label, []).append(kids.numpy()[mask])
            truths.append(truth[mask])
    y = np.concatenate(truths)
    every = {k: _scores(np.concatenate(v), y) for k, v in preds.items()}
    return {"model": every.pop("model"), **_summarise_baselines(every), "cells": int(y.size)}
