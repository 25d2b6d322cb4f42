"""Scale-shift self-validation without fine truth (``carbonsr evaluate --self-validate``).

:func:`self_validate` coarsens the main raster, downscales it back with the model and the
baselines, and compares them at parent level (on the training split's validation region or a
given region); :func:`split_cell_mask` gives the validation parent cells of a run.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from carbonsr_cli.errors import CarbonSRWarning, CheckpointError, InputDataError, UsageError
from carbonsr_cli.evaluate.compare import _check_metric_names, _select

__all__ = ["SelfValidationResult", "self_validate", "split_cell_mask"]

PathLike = str | os.PathLike[str]


@dataclass
class SelfValidationResult:
    """Result of :func:`self_validate`.

    Attributes:
        rows: One dict per (scale, method): ``{"scale", "method", <metric>: value, "cells"}``.
        scales: Coarsening scales (in parent cells).
        methods: Method names (``"model"`` first, then baselines).
        region: Evaluated region ``(minx, miny, maxx, maxy)`` in the main CRS, or None.
        metric: Primary metric used for the ratio column.
        region_label: Human-readable description of the evaluated cells.
        details: ``{scale: {method: metrics}}`` for every method, each dasymetric layer included.
    """

    rows: list[dict[str, Any]]
    scales: list[int]
    methods: list[str]
    region: tuple[float, float, float, float] | None
    metric: str = "nonzero-mae"
    region_label: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def ratio_to_best_baseline(self, scale: int, metric: str | None = None) -> float:
        """Model metric / best (lowest) baseline metric at ``scale`` (< 1: the model wins)."""
        m = metric or self.metric
        rows = [r for r in self.rows if r["scale"] == scale]
        model = [r[m] for r in rows if r["method"] == "model"]
        base = [r[m] for r in rows if r["method"] != "model" and np.isfinite(r[m])]
        if not model or not base:
            return float("nan")
        best = min(base)
        return float(model[0] / best) if best > 0 else float("inf") if model[0] > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary including the ratios."""
        return {
            "scales": self.scales,
            "methods": self.methods,
            "region": list(self.region) if self.region else None,
            "region_label": self.region_label,
            "metric": self.metric,
            "rows": self.rows,
            "ratio_to_best_baseline": {str(s): self.ratio_to_best_baseline(s) for s in self.scales},
            "all_methods": self.details,
        }



def _whole_blocks(
    mask: np.ndarray, windows: Sequence[tuple[int, int]], patch: int, s: int
) -> list[tuple[int, int, np.ndarray]]:
    """The cells each window scores at scale ``s``: whole ``s x s`` blocks, each cell once.

    Totals are conserved over whole coarse blocks only, so a block is scored only when all its
    cells lie inside ``mask`` (the region) and no earlier window scored any of them; blocks
    cut by the region or by the shifted last window of a row/column are dropped.

    Args:
        mask: bool ``[h, w]`` region of parent cells.
        windows: ``(row, col)`` starts of the ``patch x patch`` windows, in scoring order.
        patch: Window size in parent cells (a multiple of ``s``).
        s: Coarse scale in parent cells.

    Returns:
        ``(row, col, sel)`` per window with at least one scored block; ``sel`` is bool
        ``[patch, patch]``.
    """
    owned = np.zeros(mask.shape, dtype=bool)
    nb = patch // s
    out = []
    for r, c in windows:
        free = mask[r : r + patch, c : c + patch] & ~owned[r : r + patch, c : c + patch]
        whole = free.reshape(nb, s, nb, s).all(axis=(1, 3))
        if whole.any():
            sel = np.repeat(np.repeat(whole, s, axis=0), s, axis=1)
            out.append((r, c, sel))
            owned[r : r + patch, c : c + patch] |= sel
    return out



def _starts(n: int, size: int) -> list[int]:
    """Window starts tiling ``[0, n)`` with windows of ``size``; the last one is shifted back to end at n."""
    starts = list(range(0, n - size + 1, size))
    if starts[-1] + size < n:
        starts.append(n - size)
    return starts



class _OffsetStack:
    """An ``AuxStack`` seen from a child-cell offset (so ``AuxCache`` can cache a sub-window)."""

    def __init__(self, stack: Any, row: int, col: int, order: Sequence[int]) -> None:
        self._stack, self._row, self._col, self._order = stack, row, col, list(order)
        self.names = [stack.names[i] for i in self._order]

    def read(self, window: Any) -> np.ndarray:
        from rasterio.windows import Window

        w = Window(window.col_off + self._col, window.row_off + self._row, window.width, window.height)
        return np.asarray(self._stack.read(w), dtype=np.float32)[self._order]



def _region_mask(
    region: tuple[float, float, float, float] | str | None, main: Any, ck: dict[str, Any], main_path: PathLike
) -> tuple[np.ndarray, str]:
    """Boolean ``[H, W]`` parent-cell mask of the evaluated region and a label for it."""
    # lazy: train/ and models/ import torch, which `carbonsr evaluate --conservation` never needs
    from carbonsr_cli.train.split import Split, parse_val_region

    h, w = main.values.shape[1:]
    grid = main.grid
    if region is None:
        return np.ones((h, w), dtype=bool), "whole raster (includes training areas)"
    if isinstance(region, str) and region.strip().lower() == "split":
        if not ck.get("split"):
            raise CheckpointError("the checkpoint holds no train/validation split; give --val-region explicitly")
        split = Split.from_dict(ck["split"])
        if (split.height, split.width) != (h, w):
            raise InputDataError(
                f"the checkpoint's split is for a {split.height} x {split.width} grid, this main raster is "
                f"{h} x {w}; give --val-region explicitly",
                main_path,
            )
        return split.val_mask(), "validation region of the training split"
    spec = region if isinstance(region, str) else ",".join(repr(float(v)) for v in region)
    mask, kind = parse_val_region(spec, grid.transform, h, w, grid.crs)
    return mask, f"--val-region {spec}"



def self_validate(
    checkpoint: PathLike,
    main_path: PathLike,
    aux_paths: Sequence[PathLike],
    *,
    scales: Sequence[int] = (2, 4, 12),
    region: tuple[float, float, float, float] | str | None = None,
    metrics: Sequence[str] | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    fill_missing: bool = False,
    categorical: Sequence[str] | None = None,
) -> SelfValidationResult:
    """Scale-shift self-validation: hide detail we know, and score how well it comes back.

    Exactly the degradation of training (``carbonsr_cli.train.dataset``): the main raster is
    tiled into ``patch x patch`` parent-cell windows (12 x 12 by default; the last window of a
    row/column is shifted back to fit). Per scale ``s`` (a divisor of ``patch``) only whole
    ``s x s`` blocks inside a window and the region are scored, each cell once (totals are
    conserved over whole blocks only; a scale with no whole block is skipped with a
    warning). The coarse totals are the sums of ``s x s`` parent cells; the model
    sees ``main = log1p(coarse total / (s * factor)**2)`` and the aux layers, its children are
    water-filled onto each coarse block (``block = s * factor`` children), summed to parent
    cells and compared with the true parent totals. The baselines get the same coarse totals:
    uniform, and dasymetric by every aux layer (raw values as weights; the best layer per
    scale is reported, chosen on these same cells, which favours the baselines). Years are
    covered by consecutive windows of the model's ``T`` years (each year scored once).

    Args:
        checkpoint: carbonsr checkpoint (``best_model.pth``).
        main_path: Main raster (totals per parent cell, t CO2 / cell / yr).
        aux_paths: The aux layers the model was trained with (files, globs, directories).
        scales: Coarse scales in parent cells (each must divide the training patch).
        region: Cells to score: ``(minx, miny, maxx, maxy)`` in the main CRS, a bbox string or
            a polygon file (cells whose centre lies inside), ``"split"`` for the validation
            region stored in the checkpoint, or None for the whole raster (which includes the
            areas the model was trained on, so it flatters the model).
        metrics: Names from :data:`METRICS` (default all); the ratio uses ``nonzero-mae``.
        device: ``auto``, ``cpu``, ``cuda``...
        batch_size: Patches per forward pass.
        fill_missing: Allow aux layers that do not cover the whole extent.
        categorical: Aux raster file stems or names read as categorical; None: the
            checkpoint's setting (``train --categorical``).

    Returns:
        A :class:`SelfValidationResult` (parent-level metrics per scale and method).

    Raises:
        UsageError: bad scales/metrics, empty region. CheckpointError: unusable checkpoint or
            aux layers that differ from the checkpoint's. InputDataError: unusable rasters.
    """
    import torch

    # lazy: torch, rasterio and the downscale package load only when a model is validated
    from carbonsr_cli.aux import AuxStack, categorical_kinds, discover_aux
    from carbonsr_cli.downscale.planning import _resolve_aux_order
    from carbonsr_cli.stats import AuxNormalizer
    from carbonsr_cli.checkpoints import load_checkpoint, load_model_for_inference
    from carbonsr_cli.train.dataset import AuxCache, BatchSpec, MainData, build_batch, load_main
    from carbonsr_cli.train.loop import _children, resolve_device
    from models.baselines import dasymetric_fill, uniform_fill
    from models.metrics import MetricAccumulator
    from models.physics import block_sum

    names = _check_metric_names(metrics)
    if "nonzero-mae" not in names:
        names = ["nonzero-mae", *names]
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    loaded = load_model_for_inference(checkpoint, dev)
    ck = load_checkpoint(checkpoint)
    f = int(loaded.factor)
    patch = int(dict(ck.get("train_config") or {}).get("patch", 12))
    scales = sorted({int(s) for s in scales})
    bad = [s for s in scales if s < 2 or patch % s]
    if not scales or bad:
        divisors = [d for d in range(2, patch + 1) if patch % d == 0]
        raise UsageError(f"scales {bad or scales} unusable: choose among {divisors} (divisors of the {patch}-cell patch)")
    main = load_main([main_path])
    n_years, h, w = main.values.shape
    if h < patch or w < patch:
        raise InputDataError(f"main raster ({h} x {w} cells) is smaller than one {patch} x {patch} patch", main_path)
    t = int(loaded.years_window)
    if t > n_years:
        raise InputDataError(f"the model sees {t} years at once; the main raster has only {n_years} band(s)", main_path)
    mask, label = _region_mask(region, main, ck, main_path)
    if not (mask & main.valid.any(axis=0)).any():
        raise UsageError(f"the evaluation region ({label}) holds no valid parent cell of the main raster")

    # patch windows touching the region; per scale, whole s x s blocks are scored once (below)
    windows = [(r, c) for r in _starts(h, patch) for c in _starts(w, patch) if mask[r : r + patch, c : c + patch].any()]
    r0 = min(x[0] for x in windows)
    c0 = min(x[1] for x in windows)
    r1 = max(x[0] for x in windows) + patch
    c1 = max(x[1] for x in windows) + patch
    crop = MainData(grid=main.grid, years=main.years, values=main.values[:, r0:r1, c0:c1], paths=main.paths)
    year_starts = _starts(n_years, t)
    year_own: list[np.ndarray] = []
    seen = np.zeros(n_years, dtype=bool)
    for y0 in year_starts:
        own = ~seen[y0 : y0 + t]
        year_own.append(own.copy())
        seen[y0 : y0 + t] = True
    items_by_scale: dict[int, list[tuple[int, int, np.ndarray, int, np.ndarray]]] = {}
    for s in scales:
        items_by_scale[s] = [(r - r0, c - c0, sel, y0, yo) for (r, c, sel) in _whole_blocks(mask, windows, patch, s)
                             for y0, yo in zip(year_starts, year_own)]
    empty = [s for s in scales if not items_by_scale[s]]
    if len(empty) == len(scales):
        raise UsageError(f"the evaluation region ({label}) holds no whole block of {' or '.join(f'{s} x {s}' for s in scales)} parent cells")
    if empty:
        warnings.warn(CarbonSRWarning(
            f"scale(s) {', '.join(map(str, empty))} skipped: the evaluation region ({label}) holds no whole block at that scale"))
        scales = [s for s in scales if s not in empty]

    child = main.grid.child(f)
    if categorical is None:
        categorical = list(dict(ck.get("train_config") or {}).get("categorical") or [])
    kinds = categorical_kinds(categorical)
    with AuxStack(discover_aux(list(aux_paths), kinds=kinds), child, main.years, fill_missing=fill_missing) as stack:
        order = _resolve_aux_order(stack.names, loaded.aux_names, checkpoint)
        view = _OffsetStack(stack, r0 * f, c0 * f, order)
        from rasterio.windows import Window

        raw_all = view.read(Window(0, 0, (c1 - c0) * f, (r1 - r0) * f))  # [C, Y, h, w] physical values
    norm = AuxNormalizer.from_stats(loaded.stats)
    cache = AuxCache(np.asarray(norm.apply(raw_all), dtype=np.float32).astype(np.float16), loaded.aux_names)
    layer_names = list(loaded.aux_names)
    accs: dict[tuple[int, str], Any] = {}
    model = loaded.model
    with torch.no_grad():
        for s in scales:
            block = s * f
            items = items_by_scale[s]
            for k in range(0, len(items), batch_size):
                chunk = items[k : k + batch_size]
                spec = BatchSpec.windows(s, [i[0] for i in chunk], [i[1] for i in chunk], [i[3] for i in chunk])
                b = build_batch(spec, crop, cache, factor=f, patch=patch, years_window=t)
                sel = np.stack([i[2][None, :, :] & i[4][:, None, None] for i in chunk])[:, None]  # [B,1,T,p,p]
                m = b.mask & sel
                totals = torch.from_numpy(b.totals)
                raw, _ = model(torch.from_numpy(b.aux).to(dev), torch.from_numpy(b.main).to(dev), context_block=block)
                kids = _children(model, raw, totals.to(dev), block)
                preds = {"model": block_sum(kids, f).cpu().numpy(), "uniform": block_sum(uniform_fill(totals, block), f).numpy()}
                for li, ln in enumerate(layer_names):
                    wts = np.stack(
                        [raw_all[li, y0 : y0 + t, r * f : (r + patch) * f, c * f : (c + patch) * f] for r, c, _, y0, _ in chunk]
                    )[:, None]
                    preds[f"dasymetric:{ln}"] = block_sum(dasymetric_fill(totals, torch.from_numpy(wts), block), f).numpy()
                for meth, pv in preds.items():
                    acc = accs.setdefault((s, meth), MetricAccumulator())
                    acc.update(pv, b.truth, m)
    rows: list[dict[str, Any]] = []
    details: dict[str, dict[str, dict[str, float]]] = {}
    for s in scales:
        scored = {meth: _select(acc, names) for (sc, meth), acc in accs.items() if sc == s}
        details[str(s)] = scored
        dasy = {k: v for k, v in scored.items() if k.startswith("dasymetric:")}
        best_dasy = min(dasy, key=lambda k: (np.nan_to_num(dasy[k]["nonzero-mae"], nan=np.inf), k)) if dasy else None
        for meth in ["model", "uniform", *([best_dasy] if best_dasy else [])]:
            rows.append({"scale": s, "method": meth, **scored[meth]})
    reg = tuple(float(v) for v in region) if isinstance(region, (tuple, list)) else None
    res = SelfValidationResult(rows=rows, scales=scales, methods=["model", "uniform", "dasymetric"], region=reg)
    res.region_label = label
    res.details = details
    return res



def split_cell_mask(source: str | os.PathLike[str], shape: tuple[int, int]) -> np.ndarray:
    """The held-out (validation) region of a training run on a grid of ``shape`` cells.

    Args:
        source: A run directory, its ``split.json`` or one of its checkpoints.
        shape: ``(rows, cols)`` of the grid to score (the parent grid or a child grid of it).

    Returns:
        bool ``[rows, cols]``, True inside the run's validation region.

    Raises:
        MissingInputError: no split found. InputDataError: the grid is not the run's parent
            grid or an integer subdivision of it.
    """
    import json

    from carbonsr_cli.errors import InputDataError, MissingInputError
    from carbonsr_cli.train.split import Split  # lazy: train/ imports torch

    p = Path(source)
    if p.is_dir():
        p = p / "split.json"
    if not p.exists():
        raise MissingInputError("no training split here (give a run directory, its split.json or a checkpoint)", p)
    if p.suffix.lower() == ".json":
        split = Split.from_dict(json.loads(p.read_text()))
    else:
        from carbonsr_cli.checkpoints import load_checkpoint

        ck = load_checkpoint(p)
        if "split" not in ck:
            raise InputDataError("the checkpoint holds no training split", p)
        split = Split.from_dict(ck["split"])
    rows, cols = shape
    k = rows // split.height if split.height else 0
    if k < 1 or rows != k * split.height or cols != k * split.width:
        raise InputDataError(
            f"the grid to score ({rows}x{cols}) is not the run's parent grid ({split.height}x{split.width}) "
            "or a subdivision of it", source)
    m = split.val_mask()
    return np.repeat(np.repeat(m, k, axis=0), k, axis=1)
