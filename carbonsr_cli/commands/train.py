"""``carbonsr train`` and ``carbonsr resume``: thin wrappers over ``carbonsr_cli.train.loop.train``."""

from __future__ import annotations

import dataclasses
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from carbonsr_cli.options import AuxGlobCommand, AuxPaths, Categorical, Device, fill_missing_option, quiet_option

TRAIN_EXAMPLE = "carbonsr train data/sample/emissions_1km.tif --aux 'data/sample/aux/*' --preset tiny --epochs 5"
RESUME_EXAMPLE = "carbonsr resume runs/run_20250101_120000"


def register(app: typer.Typer) -> None:
    """Add the ``train`` and ``resume`` commands to ``app``."""
    app.command(
        "train",
        cls=AuxGlobCommand,
        help=(
            "Train a downscaling model on your own 1 km raster(s) and aux layers (weak supervision: the "
            "1 km totals are coarsened and the model learns to recover them). Writes runs/<run-id>/ with "
            "checkpoints (best_model.pth for `carbonsr downscale --model`), metrics.csv, train.log and a plot. "
            "Ctrl-C saves an autosave and exits (continue with `carbonsr resume`). Shell globs work: "
            "paths after --aux (up to the next option) are aux inputs; main rasters go before --aux.\n\n"
            f"Example: {TRAIN_EXAMPLE}"
        ),
        short_help="Train a model on a 1 km raster and aux layers.",
    )(train_cmd)
    app.command(
        "resume",
        help=(
            "Continue an interrupted training run exactly where it stopped. RUN_DIR defaults to the most "
            "recent run under --runs-dir; on a terminal you can pick the checkpoint, otherwise the newest "
            "one is used.\n\n"
            f"Example: {RESUME_EXAMPLE}"
        ),
        short_help="Continue an interrupted training run.",
    )(resume_cmd)


def train_cmd(
    main: Annotated[list[Path], typer.Argument(help="Main raster: one GeoTIFF with a band per year, or one GeoTIFF per year (totals per cell).", show_default=False)],
    aux: AuxPaths = None,
    categorical: Categorical = None,
    preset: Annotated[str, typer.Option("--preset", help="Model: mass (the default: the fitted layer mix with trainable coefficients, times a per-pixel correction fitted to the 1 km totals, kept in full where that validates 20 % better than the mix alone and scaled down to nothing at 10 %; the most accurate at 100 m in our measurements, see README), prior (the mix alone, about 0.6 x the training time), or the full network tiny, base or large (a local head and a U-Net context path on top of the prior); or 'demo' (mass, the demo's short schedule).")] = "mass",
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Epochs to train.", show_default="20")] = None,
    steps_per_epoch: Annotated[Optional[int], typer.Option("--steps-per-epoch", min=1, help="Optimisation steps per epoch.", show_default="100")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Patches (120x120 child cells) per step.", show_default="8")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", min=0.0, help="Peak learning rate (AdamW, warm-up then cosine).", show_default="0.002")] = None,
    years_window: Annotated[Optional[int], typer.Option("--years-window", min=1, help="Years per patch T (default 1 for tiny, 3 otherwise).")] = None,
    scales: Annotated[Optional[str], typer.Option("--scales", help="Coarse scales in 1 km cells (divisors of 12) with optional weights: 12,4,2 or 12:0.5,4:0.25,2:0.25.", show_default="12:0.5,4:0.25,2:0.25")] = None,
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="Share of the region held out for validation (spatial blocks).", show_default="0.2")] = None,
    fit_buffer: Annotated[Optional[int], typer.Option("--fit-buffer", min=0, help="Parent (1 km) cells kept between the validation region and the cells the layer fits use (0: every other cell; training patches keep a buffer of one patch).", show_default="0")] = None,
    mass_fit_steps: Annotated[Optional[int], typer.Option("--mass-fit-steps", min=0, help="Steps of the per-pixel correction's fit (mass preset; fewer: faster, fitted less closely; 0: the layer mix alone).", show_default="600")] = None,
    val_region: Annotated[Optional[str], typer.Option("--val-region", help="Validation region instead of random blocks: minx,miny,maxx,maxy in the main raster's CRS, or a polygon file.")] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Directory holding run directories.")] = Path("runs"),
    name: Annotated[Optional[str], typer.Option("--name", help="Run directory name (default run_YYYYmmdd_HHMMSS).")] = None,
    device: Device = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split, the patches and the weights.")] = 0,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Train N runs, seeds SEED .. SEED+N-1 (each its own split, unless --split-seed, and run directory NAME-seedK), and report the spread of their held-out validation scores.")] = 1,
    split_seed: Annotated[Optional[int], typer.Option("--split-seed", help="Seed of the validation split alone (default: --seed). With --seeds, every run holds out the same blocks, so the spread is the training's alone.")] = None,
    autosave_every: Annotated[Optional[int], typer.Option("--autosave-every", min=1, help="Steps between autosaves.", show_default="200")] = None,
    keep_autosaves: Annotated[int, typer.Option("--keep-autosaves", min=1, help="Rotating autosave_step_<n>.pth files kept.")] = 3,
    patience: Annotated[Optional[int], typer.Option("--patience", min=0, help="Stop after this many epochs without validation improvement (0: never).", show_default="10")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="Continue a run: latest (newest checkpoint of --name or of the latest run), auto (same, or start fresh), or a checkpoint/run path.")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Stop after this many steps in total (autosaved, resumable).")] = None,
    max_time: Annotated[Optional[float], typer.Option("--max-time", min=1.0, help="Stop after this many seconds of training (autosaved, resumable).")] = None,
    stats: Annotated[Optional[Path], typer.Option("--stats", help="Use this stats.json (from `carbonsr stats`) instead of computing it.")] = None,
    fill_missing: Annotated[bool, fill_missing_option(help="Allow aux layers that do not cover the whole extent (filled, with a warning).")] = False,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Threads preparing batches ahead.")] = 2,
    quiet: Annotated[bool, quiet_option("No per-epoch tables.")] = False,
) -> None:
    """Train a model; print where the run went and how it compares with the baselines."""
    from carbonsr_cli.errors import UsageError
    from carbonsr_cli.train.config import TRAIN_PRESETS, TrainConfig
    from carbonsr_cli.train.loop import train

    if not aux and not resume:
        raise UsageError("give the aux layers with --aux (files, directories or quoted globs)")
    if seeds > 1 and resume:
        raise UsageError("--seeds starts new runs; resume each run on its own (carbonsr resume RUN_DIR)")
    fields: dict[str, Any] = {}
    if preset in TRAIN_PRESETS:
        fields.update(TRAIN_PRESETS[preset])
    elif preset not in ("prior", "mass", "tiny", "base", "large"):
        raise UsageError(f"--preset {preset!r}: choose prior, mass, tiny, base, large or demo")
    else:
        fields["preset"] = preset
    given = dict(
        epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size, lr=lr, years_window=years_window,
        scales=scales, val_fraction=val_fraction, autosave_every=autosave_every, patience=patience, fit_buffer=fit_buffer,
        mass_fit_steps=mass_fit_steps,
    )
    fields.update({k: v for k, v in given.items() if v is not None})
    if device != "auto" or "device" not in fields:
        fields["device"] = device
    cfg = TrainConfig(
        main=[str(p) for p in main],
        aux=list(aux or []),
        val_region=val_region,
        runs_dir=str(runs_dir),
        name=name,
        precision=precision,
        seed=seed,
        split_seed=split_seed,
        keep_autosaves=keep_autosaves,
        resume=resume,
        max_steps=max_steps,
        max_time_s=max_time,
        stats=str(stats) if stats else None,
        fill_missing=fill_missing,
        categorical=list(categorical or []),
        workers=workers,
        progress=not quiet,
        **fields,
    )
    if seeds == 1:
        _report(train(cfg), cfg)
        return
    base = name or datetime.now().strftime("run_%Y%m%d_%H%M%S")
    runs = []
    for k in range(seeds):
        cfg_k = dataclasses.replace(cfg, seed=seed + k, name=f"{base}-seed{seed + k}")
        result = train(cfg_k)
        _report(result, cfg_k)
        runs.append((seed + k, result))
    _report_seeds(runs)


def resume_cmd(
    run_dir: Annotated[Optional[Path], typer.Argument(help="Run directory (default: the most recent run under --runs-dir).", show_default=False)] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Directory holding run directories.")] = Path("runs"),
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Resume from this checkpoint of the run (default: ask on a terminal, else the newest).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Train up to this many epochs in total (default: as configured).")] = None,
    device: Device = "auto",
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Stop after this many steps in total.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Threads preparing batches ahead.")] = 2,
    quiet: Annotated[bool, quiet_option("No per-epoch tables.")] = False,
) -> None:
    """Continue a run from one of its checkpoints."""
    from carbonsr_cli.checkpoints import load_checkpoint
    from carbonsr_cli.train.config import TrainConfig
    from carbonsr_cli.train.loop import train
    from carbonsr_cli.train.resume import find_latest_run, list_checkpoints, newest_checkpoint

    run = run_dir if run_dir is not None else find_latest_run(runs_dir)
    if checkpoint is None:
        checkpoint = _choose(run, list_checkpoints) if sys.stdin.isatty() and sys.stdout.isatty() else newest_checkpoint(run)
    saved = TrainConfig.from_dict(load_checkpoint(checkpoint)["train_config"])
    cfg = saved.replace(
        resume=str(checkpoint),
        device=device,
        workers=workers,
        progress=not quiet,
        max_steps=max_steps,
        max_time_s=None,
        **({"epochs": epochs} if epochs else {}),
    )
    _report(train(cfg), cfg)


def _choose(run: Path, list_checkpoints: Any) -> Path:
    from rich.prompt import IntPrompt

    from carbonsr_cli.console import out
    from carbonsr_cli.errors import CheckpointError

    infos = list_checkpoints(run)
    if not infos:
        raise CheckpointError("no readable checkpoint in this run directory", run)
    for k, info in enumerate(infos, 1):
        out.print(f"  {k}. {info.describe()}")
    choice = IntPrompt.ask("Resume from", choices=[str(k) for k in range(1, len(infos) + 1)], default=1, console=out)
    return infos[int(choice) - 1].path


def _planned_steps(result: Any, cfg: Any) -> int:
    """Steps the run's schedule has (epochs x steps per epoch), as the last checkpoint records it."""
    train_cfg = {"epochs": cfg.epochs, "steps_per_epoch": cfg.steps_per_epoch}
    if result.last_checkpoint is not None:
        try:
            from carbonsr_cli.checkpoints import load_checkpoint

            train_cfg.update(load_checkpoint(result.last_checkpoint).get("train_config", {}))
        except Exception:  # noqa: BLE001 - the plain sentence falls back to this invocation's config
            pass
    return int(train_cfg["epochs"]) * int(train_cfg["steps_per_epoch"])


def _best_checkpoint(path: Any) -> dict[str, Any]:
    """``best_model.pth`` as a dict (for the report: its global step and ``selection`` record), or {}."""
    if path is None:
        return {}
    from carbonsr_cli.checkpoints import load_checkpoint

    try:
        return dict(load_checkpoint(path))
    except Exception:  # noqa: BLE001 - a report line must not fail the command
        return {}


def _report(result: Any, cfg: Any) -> None:
    from carbonsr_cli.console import out

    out.print(f"Run directory: {result.run_dir} ({result.stopped}, {result.epochs_done} epochs, {result.global_step} steps)")
    if result.stopped in ("max_time", "max_steps"):
        option = "--max-time" if result.stopped == "max_time" else "--max-steps"
        more = "give more time" if result.stopped == "max_time" else "give more steps"
        out.print(f"Stopped by {option} after {result.global_step} of {_planned_steps(result, cfg)} steps; the "
                  f"learning-rate schedule was not finished; continue with `carbonsr resume {result.run_dir}` or {more}.")
    best_ck = _best_checkpoint(result.best_path)
    if result.history:
        last = result.history[-1]
        best = min(result.history, key=lambda h: h["val_score"])
        ratios = ", ".join(
            f"s={k[1:].split('_')[0]}: {best[k]:.3f} vs {best[k.replace('_ratio_model_best', '_best_label')]}"
            for k in best if k.endswith("_ratio_model_best")
        )
        out.print(f"Best validation score {best['val_score']:.3f} at epoch {best['epoch']} (model Nonzero-MAE / "
                  f"best baseline's on held-out blocks, parent level: {ratios}); last epoch {last['epoch']}.")
        init = getattr(result, "initial_score", None)
        if init is not None:
            kept = init <= best["val_score"] or int(best_ck.get("global_step", -1)) == 0  # best_model.pth is the untrained state
            out.print(f"The initial state (the fitted prior) scored {init:.3f}; best_model.pth holds "
                      + ("that initial state (training did not improve on it clearly)." if kept else f"epoch {best['epoch']}."))
            best = dict(best, val_score=min(best["val_score"], init))
        if best["val_score"] < 0.99:
            out.print("The model beat every baseline on the held-out validation blocks (a proxy at 1 km, not a 100 m score).")
        else:
            out.print(f"The model did NOT beat the best baseline on the held-out validation blocks at 1 km "
                      f"(score {best['val_score']:.3f}).")
    from carbonsr_cli.train.validation import describe_mass_gate

    gate_line = describe_mass_gate(dict(best_ck.get("mass_gate") or {}))
    if gate_line:
        out.print(gate_line)
    chosen = dict(best_ck.get("selection") or {})
    if chosen:
        out.print(f"`carbonsr downscale --method auto` will use {chosen['method']}: {chosen.get('reason', '')}.")
    if result.best_path is not None:
        out.print(f"Model: {result.best_path}  (use: carbonsr downscale MAIN.tif --aux ... --model {result.best_path} -o out.tif)")


def _report_seeds(runs: list[tuple[int, Any]]) -> None:
    """One line per seed and the spread of the held-out validation scores (a 1 km proxy)."""
    from carbonsr_cli.console import out

    scores = []
    out.print("Seeds (each its own split; score = model Nonzero-MAE / best baseline's on held-out blocks, 1 km):")
    for seed, result in runs:
        score = result.best_score
        scores.append(score)
        out.print(f"  seed {seed}: best validation score {'-' if score is None else f'{score:.3f}'}  ({result.run_dir})")
    got = [float(v) for v in scores if v is not None]
    if len(got) >= 2:
        mean = sum(got) / len(got)
        out.print(f"Spread over {len(got)} seeds: {min(got):.3f} .. {max(got):.3f}, (max - min) / mean = {(max(got) - min(got)) / mean:.1%}.")
