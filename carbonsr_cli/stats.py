"""Global statistics of the training data (``carbonsr stats``), streamed by window.

The JSON written here travels with every training run and checkpoint. Keys:

- ``main``: pooled over every band of every main file: ``sum``, ``cells`` (valid cells),
  ``n_zero`` (value == 0), ``n_nonzero`` (value > 0), ``n_negative``, ``n_nodata``,
  ``log_nz_over_nnz`` = log(Nz / Nnz) with Nz = cells <= 0 (what the loss treats as zero
  pixels) and Nnz = cells > 0 (natural log; if either count is 0, log((Nz + 1) / (Nnz + 1))),
  ``mean_log``/``std_log``/``cv_log`` of log1p over the nonzero cells (CV = std / mean,
  population std), ``min_nonzero``, ``max``, ``quantiles`` of the nonzero values
  (``p1 .. p99.9``). Quantiles are exact while the nonzero cells fit in
  ``exact_quantile_limit``; beyond that they come from a 4096-bin log10 histogram over
  1e-12..1e12 (about 1.4 % relative resolution).
- ``bands``: the same numbers per (file, band), with ``file`` and ``name`` (the year).
- ``grid``: path, CRS, transform, width, height, resolution, nodata, units, band names of the
  first main file, and ``factor``.
- ``aux``: one entry per aux channel in stack order: ``name``, ``transform`` ("log1p" for
  heavy-tailed layers: all values >= 0 and (skewness > 2 or max / p99 > 10, or a point count
  or point-attribute sum); else "identity"), ``clip_lo``/``clip_hi`` (p0.1 / p99.9 of the
  transformed values; min / max when those are equal, e.g. a sparse layer with > 99.9 %
  zeros, the max over all values read, not only the sampled ones), ``mean``/``std`` of the
  transformed, clipped values (std 1 for a constant layer), and the raw ``raw_mean``,
  ``raw_std``, ``raw_min``, ``raw_max``, ``skewness``, ``p99``, ``samples``. Aux layers are
  read through :class:`carbonsr_cli.aux.AuxStack` on the child grid, from a regular subset of
  120 x 120 tiles (every k-th tile row and column) on large rasters.
- ``aux_coverage``: per source layer: covered and nodata fractions, fill value.

:class:`AuxNormalizer` applies the ``aux`` entries to arrays or tensors.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from carbonsr_cli import __version__
from carbonsr_cli.atomic import atomic_write_text
from carbonsr_cli.aux import AuxStack, categorical_kinds, discover_aux
from carbonsr_cli.errors import InputDataError, MissingInputError, UsageError
from carbonsr_cli.grids import ParentGrid
from carbonsr_cli.nodata import nodata_mask
from carbonsr_cli.rasters import open_raster, read_window, read_years
from carbonsr_cli.units import cell_areas_m2, parse_unit, to_totals

__all__ = [
    "AuxNormalizer",
    "QUANTILES",
    "compute_stats",
    "load_stats",
    "save_stats",
]

STATS_FORMAT = "carbonsr-stats"
STATS_VERSION = 1
#: Quantile levels reported for the nonzero main values (name -> level).
QUANTILES: dict[str, float] = {
    "p1": 0.01, "p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75,
    "p90": 0.9, "p95": 0.95, "p99": 0.99, "p99.9": 0.999,
}
_HIST_BINS = 4096
_HIST_LOG10 = (-12.0, 12.0)
#: Cells read per window of the main raster.
_WINDOW_CELLS = 1 << 22


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of products in float64 without BLAS (BLAS threads are slow on small, busy machines)."""
    return float(np.multiply(a, b).sum())


# --------------------------------------------------------------------------- main raster


@dataclass
class _MainAccumulator:
    """Streaming statistics of one set of main-raster values (float64 sums, log histogram)."""

    exact_limit: int
    total: float = 0.0
    cells: int = 0
    n_zero: int = 0
    n_nonzero: int = 0
    n_negative: int = 0
    n_nodata: int = 0
    s_log: float = 0.0
    s_log2: float = 0.0
    vmin_nz: float = math.inf
    vmax: float = -math.inf
    kept: list[np.ndarray] | None = field(default_factory=list)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(_HIST_BINS, dtype=np.int64))

    def update(self, v: np.ndarray, nodata: np.ndarray) -> None:
        self.n_nodata += int(nodata.sum())
        x = v[~nodata]
        if x.size == 0:
            return
        self.cells += int(x.size)
        self.total += float(x.sum(dtype=np.float64))
        self.vmax = max(self.vmax, float(x.max()))
        nz = x[x > 0]
        self.n_nonzero += int(nz.size)
        self.n_zero += int((x == 0).sum())
        self.n_negative += int((x < 0).sum())
        if nz.size == 0:
            return
        lg = np.log1p(nz)
        self.s_log += float(lg.sum())
        self.s_log2 += float(_dot(lg, lg))
        self.vmin_nz = min(self.vmin_nz, float(nz.min()))
        lo, hi = _HIST_LOG10
        pos = ((np.log10(nz) - lo) / (hi - lo) * _HIST_BINS).astype(np.int64)
        self.hist += np.bincount(np.clip(pos, 0, _HIST_BINS - 1), minlength=_HIST_BINS)
        if self.kept is not None:
            self.kept.append(nz.astype(np.float64))
            if self.n_nonzero > self.exact_limit:
                self.kept = None

    def merge(self, o: _MainAccumulator) -> None:
        for name in ("total", "cells", "n_zero", "n_nonzero", "n_negative", "n_nodata", "s_log", "s_log2"):
            setattr(self, name, getattr(self, name) + getattr(o, name))
        self.vmin_nz = min(self.vmin_nz, o.vmin_nz)
        self.vmax = max(self.vmax, o.vmax)
        self.hist += o.hist
        if self.kept is not None and o.kept is not None and self.n_nonzero <= self.exact_limit:
            self.kept.extend(o.kept)
        else:
            self.kept = None

    def _quantiles(self) -> tuple[dict[str, float], str]:
        if self.n_nonzero == 0:
            return {k: math.nan for k in QUANTILES}, "none"
        if self.kept is not None:
            vals = np.concatenate(self.kept)
            qs = np.quantile(vals, list(QUANTILES.values()))
            return {k: float(q) for k, q in zip(QUANTILES, qs)}, "exact"
        cum = np.cumsum(self.hist)
        lo, hi = _HIST_LOG10
        width = (hi - lo) / _HIST_BINS
        out = {}
        for k, q in QUANTILES.items():
            target = q * (self.n_nonzero - 1) + 0.5
            b = int(np.searchsorted(cum, target))
            prev = cum[b - 1] if b > 0 else 0
            frac = (target - prev) / self.hist[b] if self.hist[b] else 0.5
            val = 10.0 ** (lo + (b + frac) * width)
            out[k] = float(min(max(val, self.vmin_nz), self.vmax))
        return out, "histogram"

    def result(self) -> dict[str, Any]:
        nz_cnt = self.n_zero + self.n_negative
        if nz_cnt > 0 and self.n_nonzero > 0:
            ratio = math.log(nz_cnt / self.n_nonzero)
        else:
            ratio = math.log((nz_cnt + 1) / (self.n_nonzero + 1))
        if self.n_nonzero:
            mean_log = self.s_log / self.n_nonzero
            var = max(self.s_log2 / self.n_nonzero - mean_log * mean_log, 0.0)
            std_log = math.sqrt(var)
            cv = std_log / mean_log if mean_log > 0 else 0.0
        else:
            mean_log = std_log = cv = 0.0
        quantiles, method = self._quantiles()
        return {
            "sum": self.total,
            "cells": self.cells,
            "n_zero": self.n_zero,
            "n_nonzero": self.n_nonzero,
            "n_negative": self.n_negative,
            "n_nodata": self.n_nodata,
            "log_nz_over_nnz": ratio,
            "mean_log": mean_log,
            "std_log": std_log,
            "cv_log": cv,
            "min_nonzero": self.vmin_nz if self.n_nonzero else math.nan,
            "max": self.vmax if self.cells else math.nan,
            "quantiles": quantiles,
            "quantile_method": method,
        }


def _row_windows(height: int, width: int) -> list[Any]:
    from rasterio.windows import Window

    rows = max(1, min(height, _WINDOW_CELLS // max(width, 1)))
    return [Window(0, r, width, min(rows, height - r)) for r in range(0, height, rows)]


def _main_file_stats(
    path: Path, *, units: str | None, exact_limit: int
) -> tuple[dict[str, Any], list[tuple[str, _MainAccumulator]]]:
    """Stream one main raster; returns its grid description and one accumulator per band."""

    grid = ParentGrid.from_raster(path)
    with open_raster(path) as ds:
        names = read_years(ds)
        nodata = ds.nodata
        tag_units = ds.tags().get("UNITS") or ds.tags().get("units") or (ds.units[0] if ds.units and ds.units[0] else None)
        unit = None
        if units is not None:

            unit = parse_unit(units)
        accs = [_MainAccumulator(exact_limit) for _ in names]
        for win in _row_windows(ds.height, ds.width):
            arr = read_window(ds, win, out_dtype="float64")
            if unit is not None and unit.is_density:

                arr = to_totals(arr, unit, cell_areas_m2(grid, win), nodata=nodata)
            bad = ~np.isfinite(arr) | nodata_mask(arr, nodata, nan=True)
            for b, acc in enumerate(accs):
                acc.update(arr[b], bad[b])
        desc = {
            "path": str(Path(path)),
            "crs": ds.crs.to_string() if ds.crs else None,
            "transform": list(ds.transform)[:6],
            "width": ds.width,
            "height": ds.height,
            "res": list(ds.res),
            "nodata": nodata,
            "dtype": ds.dtypes[0],
            "units": units or tag_units or "t/cell/yr (assumed)",
            "band_names": names,
            "is_geographic": bool(ds.crs.is_geographic) if ds.crs else False,
        }
    return desc, list(zip(names, accs))


# --------------------------------------------------------------------------- aux layers


def _aux_tile_windows(height: int, width: int, tile: int, max_tiles: int) -> list[Any]:
    """Regular subset of ``tile`` x ``tile`` child windows: every k-th tile row and column."""
    from rasterio.windows import Window

    nr, nc = math.ceil(height / tile), math.ceil(width / tile)
    k = max(1, math.ceil(math.sqrt(nr * nc / max_tiles)))
    out = []
    for i in range(0, nr, k):
        for j in range(0, nc, k):
            r, c = i * tile, j * tile
            out.append(Window(c, r, min(tile, width - c), min(tile, height - r)))
    return out


@dataclass
class _AuxAccumulator:
    n: int = 0
    s: float = 0.0
    s2: float = 0.0
    vmin: float = math.inf
    vmax: float = -math.inf
    n_nonfinite: int = 0
    samples: list[np.ndarray] = field(default_factory=list)

    def update(self, x: np.ndarray, rng: np.random.Generator, k: int) -> None:
        finite = np.isfinite(x)
        self.n_nonfinite += int((~finite).sum())
        x = x[finite].astype(np.float64)
        if x.size == 0:
            return
        self.n += x.size
        self.s += float(x.sum())
        self.s2 += float(_dot(x, x))
        self.vmin = min(self.vmin, float(x.min()))
        self.vmax = max(self.vmax, float(x.max()))
        self.samples.append(x if x.size <= k else x[rng.random(x.size) < k / x.size])


def _aux_entry(name: str, acc: _AuxAccumulator, sparse: bool = False) -> dict[str, Any]:
    """Choose the normalisation of one aux channel from its (sampled) values.

    ``sparse``: a point count or sum, log1p whenever its values are >= 0.
    """
    if acc.n == 0:
        return {"name": name, "transform": "identity", "mean": 0.0, "std": 1.0, "clip_lo": 0.0, "clip_hi": 0.0,
                "raw_mean": math.nan, "raw_std": math.nan, "raw_min": math.nan, "raw_max": math.nan,
                "skewness": math.nan, "p99": math.nan, "samples": 0, "nonfinite": acc.n_nonfinite}
    x = np.concatenate(acc.samples)
    raw_mean = acc.s / acc.n
    raw_std = math.sqrt(max(acc.s2 / acc.n - raw_mean * raw_mean, 0.0))
    xs_mean, xs_std = float(x.mean()), float(x.std())
    skew = float(np.mean(((x - xs_mean) / xs_std) ** 3)) if xs_std > 0 else 0.0
    p99 = float(np.quantile(x, 0.99))
    heavy = acc.vmin >= 0 and (sparse or skew > 2 or (p99 > 0 and acc.vmax / p99 > 10))
    z = np.log1p(x) if heavy else x
    lo, hi = (float(v) for v in np.quantile(z, [0.001, 0.999]))
    if hi <= lo:  # sparse layer (> 99.9 % one value): clipping would erase it
        lo, hi = float(z.min()), max(float(z.max()), float(np.log1p(acc.vmax) if heavy else acc.vmax))
    zc = np.clip(z, lo, hi)
    mean, std = float(zc.mean()), float(zc.std())
    return {
        "name": name,
        "transform": "log1p" if heavy else "identity",
        "mean": mean,
        "std": std if std > 1e-12 else 1.0,
        "clip_lo": lo,
        "clip_hi": hi,
        "raw_mean": raw_mean,
        "raw_std": raw_std,
        "raw_min": acc.vmin,
        "raw_max": acc.vmax,
        "skewness": skew,
        "p99": p99,
        "samples": int(x.size),
        "nonfinite": acc.n_nonfinite,
    }


def _aux_stats(
    stacks: Sequence[Any], *, tile: int, max_tiles: int, max_samples: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    names = list(stacks[0].names)
    for st in stacks[1:]:
        if list(st.names) != names:
            raise UsageError(f"aux layers differ between main files: {names} vs {list(st.names)}")
    accs = [_AuxAccumulator() for _ in names]
    plans = [(st, _aux_tile_windows(st.grid.height, st.grid.width, tile, max_tiles)) for st in stacks]
    n_reads = sum(len(w) for _, w in plans)
    for st, wins in plans:
        for win in wins:
            arr = st.read(win)
            per = max(1, math.ceil(max_samples / (n_reads * arr.shape[1])))
            for c, acc in enumerate(accs):
                for t in range(arr.shape[1]):
                    acc.update(arr[c, t].ravel(), rng, per)
    sparse = set(getattr(stacks[0], "point_names", ()))
    entries = [_aux_entry(n, a, n in sparse) for n, a in zip(names, accs)]
    coverage = []
    for st in stacks:
        for cov in st.coverage():
            coverage.append({"name": cov.name, "path": str(cov.path), "year": cov.year, "covered": cov.covered,
                             "nodata": cov.nodata, "fill_value": cov.fill_value})
    return entries, coverage


# --------------------------------------------------------------------------- public API


def compute_stats(
    main_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    aux: Any = None,
    *,
    factor: int = 10,
    units: str | None = None,
    fill_missing: bool = False,
    categorical: Sequence[str] | None = None,
    aux_tile: int = 120,
    aux_max_tiles: int = 400,
    aux_max_samples: int = 200_000,
    exact_quantile_limit: int = 5_000_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Global statistics of main raster(s) and aux layers, streamed by window.

    Args:
        main_path: One main raster or several (e.g. regions or years); stats are pooled.
        aux: None; an :class:`~carbonsr_cli.aux.AuxStack` on the first main file's child grid
            (only with a single main file); or aux paths/globs/directories (``--aux``), stacked
            on every main file's child grid.
        factor: Child cells per parent cell (for the aux child grid).
        units: Unit of the main values (``--units``); densities are converted to totals per
            cell with the cell areas. None: the values are totals per cell.
        fill_missing: Passed to ``AuxStack`` when building it from paths.
        categorical: Aux raster file stems or names to read as categorical (``--categorical``).
        aux_tile: Edge of the aux tiles read, in child cells.
        aux_max_tiles: At most about this many aux tiles are read per main file (every k-th
            tile row and column).
        aux_max_samples: Values kept per aux channel for quantiles and skewness.
        exact_quantile_limit: Nonzero main cells kept for exact quantiles; beyond, histogram.
        seed: Seed of the aux subsampling.

    Returns:
        The stats dict (see the module docstring; JSON-serialisable).

    Raises:
        UsageError / InputDataError: unreadable inputs (one-line messages with the path).
    """

    paths = [Path(main_path)] if isinstance(main_path, (str, os.PathLike)) else [Path(p) for p in main_path]
    if not paths:
        raise UsageError("no main raster given")
    pooled = _MainAccumulator(exact_quantile_limit)
    bands: list[dict[str, Any]] = []
    grids: list[dict[str, Any]] = []
    for p in paths:
        desc, per_band = _main_file_stats(p, units=units, exact_limit=exact_quantile_limit)
        if all(acc.cells == 0 for _, acc in per_band):
            raise InputDataError("no valid cells: every cell is nodata (check the nodata value)", p)
        grids.append(desc)
        for name, acc in per_band:
            bands.append({"file": str(p), "name": name, **acc.result()})
            pooled.merge(acc)
    grid = dict(grids[0])
    grid["factor"] = int(factor)
    stats: dict[str, Any] = {
        "format": STATS_FORMAT,
        "format_version": STATS_VERSION,
        "software_version": __version__,
        "main": pooled.result(),
        "bands": bands,
        "files": grids,
        "grid": grid,
        "aux": [],
        "aux_coverage": [],
    }
    if aux is not None:
        stacks, owned = _aux_stacks(aux, paths, factor=factor, fill_missing=fill_missing, categorical=categorical)
        try:
            if stacks:
                stats["aux"], stats["aux_coverage"] = _aux_stats(
                    stacks, tile=aux_tile, max_tiles=aux_max_tiles, max_samples=aux_max_samples, seed=seed
                )
        finally:
            for st in owned:
                st.close()
    return stats


def _aux_stacks(
    aux: Any, paths: list[Path], *, factor: int, fill_missing: bool, categorical: Sequence[str] | None = None
) -> tuple[list[Any], list[Any]]:
    if hasattr(aux, "read") and hasattr(aux, "names"):
        if len(paths) > 1:
            raise UsageError("pass aux paths (not one AuxStack) when computing stats over several main files")
        return [aux], []

    aux_paths = [aux] if isinstance(aux, (str, os.PathLike)) else list(aux)
    if not aux_paths:
        return [], []
    sources = discover_aux(aux_paths, kinds=categorical_kinds(categorical))
    stacks: list[Any] = []
    try:
        for p in paths:
            with open_raster(p) as ds:
                years = read_years(ds)
            stacks.append(AuxStack(sources, ParentGrid.from_raster(p, warn=False).child(factor), years,
                                   fill_missing=fill_missing))
    except BaseException:
        for st in stacks:
            st.close()
        raise
    return stacks, stacks


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o: Any) -> Any:
    """Replace NaN/inf by None so the JSON is standard (null)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def stats_to_json_text(stats: dict[str, Any]) -> str:
    """The JSON text :func:`save_stats` writes (NaN/inf as null), with a final newline."""
    return json.dumps(_clean(stats), indent=2, default=_json_default, allow_nan=False) + "\n"


def save_stats(stats: dict[str, Any], path: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
    """Write the stats as JSON atomically (temp file + rename); NaN/inf become null.

    Raises:
        OutputError: the file exists and ``overwrite`` is False, or cannot be written.
    """

    return atomic_write_text(path, stats_to_json_text(stats), overwrite=overwrite)


def load_stats(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a stats JSON written by :func:`save_stats`.

    Raises:
        MissingInputError: file missing. InputDataError: not JSON or not a carbonsr stats file.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingInputError("stats file not found", p)
    try:
        stats = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputDataError(f"not a valid JSON stats file: {exc}", p) from None
    if not isinstance(stats, dict) or stats.get("format") != STATS_FORMAT or "main" not in stats:
        raise InputDataError("not a carbonsr stats file (run `carbonsr stats` to make one)", p)
    return stats


# --------------------------------------------------------------------------- normalisation


@functools.lru_cache(maxsize=64)
def _torch_const(values: tuple[Any, ...], dtype: Any, device: Any, shape: tuple[int, ...]) -> Any:
    """A per-channel constant as a tensor on ``device`` (cached: a host-to-device copy per batch
    would otherwise cost more than the arithmetic it feeds)."""
    import torch

    with torch.inference_mode(False):  # a normal tensor: usable in and outside inference mode
        return torch.tensor(values, dtype=dtype, device=device).reshape(shape)


@dataclass(frozen=True)
class AuxNormalizer:
    """Per-channel normalisation of aux stacks: transform, clip, standardise.

    ``z = clip(f(x), clip_lo, clip_hi)``, ``out = (z - mean) / std`` with ``f = log1p`` for
    heavy-tailed channels (negative inputs to log1p are first clamped to 0) and the identity
    otherwise; non-finite results become 0 (the channel mean).

    Attributes:
        names: Channel names, in order.
        log1p: Per channel, whether ``f`` is log1p.
        mean, std, clip_lo, clip_hi: Per-channel constants (transformed units).
    """

    names: tuple[str, ...]
    log1p: tuple[bool, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    clip_lo: tuple[float, ...]
    clip_hi: tuple[float, ...]

    @classmethod
    def from_stats(cls, stats: dict[str, Any], names: Sequence[str] | None = None) -> AuxNormalizer:
        """Build from a stats dict; ``names`` selects and orders channels (e.g. ``AuxStack.names``).

        Raises:
            InputDataError: a requested channel is missing from the stats.
        """
        entries = {e["name"]: e for e in stats.get("aux", [])}
        order = list(names) if names is not None else [e["name"] for e in stats.get("aux", [])]
        missing = [n for n in order if n not in entries]
        if missing:
            raise InputDataError(f"aux layer(s) {', '.join(missing)} not in the statistics; rerun `carbonsr stats` "
                                "with the same --aux layers")
        es = [entries[n] for n in order]

        def num(v: Any, default: float) -> float:
            return default if v is None or not math.isfinite(float(v)) else float(v)

        return cls(
            names=tuple(order),
            log1p=tuple(e["transform"] == "log1p" for e in es),
            mean=tuple(num(e["mean"], 0.0) for e in es),
            std=tuple(num(e["std"], 1.0) or 1.0 for e in es),
            clip_lo=tuple(num(e["clip_lo"], -math.inf) for e in es),
            clip_hi=tuple(num(e["clip_hi"], math.inf) for e in es),
        )

    def apply(self, x: Any) -> Any:
        """Normalise ``x`` ``[C, T, h, w]`` or ``[B, C, T, h, w]`` (numpy array or torch tensor).

        Returns:
            Same type, shape and floating dtype (float32 for integer input).
        """
        c_axis = x.ndim - 4
        if x.ndim not in (4, 5) or x.shape[c_axis] != len(self.names):
            raise ValueError(f"expected [C, T, h, w] or [B, C, T, h, w] with C = {len(self.names)}, got {tuple(x.shape)}")
        shape = [1] * x.ndim
        shape[c_axis] = len(self.names)
        if hasattr(x, "detach"):  # torch
            import torch

            dt = x.dtype if x.is_floating_point() else torch.float32

            def const(v: tuple[Any, ...]) -> Any:
                return _torch_const(v, dt, x.device, tuple(shape))

            y = x.to(dt)
            logm = const(self.log1p).bool()
            y = torch.where(logm, torch.log1p(y.clamp(min=0)), y)
            y = torch.minimum(torch.maximum(y, const(self.clip_lo)), const(self.clip_hi))
            y = (y - const(self.mean)) / const(self.std)
            return torch.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0)
        arr = np.asarray(x)
        dt = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float32

        def nconst(v: Sequence[Any]) -> np.ndarray:
            return np.asarray(v, dtype=dt).reshape(shape)

        y = arr.astype(dt, copy=False)
        with np.errstate(invalid="ignore"):
            y = np.where(nconst(self.log1p).astype(bool), np.log1p(np.maximum(y, 0)), y)
            y = np.clip(y, nconst(self.clip_lo), nconst(self.clip_hi))
            y = (y - nconst(self.mean)) / nconst(self.std)
        return np.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0).astype(dt, copy=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for checkpoints)."""
        return {"names": list(self.names), "log1p": list(self.log1p), "mean": list(self.mean),
                "std": list(self.std), "clip_lo": list(self.clip_lo), "clip_hi": list(self.clip_hi)}
