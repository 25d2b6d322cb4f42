"""Figures for evaluation and the demo (matplotlib, Agg backend, written atomically).

Emission rasters are heavy-tailed: most cells are zero or small, a few point sources carry
most of the mass. Maps therefore use a logarithmic colour scale (``LogNorm``) with limits
shared between the panels that show the same quantity, and errors use a symmetric log scale
(``SymLogNorm``) centred on zero. Zero and nodata cells are drawn in the "bad" colour
(light grey), so that "no emission" and "emission" are visually distinct.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from carbonsr_cli.atomic import atomic_path
from carbonsr_cli.gridmatch import _block_sum

__all__ = ["plot_comparison", "plot_quicklook", "log_limits"]

PathLike = str | os.PathLike[str]

#: Colour map for emission maps (perceptually uniform, dark = low).
_CMAP = "magma"
#: Colour map for signed errors (blue = under-prediction, red = over-prediction).
_ERR_CMAP = "RdBu_r"
#: Colour of zero / nodata cells on log maps.
_BAD = "#d9d9d9"


def _pyplot() -> Any:
    """``matplotlib.pyplot`` with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def log_limits(*arrays: np.ndarray, lo_q: float = 0.02) -> tuple[float, float]:
    """Shared ``(vmin, vmax)`` for a log colour scale over the positive finite values.

    ``vmin`` is the ``lo_q`` quantile of the positive values (so a handful of tiny values does
    not stretch the scale over many decades), ``vmax`` the maximum.
    """
    pos = [a[np.isfinite(a) & (a > 0)] for a in arrays]
    pos = [p for p in pos if p.size]
    if not pos:
        return 1e-3, 1.0
    allv = np.concatenate(pos)
    vmin = float(np.quantile(allv, lo_q))
    vmax = float(allv.max())
    if not vmax > vmin:
        vmin = vmax / 10.0
    return vmin, vmax


def _cmap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))  # masked cells: the base layer shows


def _save(fig: Any, out_png: PathLike, overwrite: bool, dpi: int) -> Path:
    """Save ``fig`` as a 256-colour PNG atomically (temp file in the destination directory, then rename).

    The colour maps are smooth, so an adaptive 256-colour palette is visually lossless and makes
    the file about three times smaller than RGBA.
    """
    import io

    from PIL import Image

    plt = _pyplot()
    dest = Path(out_png)
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    buf.seek(0)
    img = Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    with atomic_path(dest, overwrite=overwrite) as tmp:
        img.save(tmp, format="PNG", optimize=True)
    return dest


def _map_panel(
    ax: Any, fig: Any, data: np.ndarray, norm: Any, cmap: Any, title: str, label: str, *, log: bool = True
) -> Any:
    """Draw one map: zero cells light grey, nodata white, the rest on ``norm``; returns the colour bar."""
    from matplotlib.colors import ListedColormap

    a = np.asarray(data, dtype=np.float64)
    finite = np.isfinite(a)
    # base layer: every valid cell light grey (zeros stay grey), nodata white
    ax.imshow(np.where(finite, 1.0, np.nan), cmap=ListedColormap([_BAD]), vmin=0, vmax=1, interpolation="nearest")
    shown = np.ma.masked_where(~(finite & (a > 0)), a) if log else np.ma.masked_where(~finite | (a == 0), a)
    im = ax.imshow(shown, norm=norm, cmap=cmap, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, extend="both" if not log else "neither")
    cb.set_label(label, fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return cb


def _symlog_ticks(lin: float, vmax: float) -> tuple[list[float], list[str]]:
    """At most 7 ticks (0 and +-powers of ten) for a ``SymLogNorm`` colour bar."""
    lo = int(math.ceil(math.log10(lin)))
    hi = int(math.floor(math.log10(vmax)))
    decades = list(range(lo, hi + 1)) or [hi]
    step = max(1, int(math.ceil(len(decades) / 3)))
    decades = decades[::-1][::step][::-1]
    pos = [10.0**d for d in decades]
    ticks = [-p for p in pos[::-1]] + [0.0] + pos
    labels = [f"$-10^{{{d}}}$" for d in decades[::-1]] + ["0"] + [f"$10^{{{d}}}$" for d in decades]
    return ticks, labels


def plot_comparison(
    pred: np.ndarray,
    ref: np.ndarray,
    out_png: PathLike,
    *,
    units: str = "value per cell",
    title: str | None = None,
    overwrite: bool = True,
    dpi: int = 100,
    max_map_cells: int = 240,
) -> Path:
    """Scatter and maps of a prediction against a reference on the same grid.

    Four panels: a log-log hexbin of the cells where both are > 0 with the 1:1 line; the
    prediction and the reference on a shared ``LogNorm``; the error ``pred - ref`` on a
    ``SymLogNorm`` symmetric around zero. Large maps are block-summed for display only.

    Args:
        pred: Prediction on the reference grid, ``[rows, cols]``, NaN = nodata/excluded.
        ref: Reference, same shape.
        out_png: Output PNG (written atomically).
        units: Value units for the axis and colour-bar labels (e.g. "t CO2 / cell / yr").
        title: Figure title.
        overwrite: Replace an existing file.
        dpi: Resolution (100 keeps the file well under 300 KB).
        max_map_cells: Longest side of a displayed map, in cells (larger maps are block-summed).

    Returns:
        The written path.
    """
    from matplotlib.colors import LogNorm, SymLogNorm


    plt = _pyplot()
    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape or pred.ndim != 2:
        raise ValueError(f"pred and ref must be 2-D arrays of the same shape, got {pred.shape} and {ref.shape}")
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.4), gridspec_kw={"width_ratios": [1.05, 1, 1, 1]})
    # --- scatter (all cells at evaluation resolution)
    ok = np.isfinite(pred) & np.isfinite(ref)
    both = ok & (pred > 0) & (ref > 0)
    ax = axes[0]
    if both.any():
        x, y = ref[both], pred[both]
        lo = float(min(x.min(), y.min()))
        hi = float(max(x.max(), y.max()))
        hb = ax.hexbin(x, y, xscale="log", yscale="log", gridsize=45, bins="log", cmap="viridis", mincnt=1,
                       extent=(np.log10(lo), np.log10(hi), np.log10(lo), np.log10(hi)))
        ax.plot([lo, hi], [lo, hi], color="crimson", lw=1.2, ls="--", label="1:1")
        ax.legend(loc="upper left", fontsize=8)
        cb = fig.colorbar(hb, ax=ax, fraction=0.046, pad=0.03)
        cb.set_label("cells per bin", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    else:
        ax.text(0.5, 0.5, "no cell > 0 in both", ha="center", va="center", transform=ax.transAxes)
    n_zero_mismatch = int((ok & ((pred > 0) != (ref > 0))).sum())
    ax.set_xlabel(f"reference ({units})", fontsize=9)
    ax.set_ylabel(f"prediction ({units})", fontsize=9)
    ax.set_title(f"cells > 0 in both (n={int(both.sum())}; {n_zero_mismatch} zero in one only)", fontsize=9)
    ax.tick_params(labelsize=8)
    # --- maps (display-reduced)
    pm, rm = display_reduce(pred, max_map_cells), display_reduce(ref, max_map_cells)
    vmin, vmax = log_limits(pm, rm)
    norm = LogNorm(vmin=vmin, vmax=vmax, clip=False)
    cmap = _cmap(_CMAP)
    k = pred.shape[0] // pm.shape[0]
    agg = "" if k == 1 else f" (sums of {k}x{k} cells)"
    _map_panel(axes[1], fig, pm, norm, cmap, f"prediction{agg}", units)
    _map_panel(axes[2], fig, rm, norm, cmap, f"reference{agg}", units)
    err = pm - rm
    finite = np.abs(err[np.isfinite(err) & (err != 0)])
    emax = float(np.quantile(finite, 0.999)) if finite.size else 1.0
    emax = emax if emax > 0 else 1.0
    lin = float(np.quantile(finite, 0.25)) if finite.size else emax / 100
    lin = min(max(lin, emax * 1e-4), emax / 10)
    enorm = SymLogNorm(linthresh=lin, vmin=-emax, vmax=emax, base=10)
    cb = _map_panel(axes[3], fig, err, enorm, _cmap(_ERR_CMAP), "error: prediction - reference", units, log=False)
    ticks, labels = _symlog_ticks(lin, emax)
    cb.set_ticks(ticks, labels=labels)
    fig.text(0.995, 0.01, "grey: 0 (no error on the error map), white: nodata", ha="right", va="bottom", fontsize=7,
             color="0.35")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out_png, overwrite, dpi)


def plot_quicklook(
    panels: Sequence[tuple[str, np.ndarray]],
    out_png: PathLike,
    *,
    units: str = "t CO2 / cell / yr",
    title: str | None = None,
    overwrite: bool = True,
    dpi: int = 100,
    shared_groups: Sequence[Sequence[int]] | None = None,
    boxes: dict[int, tuple[int, int, int, int]] | None = None,
    units_per_panel: Sequence[str] | None = None,
) -> Path:
    """Side-by-side maps on log colour scales (e.g. 1 km input, 100 m output, 100 m truth).

    Args:
        panels: ``[(title, array [rows, cols]), ...]``; NaN = nodata.
        out_png: Output PNG (written atomically).
        units: Colour-bar label.
        title: Figure title.
        overwrite: Replace an existing file.
        dpi: Resolution.
        shared_groups: Panel indexes sharing colour limits (e.g. ``[[0], [1, 2]]``: the 1 km input
            has its own scale, the 100 m output and truth share one); default: all share one.
        boxes: ``{panel: (row, col, height, width)}`` rectangles (in cells of that panel) to outline,
            e.g. the zoom window of the other panels.
        units_per_panel: Colour-bar label per panel (default ``units`` for all).

    Returns:
        The written path.
    """
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    n = len(panels)
    if n == 0:
        raise ValueError("no panels to plot")
    groups = [list(g) for g in shared_groups] if shared_groups else [list(range(n))]
    norms: dict[int, Any] = {}
    for g in groups:
        vmin, vmax = log_limits(*[np.asarray(panels[i][1], dtype=np.float64) for i in g])
        for i in g:
            norms[i] = LogNorm(vmin=vmin, vmax=vmax)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.6))
    axes = np.atleast_1d(axes)
    cmap = _cmap(_CMAP)
    from matplotlib.patches import Rectangle

    for i, (name, arr) in enumerate(panels):
        label = units_per_panel[i] if units_per_panel else units
        _map_panel(axes[i], fig, np.asarray(arr, dtype=np.float64), norms.get(i, LogNorm()), cmap, name, label)
        if boxes and i in boxes:
            r, c, h, w = boxes[i]
            axes[i].add_patch(Rectangle((c - 0.5, r - 0.5), w, h, fill=False, edgecolor="cyan", lw=1.5))
    fig.text(0.995, 0.01, "grey: 0, white: nodata", ha="right", va="bottom", fontsize=7, color="0.35")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out_png, overwrite, dpi)


def display_reduce(a: np.ndarray, max_cells: int = 600) -> np.ndarray:
    """Block-sum a map for display so that its longer side is at most ``max_cells`` (NaN kept)."""
    k = max(1, int(math.ceil(max(a.shape) / max_cells)))
    if k == 1:
        return a
    h, w = a.shape[0] // k * k, a.shape[1] // k * k
    return _block_sum(a[:h, :w], k)
