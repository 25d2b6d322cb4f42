"""``carbonsr demo``: the whole product on the synthetic sample region, in one command.

Steps (everything under one directory, default ``./carbonsr-demo``):

1. ``data/``: the sample region (``carbonsr_cli.sample_data``): 1 km emissions, aux layers and
   the hidden 100 m truth (used only for scoring, never for training).
2. ``runs/demo/``: statistics (``stats.json``) and a short CPU training of the ``tiny`` model with
   the ``demo`` training preset (``carbonsr_cli.train.config.TRAIN_PRESETS``), including its
   spatial train/validation split (``split.json``).
3. ``outputs/``: the 1 km emissions downscaled to 100 m by the model and by the baselines: the
   fitted layer mix, listed point sources first (``plants.gpkg:co2_t_yr``) then a layer, one
   layer (the one the training validation found best) and uniform.
4. Scores against the hidden truth at 100 m, on the *held-out* validation region of the
   training split (the honest number) and on the whole region (includes training areas), plus
   the conservation check of every output against the 1 km input.
5. ``quicklook.png`` (1 km input, baseline, model and truth) and ``results.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from carbonsr_cli.atomic import atomic_write_text
from carbonsr_cli.console import err
from carbonsr_cli.downscale import downscale
from carbonsr_cli.errors import OutputError
from carbonsr_cli.evaluate import METRICS, check_conservation, compare_to_reference
from carbonsr_cli.evaluate.plots import plot_quicklook
from carbonsr_cli.nodata import nodata_mask
from carbonsr_cli.rasters import open_raster, read_window
from carbonsr_cli.sample_data import _foreign_entries, generate_sample_data
from carbonsr_cli.train.config import TRAIN_PRESETS, TrainConfig
from carbonsr_cli.train.loop import train
from carbonsr_cli.train.split import Split, window_sums

__all__ = ["DemoResult", "run_demo", "DEMO_METRICS"]

#: Metrics of the final table (all computed; these are shown).
DEMO_METRICS = ("nonzero-mae", "balanced-mae", "top1-mae", "r2")
#: Zoom window of the quick-look, in parent cells.
_ZOOM = 24


@dataclass
class DemoResult:
    """What ``carbonsr demo`` produced.

    Attributes:
        root: Demo directory.
        data_dir: Sample data directory.
        run_dir: Training run directory (checkpoints, stats.json, split.json).
        checkpoint: The model used (``best_model.pth``).
        outputs: ``{method: 100 m GeoTIFF}``.
        rows: Final table rows: ``{"region", "method", <metric>, "max_rel_err", "ratio"}``.
        quicklook: The PNG quick-look.
        results_json: All numbers as JSON.
        seconds: ``{step: wall seconds}``.
        model_beats_baselines: True when the model's held-out Nonzero-MAE is below every baseline's.
    """

    root: Path
    data_dir: Path
    run_dir: Path
    checkpoint: Path
    outputs: dict[str, Path]
    rows: list[dict[str, Any]]
    quicklook: Path
    results_json: Path
    seconds: dict[str, float] = field(default_factory=dict)
    model_beats_baselines: bool = False


#: What ``carbonsr demo`` writes under its directory (``--overwrite`` removes only these).
_DEMO_ENTRIES = ("data", "runs", "outputs", "quicklook.png", "results.json")


def _check_previous_demo(root: Path) -> None:
    """Refuse ``--overwrite`` unless what it would remove was written by an earlier demo.

    ``data/`` must hold only sample data, ``runs/`` only the ``demo`` run and ``outputs/``
    only the demo's ``*_100m.tif`` files: a project directory with real data or training runs
    under those names is never removed.
    """

    problems: list[str] = []
    data = root / "data"
    if data.is_dir():
        problems += [f"data/{e}" for e in _foreign_entries(data)]
    runs = root / "runs"
    if runs.is_dir():
        problems += [f"runs/{q.name}" for q in runs.iterdir() if q.name != "demo"]
    outs = root / "outputs"
    if outs.is_dir():
        problems += [f"outputs/{q.name}" for q in outs.iterdir()
                     if q.name not in {f"{m}_100m.tif" for m in ("model", "dasymetric", "uniform")}]
    if problems:
        shown = ", ".join(problems[:3]) + (", ..." if len(problems) > 3 else "")
        raise OutputError(f"holds files an earlier demo did not write ({shown}); --overwrite would remove them. "
                          "Choose another demo directory", root)


def _prepare_dir(root: Path, overwrite: bool) -> None:
    """Create ``root``; with ``overwrite`` remove only what a previous demo wrote there."""
    if root.exists() and not root.is_dir():
        raise OutputError("exists and is not a directory", root)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise OutputError("demo directory is not empty; use --overwrite to replace a previous demo", root)
        _check_previous_demo(root)
        for name in ("data", "runs", "outputs"):
            p = root / name
            if p.is_dir():
                shutil.rmtree(p)
        for name in ("quicklook.png", "results.json"):
            (root / name).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)


def _zoom_window(truth_parent: np.ndarray, val_mask: np.ndarray | None, size: int) -> tuple[int, int, bool]:
    """Top-left parent cell of a ``size x size`` zoom window with the most nonzero 1 km cells,
    inside the held-out region when one fits there. Returns ``(row, col, inside_validation)``."""

    nz = np.nan_to_num(truth_parent) > 0
    h, w = nz.shape
    size = min(size, h, w)
    score = window_sums(~nz, size)  # nodata/zero count per window (lower is better)
    score = size * size - score  # nonzero count
    inside = False
    if val_mask is not None:
        full = window_sums(~val_mask, size) == 0
        if full.any():
            score = np.where(full, score, -1)
            inside = True
    r, c = np.unravel_index(int(np.argmax(score)), score.shape)
    return int(r), int(c), inside


def run_demo(
    root: str | os.PathLike[str] = "carbonsr-demo",
    *,
    overwrite: bool = False,
    seed: int = 0,
    device: str = "cpu",
    max_train_seconds: float | None = None,
    train_overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the demo end to end (see the module docstring).

    Args:
        root: Demo directory (created; must be empty unless ``overwrite``).
        overwrite: Replace the files of a previous demo in ``root`` (only ``data/``, ``runs/``,
            ``outputs/``, ``quicklook.png`` and ``results.json`` are removed).
        seed: Seed of the sample region and of the training.
        device: Training/inference device (``cpu`` by default, so the numbers are reproducible).
        max_train_seconds: Stop training after this many seconds (None: the preset's epochs).
        train_overrides: Extra ``TrainConfig`` fields (tests use fewer steps).
        log: Called with one line per step (default: print to stderr).

    Returns:
        A :class:`DemoResult`.
    """

    if log is None:

        def log(msg: str) -> None:
            err.print(msg, highlight=False, markup=False, soft_wrap=True)

    root_p = Path(root).expanduser().absolute()
    _prepare_dir(root_p, overwrite)
    secs: dict[str, float] = {}
    t0 = time.perf_counter()

    # 1. sample data ------------------------------------------------------------------
    log(f"[1/5] generating the sample region in {root_p / 'data'}")
    sample = generate_sample_data(root_p / "data", seed=seed)
    secs["sample data"] = time.perf_counter() - t0

    # 2. statistics + training ---------------------------------------------------------
    t1 = time.perf_counter()
    log("[2/5] statistics and a short CPU training of the tiny model (demo preset)")
    cfg_fields: dict[str, Any] = dict(TRAIN_PRESETS["demo"])
    aux = [str(p) for p in sample.aux_paths] + [f"{sample.plants}:co2_t_yr"]  # + the point catalogue
    cfg_fields.update(
        main=[str(sample.emissions)],
        aux=aux,
        runs_dir=str(root_p / "runs"),
        name="demo",
        seed=seed,
        device=device,
    )
    if max_train_seconds is not None:
        cfg_fields["max_time_s"] = float(max_train_seconds)
    cfg_fields.update(train_overrides or {})
    run = train(TrainConfig(**cfg_fields))
    ckpt = run.best_path or run.last_checkpoint
    if ckpt is None:  # pragma: no cover - train always writes a checkpoint
        raise OutputError("training wrote no checkpoint", run.run_dir)
    secs["training"] = time.perf_counter() - t1
    dasy_layer = None
    if run.history:
        last = run.history[-1]
        dasy_layer = next((last[k] for k in sorted(last) if k.endswith("_dasy_layer")), None)

    # 3. downscaling -------------------------------------------------------------------
    t2 = time.perf_counter()
    out_dir = root_p / "outputs"
    out_dir.mkdir(exist_ok=True)
    methods: dict[str, dict[str, Any]] = {
        "model": {"method": "model", "checkpoint": ckpt},
        "fitted": {"method": "fitted", "checkpoint": ckpt},
        "points": {"method": f"points:{dasy_layer}" if dasy_layer and not dasy_layer.startswith("plants:") else "points"},
        "dasymetric": {"method": f"dasymetric:{dasy_layer}" if dasy_layer else "dasymetric"},
        "uniform": {"method": "uniform"},
    }
    outputs: dict[str, Path] = {}
    for name, kw in methods.items():
        dst = out_dir / f"{name}_100m.tif"
        log(f"[3/5] downscaling with {kw['method']} -> {dst}")
        downscale(sample.emissions, aux, dst, device=device, overwrite=True, progress=False, **kw)
        outputs[name] = dst
    secs["downscaling"] = time.perf_counter() - t2

    # 4. evaluation --------------------------------------------------------------------
    t3 = time.perf_counter()
    log("[4/5] scoring every output against the hidden 100 m truth, and conservation against the 1 km input")
    split_path = run.run_dir / "split.json"
    val_child = None
    val_parent = None
    if split_path.exists():
        split = Split.from_dict(json.loads(split_path.read_text()))
        val_parent = split.val_mask()
        val_child = np.repeat(np.repeat(val_parent, 10, axis=0), 10, axis=1)
    regions: list[tuple[str, np.ndarray | None]] = []
    if val_child is not None and val_child.any():
        regions.append(("held-out", val_child))
    regions.append(("whole region", None))
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    cons: dict[str, Any] = {}
    for name, path in outputs.items():
        rep = check_conservation(path, sample.emissions)
        cons[name] = rep
        for label, mask in regions:
            res = compare_to_reference(path, sample.truth, metrics=list(METRICS), cell_mask=mask)
            scores.setdefault(label, {})[name] = res
    rows: list[dict[str, Any]] = []
    for label, _ in regions:
        per = scores[label]
        best_base = min(per[m]["all"]["nonzero-mae"] for m in per if m != "model")
        for name in outputs:
            a = per[name]["all"]
            rows.append({
                "region": label,
                "method": methods[name]["method"],
                **{m: a[m] for m in METRICS},
                "cells": a["cells"],
                "max_rel_err": cons[name].max_rel_err,
                "conserves": cons[name].ok,
                "ratio": a["nonzero-mae"] / best_base if best_base > 0 else float("nan"),
            })
    model_rows = [r for r in rows if r["region"] == regions[0][0] and r["method"] == "model"]
    beats = bool(model_rows and model_rows[0]["ratio"] < 1.0)
    secs["evaluation"] = time.perf_counter() - t3

    # 5. quick-look ----------------------------------------------------------------------
    t4 = time.perf_counter()
    quick = root_p / "quicklook.png"
    log(f"[5/5] writing the quick-look {quick}")
    _quicklook(sample, outputs, val_parent, quick, dasy_label=methods["dasymetric"]["method"])
    secs["quick-look"] = time.perf_counter() - t4
    secs["total"] = time.perf_counter() - t0

    results_json = root_p / "results.json"

    payload = {
        "rows": rows,
        "model_beats_every_baseline_on_held_out": beats,
        "conservation": {k: v.to_dict() for k, v in cons.items()},
        "seconds": secs,
        "checkpoint": str(ckpt),
        "training": {"stopped": run.stopped, "epochs": run.epochs_done, "steps": run.global_step},
    }
    atomic_write_text(results_json, json.dumps(_json_safe(payload), indent=2) + "\n")
    return DemoResult(
        root=root_p,
        data_dir=sample.root,
        run_dir=run.run_dir,
        checkpoint=Path(ckpt),
        outputs=outputs,
        rows=rows,
        quicklook=quick,
        results_json=results_json,
        seconds=secs,
        model_beats_baselines=beats,
    )


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def _read_band(path: Path, band: int) -> np.ndarray:

    with open_raster(path) as ds:
        a = read_window(ds, None, band, out_dtype="float64")
        nod = ds.nodata
    a[nodata_mask(a, nod)] = np.nan
    return a


def _quicklook(sample: Any, outputs: dict[str, Path], val_parent: np.ndarray | None, dest: Path, *, dasy_label: str) -> None:
    """1 km input (whole region, zoom outlined) and the 100 m baseline, model and truth in the zoom."""

    band = len(sample.years)  # last year
    year = sample.years[-1]
    main = _read_band(sample.emissions, band)
    r, c, inside = _zoom_window(main, val_parent, _ZOOM)
    z = _ZOOM
    f = 10

    def zoom(path: Path) -> np.ndarray:
        return _read_band(path, band)[r * f : (r + z) * f, c * f : (c + z) * f]

    where = "held-out validation area" if inside else "zoom"
    panels = [
        (f"1 km input {year} (zoom outlined)", main),
        (f"{dasy_label} baseline, 100 m", zoom(outputs["dasymetric"])),
        ("model, 100 m", zoom(outputs["model"])),
        ("truth, 100 m (hidden)", zoom(sample.truth)),
    ]
    plot_quicklook(
        panels,
        dest,
        title=f"carbonsr demo: {z} x {z} km {where}; every 10 x 10 block of the 100 m maps sums to its 1 km cell",
        shared_groups=[[0], [1, 2, 3]],
        boxes={0: (r, c, z, z)},
        units_per_panel=["t CO2 / 1 km cell / yr", *["t CO2 / 100 m cell / yr"] * 3],
        overwrite=True,
    )
