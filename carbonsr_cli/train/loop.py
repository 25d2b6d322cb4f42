"""The training loop: ``train(TrainConfig) -> RunResult``.

One run directory (``<runs_dir>/<run-id>/``) holds ``config.json``, ``stats.json``,
``split.json``, ``metrics.csv``, ``train.log``, ``training_curves.png`` and the
checkpoints (see :mod:`.checkpoints`):

- ``autosave_step_<n>.pth`` every ``autosave_every`` steps (the last ``keep_autosaves``
  kept) and ``autosave_latest.pth`` (the newest autosave; also written on Ctrl-C, at
  ``max_steps`` and at ``max_time_s``);
- ``latest.pth`` at the end of every epoch (after validation);
- ``epoch_<nnn>.pth`` every ``snapshot_every`` epochs (permanent);
- ``best_model.pth`` whenever the validation score improves (first the untrained network);
- ``prior_model.pth``: the untrained network (a network with a fitted prior starts at it), kept
  so that what training changed can be scored against it.

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

import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from carbonsr_cli import __version__
from carbonsr_cli.distributed import halt_agreement_due
from carbonsr_cli.errors import CheckpointError, OutputError, UsageError
from carbonsr_cli.train.config import RESUME_MUTABLE, TrainConfig, default_years_window
from carbonsr_cli.train.dataset import AuxCache, Batch, MainData, PatchSampler, Prefetcher, build_batch, load_main, parse_scales
from carbonsr_cli.methods.points import listed_point_channels
from carbonsr_cli.train.prior_fit import build_fitted_prior, build_network_prior, build_point_sites, fit_prior_on_cache
from carbonsr_cli.train.reporting import _epoch_table, _history_row, _plot, _setup_logging, _write_json, _write_metrics_csv
from carbonsr_cli.train.split import Split, make_block_split, make_region_split, parse_val_region
from carbonsr_cli.train.step import (
    CompiledUNet, LossTracker, Throughput, compile_wanted, contiguous_state, match_conv_layout, training_step,
)
from carbonsr_cli.train.step import autocast_factory as _autocast_factory
from carbonsr_cli.train.validation import (  # noqa: F401 - re-exported for callers of train.loop
    METRIC_KEYS,
    _baseline_scores,
    _children,
    _host_variants,
    _model_scores,
    _scores,
    _summarise_baselines,
    _val_items,
    _val_score,
    evaluate_against_truth,
    evaluate_split,
    score_initial_state,
    selection,
)
from models.dasymetric import DEFAULT_EXPONENTS, DEFAULT_SMOOTH

from carbonsr_cli.devices import resolve_device  # re-exported for callers of train.loop

__all__ = ["RunResult", "train", "training_step", "resolve_device", "evaluate_split", "evaluate_against_truth"]

log = logging.getLogger("carbonsr.train")


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
        throughput: Training speed of this invocation after a warm-up (``patches_per_s`` of the
            global batch, ``steps``, ``seconds``, ``data_wait_share``, ``global_batch``), None
            when too few steps ran.
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
    throughput: dict[str, float] | None = None

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


# --------------------------------------------------------------------------- main entry


def _merge_resume_config(cfg: TrainConfig, ck: dict, path: Path) -> TrainConfig:
    """The checkpoint's configuration, with the :data:`RESUME_MUTABLE` fields the caller set.

    A mutable field counts as set when it differs from the ``TrainConfig`` default (so
    ``carbonsr train ... --resume latest`` without ``--epochs`` keeps the run's epochs);
    ``max_steps`` and ``max_time_s`` always come from the caller (limits of one invocation).
    """
    import dataclasses

    saved = TrainConfig.from_dict(ck["train_config"])
    if "fit_buffer" not in ck["train_config"]:  # written before session 13: its fits kept the split's buffer
        saved.fit_buffer = None
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
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # --device cuda:1: CUDA graphs and events use the current device
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
                    val_fraction=cfg.val_fraction, seed=cfg.seed if cfg.split_seed is None else cfg.split_seed, valid=valid, max_nodata=cfg.max_nodata,
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
        overrides = dict(cfg.model_overrides)
        overrides.setdefault("max_years", max(t, 1))
        overrides.setdefault("context_pool", cfg.factor)
        point_channels = listed_point_channels(stack.names, getattr(stack, "point_names", ()))
        mcfg = model_preset(cfg.preset, aux_channels=cache.channels, **overrides)
        sites_on = mcfg.allocation == "dasymetric" and mcfg.use_prior and mcfg.point_sites
        prior_fit = fit_prior_on_cache(cache, main, ~split.forbidden_mask(cfg.fit_buffer), norm, cfg.factor,
                                       exponents=tuple(cfg.model_overrides.get("prior_exponents", DEFAULT_EXPONENTS)),
                                       smooth=tuple(cfg.model_overrides.get("prior_smooth", DEFAULT_SMOOTH)),
                                       mass=mcfg.use_prior and mcfg.prior_kind == "mass", mass_hidden=mcfg.mass_hidden, mass_members=mcfg.mass_members, seed=cfg.seed,
                                       mass_steps=cfg.mass_fit_steps, mass_smooth=mcfg.mass_smooth, mass_trend=cfg.mass_trend,
                                       point_channels=tuple(point_channels) if sites_on else ())
        if mcfg.point_sites and prior_fit.sites is None:  # no listed layer, or no listed point in the region
            mcfg = model_preset(cfg.preset, aux_channels=cache.channels, **{**overrides, "point_sites": False})
        if prior_fit.sites is not None:
            sig = sorted(zip(stack.names, prior_fit.sites["signature"]), key=lambda kv: -kv[1])
            log.info("point sites: %d listed point cells; surface fitted on %d parent cells without one (%d left out as unlisted "
                     "sources: above %.3g x the surface); site signature: %s",
                     prior_fit.sites["point_cells"], prior_fit.sites["cells"], prior_fit.sites.get("outliers", 0),
                     prior_fit.sites.get("unlisted_ratio", 0.0), ", ".join(f"{n} {v:.0%}" for n, v in sig[:4] if v > 0))
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
    if ck is not None:
        ckpt_mod.check_compatible(ck, resume_path, model_config=mcfg.to_dict())  # type: ignore[arg-type]
    model = DSTCarbonFormer(mcfg)
    if model.prior is not None:  # start at the fitted baseline (resume: overwritten by the checkpoint)
        model.prior.load_state_dict(build_network_prior(prior_fit, norm, mcfg.prior_kind).state_dict())
        if model.sites is not None:
            sites = build_point_sites(prior_fit, norm, mcfg.site_window, mcfg.site_delta, mcfg.site_point_weight, mcfg.site_unlisted)
            model.sites.load_state_dict(sites.state_dict())
    model = model.to(device)
    if device.type == "cuda":
        match_conv_layout(model)
    total_steps = cfg.epochs * cfg.steps_per_epoch
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
        # CUDA: one fused kernel per parameter group instead of a dozen foreach launches (the
        # step is host-bound there); the CPU keeps the foreach path (results unchanged).
        fused=device.type == "cuda",
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

    mass_gate: dict[str, Any] = {}  # the mass prior's correction: both initial scores and the strength kept

    def payload(ep: int, st: int) -> dict[str, Any]:
        return {
            "model_config": mcfg.to_dict(),
            "model_state": contiguous_state(model),
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
            "selection": selection(history, baselines, cfg.val_scales, initial_score, initial_vs_uniform),
            "initial_val_score": initial_score,
            "initial_vs_uniform": initial_vs_uniform,
            "mass_gate": dict(mass_gate),
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

    # CUDA: float16 aux (converted exactly on the device) in page-locked memory, prepared by the
    # worker threads; the host never waits for a step inside an epoch (losses in LossTracker).
    on_cuda = device.type == "cuda"
    batch_kw: dict[str, Any] = dict(aux_dtype=np.float16, pin=True) if on_cuda else {}

    def make_batch(ep: int, st: int) -> Batch:
        return build_batch(dist_ctx.shard_spec(sampler.spec(ep, st)), main, cache, factor=cfg.factor, patch=cfg.patch,
                           years_window=t, **batch_kw)

    planned = (cfg.epochs * cfg.steps_per_epoch - global_step) if cfg.max_steps is None else min(cfg.max_steps - global_step, cfg.epochs * cfg.steps_per_epoch - global_step)
    unet = CompiledUNet(model, device) if compile_wanted(cfg.compile, device, model, planned) else None
    if unet is not None:
        log.info("the U-Net is compiled with torch.compile%s for the training steps (the first steps take longer)",
                 f" (mode {unet.mode})" if unet.mode else "")
    tracker = LossTracker(dist_ctx, cfg.lr, every=25 if on_cuda else 1)
    meter = Throughput(device, cfg.batch_size)

    def step_once(b: Batch) -> Any:
        kw = dict(device=device, autocast=autocast, factor=f, moe_weight=cfg.moe_weight, grad_clip=cfg.grad_clip,
                  mass_weight=cfg.mass_weight, log_loss_weight=cfg.log_loss_weight, sync=not on_cuda)
        if unet is None or unet.proven or not unet.enabled:
            return training_step(train_model, b, loss_fn, optimizer, scheduler, **kw)
        try:  # the first compiled step: fall back to eager if the compiler is unusable here
            loss = training_step(train_model, b, loss_fn, optimizer, scheduler, **kw)
        except Exception as exc:  # noqa: BLE001 - compile errors come in many types
            unet.failed(exc)
            return training_step(train_model, b, loss_fn, optimizer, scheduler, **kw)
        unet.proven = True
        return loss

    stopped = "completed"
    # The network starts at its fitted prior: score that state and keep it as best_model.pth, so
    # that training can only replace it with a state that validates better.
    initial_score = ck.get("initial_val_score") if ck is not None else None
    initial_vs_uniform = ck.get("initial_vs_uniform") if ck is not None else None
    mass_gate.update((ck or {}).get("mass_gate") or {})
    if ck is None and model.prior is not None:
        initial_score, initial_vs_uniform, gate = score_initial_state(
            model, lambda: _model_scores(model, items, cfg.val_scales, main, cache, cfg, t, device, autocast, dist_ctx),
            baselines, cfg.val_scales, cfg.mass_gate_ramp)
        mass_gate.update(gate)
        if dist_ctx.is_main:
            ckpt_mod.save_checkpoint(run_dir / "best_model.pth", payload(0, 0))
            link_or_save(run_dir / "best_model.pth", run_dir / "prior_model.pth")
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
            keys = ((epoch, s) for s in range(step, cfg.steps_per_epoch))
            prefetch = Prefetcher(make_batch, keys, workers=cfg.workers)
            halt: str | None = None
            batches = iter(prefetch)
            try:
                while True:
                    w0 = time.perf_counter()
                    b = next(batches, None)
                    if b is None:
                        break
                    meter.waited(time.perf_counter() - w0)
                    loss = step_once(b)
                    step += 1
                    global_step += 1
                    tracker.add(loss, epoch, step)  # global-batch loss (rank shares summed)
                    meter.after_step()
                    if global_step % cfg.autosave_every == 0:
                        tracker.flush()
                        autosave(epoch, step)
                    if intr.flag:
                        halt = "interrupted"
                    elif cfg.max_steps is not None and global_step >= cfg.max_steps:
                        halt = "max_steps"
                    elif cfg.max_time_s is not None and time.perf_counter() - t0 >= cfg.max_time_s:
                        halt = "max_time"
                    if dist_ctx.active:
                        # Stops are agreed on every few steps (one host round trip each); a
                        # reason seen between them stays true until the next one.
                        due = halt_agreement_due(global_step, halt, last_of_epoch=step == cfg.steps_per_epoch)
                        halt = dist_ctx.agree_halt(halt) if due else None
                    if halt:
                        break
                tracker.flush()
            finally:
                prefetch.close()
                meter.pause()
            losses = tracker.take()
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
            # torchrun: each rank scores a share of the windows; every rank gets the same scores
            model_s = _model_scores(model, items, cfg.val_scales, main, cache, cfg, t, device, autocast, dist_ctx)
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
    if unet is not None:
        unet.remove()
    speed = meter.result()
    if speed is not None:
        log.info("training speed after warm-up: %.1f patches/s (%d steps, global batch %d), waiting for data %.1f%%",
                 speed["patches_per_s"], speed["steps"], speed["global_batch"], 100 * speed["data_wait_share"])
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
        throughput=speed,
    )

