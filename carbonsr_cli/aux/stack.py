"""The aux stack: every aux layer aligned onto the child grid, read window by window.

:func:`discover_aux` turns user arguments (files, globs, directories) into
:class:`AuxSource` objects; :class:`AuxStack` reads any child window of all their layers as a
float32 array ``[C_aux, T, h, w]`` of raw physical values on the
:class:`~carbonsr_cli.grids.ChildGrid`.

Layer names (stable; a model checks it gets the same names in the same order):

- raster, one band: ``<stem>``; several bands: ``<stem>:<band description>`` or ``<stem>:b<k>``;
- categorical raster: one cover-fraction layer per class, ``<stem>:class<code>``;
- vector lines: ``<stem>:length`` (metres of line per child cell) and, when a
  ``class``/``fclass``/``highway`` attribute exists, ``<stem>:length:<value>`` (at most
  :data:`MAX_CLASSES` values, the longest in total; shorter classes count in the total only);
  polygons: ``<stem>:cover`` (fraction of the cell covered, [0, 1]); points: ``<stem>:count``;
- point attribute (``plants.gpkg:co2_t_yr``: a vector path with a trailing ``:<attribute>``, split
  off only when the whole text is not an existing file): ``<stem>:<attribute>``, the sum of that
  numeric attribute over the points in each child cell (missing values count as 0, with a
  warning). Point counts and sums are sparse, heavy-tailed layers (``stats`` gives them log1p).

Years: a 4-digit year (1900-2100) in the file name or band description marks a layer as
belonging to that year and is removed from its name (``ntl_2019.tif`` and ``ntl_2020.tif``
are one layer ``ntl``). For year ``T`` of the stack the layer's file/band of year ``T`` is used;
if there is none, a static (year-less) file of the same name if there is one, else the
nearest available year (ties: the later year) with an :class:`AuxFillWarning`. Year-less
layers broadcast over ``T``. Stack years that hold no year (``"band1"``) use the latest year.

Resampling (per layer, overridable with ``resampling={"<layer or stem>": "<name>"}``, any
``rasterio.enums.Resampling`` name):

- continuous raster finer than (or as fine as) the child cells: ``average``
  (area-weighted mean); coarser: ``bilinear``;
- categorical raster: per-class fractions. Class codes are sampled with nearest neighbour on a
  grid ``k`` times finer than the child grid (``k = clamp(ceil(child cell / source pixel),
  2, 10)``) and counted per child cell, so no code is ever interpolated. Fractions are exact
  when the source grid is aligned with the child grid and ``child cell / source pixel`` is an
  integer <= 10; otherwise the sampling error is at most about ``1/k`` at class edges.
  Classes come from one scan of the raster (all pixels if <= 50 M, else a decimated read);
  at most :data:`MAX_CLASSES` (the most frequent) are kept, with a warning; cells of dropped
  classes then sum to less than 1. ``nearest`` or ``mode`` as override gives one layer of
  class codes instead (named ``<stem>``); interpolating overrides are refused.

Fill rule (nodata, outside the aux source, or outside the child grid in boundless windows):

- continuous layers: the layer's valid mean over the parent extent (computed once, on a
  decimated read of at most 512 x 512 samples); an all-nodata layer (allowed only with
  ``fill_missing=True``) is filled with 0;
- fractions, lengths, cover fractions and counts: 0 (for categorical layers a cell with some
  valid source pixels gets fractions over its valid pixels, so they still sum to 1).

Coverage (:meth:`AuxStack.coverage`): for each layer the fraction of the parent extent inside
the source's bounds (sampled at <= 512 x 512 points, in the source CRS) and the fraction of
the extent that is filled (nodata or outside the source, on the same decimated read). A raster
layer covering less than 99.9 % of the extent, or all nodata, raises
:class:`~carbonsr_cli.errors.InputDataError` naming the file unless ``fill_missing=True``
(then :class:`~carbonsr_cli.errors.AuxFillWarning`); a layer not overlapping the extent at all
is always an error. Vector layers are only required to overlap (no features = 0).

Performance: each source is opened once; its ``WarpedVRT`` objects (one per resampling) and
reprojected, spatially indexed vectors are kept for the life of the stack, so use it as a
context manager or call :meth:`AuxStack.close`. Rasters in the child CRS (north-up, same pixel
ratio on both axes, no mask but nodata) skip the warp where that gives the warp's result:
same-size pixels on the child grid lines are read directly; integer-finer ones on the grid
lines are block-averaged (``average``) or block-counted (categorical, ``f <= 10``: the same
counts as the supersampled path); coarser ones are upsampled with GDAL's bilinear kernel
(``bilinear``, any offset). The only known difference: with ``average`` from a finer source,
cells entirely outside the source get the fill value where GDAL lets edge pixels leak into
some of them. ``AuxStack.fast = False`` forces the warp everywhere (tests, benchmarks).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from carbonsr_cli.aux import warp
from carbonsr_cli.aux.coverage import check_coverage
from carbonsr_cli.aux.readers import reader_for
from carbonsr_cli.aux.sources import AuxSource, LayerCoverage, _Align, _Group, _Slot, _year_of
from carbonsr_cli.aux.vector import VectorData
from carbonsr_cli.errors import AuxFillWarning, UsageError
from carbonsr_cli.grids import window_ints
from carbonsr_cli.rasters import open_raster

if TYPE_CHECKING:
    from rasterio.windows import Window

    from carbonsr_cli.grids import ChildGrid

__all__ = ["AuxStack"]


# --------------------------------------------------------------------------- discovery


# --------------------------------------------------------------------------- stack


class AuxStack:
    """Aux layers of several sources aligned on a child grid, read by window.

    Args:
        sources: From :func:`discover_aux`.
        child_grid: Target grid (values land on its cells).
        years: Year labels of the stack's T axis (e.g. the main raster's band names
            ``["2019", "2020"]``); ``T = len(years)``.
        fill_missing: Allow layers that do not cover the parent extent or are all nodata
            (filled by the rule in the module docstring, with ``AuxFillWarning``).
        resampling: Per-layer override, keyed by layer name without year (``"ntl"``,
            ``"s2:nir"``) or file stem: a ``rasterio.enums.Resampling`` name; for categorical
            layers ``"nearest"``/``"mode"`` (class codes) or ``"fractions"`` (default).

    Raises:
        UsageError: bad override, duplicate layer/year, or empty ``years``.
        InputDataError: a layer does not overlap the extent, or (without ``fill_missing``)
            covers it only partly or is all nodata.
    """

    def __init__(
        self,
        sources: Sequence[AuxSource],
        child_grid: ChildGrid,
        years: Sequence[str],
        *,
        fill_missing: bool = False,
        resampling: Mapping[str, str] | None = None,
    ) -> None:
        from rasterio.enums import Resampling

        if len(years) == 0:
            raise UsageError("the aux stack needs at least one year")
        self.grid = child_grid
        self.years = [str(y) for y in years]
        self.fill_missing = fill_missing
        self._pid = os.getpid()
        self._datasets: dict[Path, Any] = {}
        self._vrts: dict[tuple[Path, str, int], Any] = {}
        self._vectors: dict[tuple[Path, str | None], Any] = {}
        self._res_ratio: dict[Path, float] = {}
        self._align: dict[Path, _Align | None] = {}
        #: Read same-CRS sources without a warp where that gives the warp's result (see _fast_value).
        self.fast = True
        self._sample_xy: tuple[np.ndarray, np.ndarray] | None = None
        overrides = dict(resampling or {})
        known = {e.group for s in sources for e in s.entries} | {s.path.stem for s in sources}
        for key, value in overrides.items():
            if key not in known:
                raise UsageError(f"resampling override for unknown aux layer {key!r}; layers: {', '.join(sorted(known))}")
            if value != "fractions" and value not in Resampling.__members__:
                raise UsageError(f"unknown resampling {value!r} for aux layer {key!r}")
        try:
            self._groups = self._build_groups(sources, overrides)
            check_coverage(self)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- set-up

    def _build_groups(self, sources: Sequence[AuxSource], overrides: dict[str, str]) -> list[_Group]:
        groups: dict[tuple[str, str, str | None], _Group] = {}
        for src in sources:
            for entry in src.entries:
                override = overrides.get(entry.group) or overrides.get(src.path.stem)
                op, resamp = entry.op, ""
                if entry.op == "classes":
                    if override in ("nearest", "mode"):
                        op, resamp = "value", override
                    elif override not in (None, "fractions"):
                        raise UsageError(
                            f"categorical layer {entry.group!r} cannot use {override!r} resampling (it would "
                            "interpolate class codes); use 'fractions', 'nearest' or 'mode'",
                            src.path,
                        )
                elif entry.op == "value":
                    if override == "fractions":
                        raise UsageError(f"'fractions' applies to categorical layers only, not {entry.group!r}", src.path)
                    resamp = override or self._default_resampling(src)
                elif override is not None:
                    raise UsageError(f"vector layer {entry.group!r} takes no resampling override", src.path)
                slot = _Slot(src, entry, op, resamp)
                key = (entry.group, op, entry.attribute)
                g = groups.get(key)
                if g is None:
                    g = groups[key] = _Group(entry.group, op, [], {}, None)
                names = [entry.group] if op == "value" else entry.layer_names
                for n in names:
                    if n not in g.names:
                        g.names.append(n)
                if entry.year is None:
                    if g.static is not None:
                        raise UsageError(f"aux layer {entry.group!r} is given twice (also by {g.static.source.path})", src.path)
                    g.static = slot
                else:
                    if entry.year in g.by_year:
                        other = g.by_year[entry.year].source.path
                        raise UsageError(f"aux layer {entry.group!r} for {entry.year} is given twice (also by {other})", src.path)
                    g.by_year[entry.year] = slot
        out = list(groups.values())
        all_names = [n for g in out for n in g.names]
        dup = {n for n in all_names if all_names.count(n) > 1}
        if dup:
            raise UsageError(f"aux layer names clash: {', '.join(sorted(dup))}; rename one of the files")
        for g in out:
            if g.op == "classes":
                g.names.sort(key=lambda n: int(n.rsplit("class", 1)[1]))
            self._assign_years(g)
        return out

    def _assign_years(self, g: _Group) -> None:
        g.per_t = []
        for label in self.years:
            y = _year_of(label)
            if y is not None and y in g.by_year:
                g.per_t.append(g.by_year[y])
            elif g.static is not None:
                g.per_t.append(g.static)
            elif y is None:
                latest = max(g.by_year)
                warnings.warn(
                    f"{g.by_year[latest].source.path}: stack year {label!r} holds no year; using aux layer "
                    f"{g.key!r} of {latest}",
                    AuxFillWarning,
                    stacklevel=4,
                )
                g.per_t.append(g.by_year[latest])
            else:
                nearest = min(g.by_year, key=lambda a: (abs(a - y), -a))
                warnings.warn(
                    f"{g.by_year[nearest].source.path}: no aux layer {g.key!r} for {y}; using {nearest}",
                    AuxFillWarning,
                    stacklevel=4,
                )
                g.per_t.append(g.by_year[nearest])

    def _check_process(self) -> None:
        """After a fork (e.g. DataLoader workers), forget the parent's GDAL handles and reopen lazily."""
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._datasets, self._vrts = {}, {}

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without open datasets (they are reopened on first use)."""
        state = self.__dict__.copy()
        state["_datasets"], state["_vrts"] = {}, {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def _dataset(self, path: Path) -> Any:
        ds = self._datasets.get(path)
        if ds is None:

            ds = self._datasets[path] = open_raster(path, require_north_up=False)
        return ds

    def _res_ratio_of(self, src: AuxSource) -> float:
        """Source pixel size / child cell size, both measured in the child CRS near the grid centre."""
        if src.path in self._res_ratio:
            return self._res_ratio[src.path]
        from rasterio.warp import transform as warp_transform

        ds = self._dataset(src.path)
        g = self.grid
        cx, cy = g.transform.c + g.width / 2 * g.transform.a, g.transform.f + g.height / 2 * g.transform.e
        ratio = 1.0
        try:
            (sx,), (sy,) = warp_transform(g.crs, ds.crs, [cx], [cy])
            rx, ry = abs(ds.transform.a), abs(ds.transform.e)
            xs, ys = warp_transform(ds.crs, g.crs, [sx, sx + rx, sx], [sy, sy, sy - ry])
            px = math.hypot(xs[1] - xs[0], ys[1] - ys[0])
            py = math.hypot(xs[2] - xs[0], ys[2] - ys[0])
            cxr, cyr = g.res
            ratio = math.sqrt((px / cxr) * (py / cyr))
            if not math.isfinite(ratio) or ratio <= 0:
                ratio = 1.0
        except Exception:  # noqa: BLE001 - point outside the source CRS's domain: assume equal
            ratio = 1.0
        self._res_ratio[src.path] = ratio
        return ratio

    def _default_resampling(self, src: AuxSource) -> str:
        return "average" if self._res_ratio_of(src) <= 1.0 + 1e-6 else "bilinear"

    def _supersample(self, src: AuxSource) -> int:
        ratio = self._res_ratio_of(src)
        return int(min(10, max(2, math.ceil(1.0 / ratio - 1e-6))))

    def _alignment(self, src: AuxSource) -> _Align | None:
        """How a raster source sits on the child grid, or None if only a warp can align it.

        Not None when the source has the child CRS, is north-up with square-ratio pixels
        (same source pixel / child cell ratio on both axes) and has no mask other than nodata.
        """
        if src.path in self._align:
            return self._align[src.path]
        from rasterio.enums import MaskFlags

        ds = self._dataset(src.path)
        g = self.grid
        t, gt = ds.transform, g.transform
        out: _Align | None = None
        try:
            same_crs = ds.crs is not None and ds.crs == g.crs
        except Exception:  # noqa: BLE001 - incomparable CRSs
            same_crs = False
        flags_ok = all(set(f) <= {MaskFlags.all_valid, MaskFlags.nodata} for f in ds.mask_flag_enums)
        if (
            same_crs
            and flags_ok
            and t.b == 0 and t.d == 0 and gt.b == 0 and gt.d == 0
            and t.a > 0 and gt.a > 0 and t.e < 0 and gt.e < 0
        ):
            rx, ry = t.a / gt.a, t.e / gt.e
            if abs(rx - ry) <= 1e-9 * rx:
                out = _Align(rx, (gt.c - t.c) / t.a, (gt.f - t.f) / t.e)
        self._align[src.path] = out
        return out


    def _vrt(self, src: AuxSource, resampling: str, k: int = 1) -> Any:
        """WarpedVRT of a source onto the child grid (``k`` times finer), opened once."""
        key = (src.path, resampling, k)
        vrt = self._vrts.get(key)
        if vrt is None:
            vrt = self._vrts[key] = warp._warped_vrt(self._dataset(src.path), self.grid, resampling, k)
        return vrt

    def _vector(self, src: AuxSource) -> Any:
        data = self._vectors.get((src.path, src.attribute))
        if data is None:
            line = next((e for e in src.entries if e.op == "line_length"), None)
            data = VectorData.build(src.frame(), self.grid.crs, line.classes if line else (), src.class_attr, src.attribute)
            self._vectors[(src.path, src.attribute)] = data
        return data


    # ----------------------------------------------------------------- public

    @property
    def names(self) -> list[str]:
        """Layer names in channel order (``C_aux`` of them)."""
        return [n for g in self._groups for n in g.names]

    @property
    def point_names(self) -> list[str]:
        """Names of the point-count and point-sum layers (sparse and heavy-tailed), in channel order."""
        return [n for g in self._groups if g.op in ("point_count", "point_sum") for n in g.names]

    @property
    def channels(self) -> int:
        """Number of aux channels ``C_aux``."""
        return sum(len(g.names) for g in self._groups)

    def coverage(self) -> list[LayerCoverage]:
        """Coverage and nodata fraction of every layer file/band used, in channel order."""
        out: list[LayerCoverage] = []
        seen: set[int] = set()
        for g in self._groups:
            for s in [*([g.static] if g.static else []), *(g.by_year[y] for y in sorted(g.by_year))]:
                if id(s) not in seen and s.coverage is not None:
                    seen.add(id(s))
                    out.append(s.coverage)
        return out

    def read(self, child_window: Window, out: np.ndarray | None = None) -> np.ndarray:
        """Read all aux layers for a child window.

        Args:
            child_window: Window in child cells; may extend past the grid (outside cells
                get the layer's fill value).
            out: Optional float32 ``[C_aux, T, h, w]`` array to fill (e.g. shared memory).

        Returns:
            float32 ``[C_aux, T, h, w]`` of raw physical values (units of each source;
            metres of line, fractions in [0, 1], counts); ``out`` when given.
        """

        self._check_process()
        c, r, w, h = window_ints(child_window)
        shape = (self.channels, len(self.years), h, w)
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32:
            raise ValueError(f"out has shape {out.shape} {out.dtype}, expected {shape} float32")
        # A slot's arrays are kept only until its last year in ``out`` (a static layer fills every
        # year from one read): the peak is one source's arrays, not the whole window's.
        last_use = {id(slot): (gi, t) for gi, g in enumerate(self._groups) for t, slot in enumerate(g.per_t)}
        cache: dict[int, dict[str, np.ndarray]] = {}
        ch = 0
        for gi, g in enumerate(self._groups):
            for t, slot in enumerate(g.per_t):
                arrays = cache.get(id(slot))
                if arrays is None:
                    arrays = cache[id(slot)] = self._read_slot(slot, c, r, w, h)
                for i, name in enumerate(g.names):
                    a = arrays.get(name)
                    if a is None:
                        out[ch + i, t] = 0.0
                    else:
                        out[ch + i, t] = a
                if last_use[id(slot)] == (gi, t):
                    del cache[id(slot)]
            ch += len(g.names)
        return out

    def prepare(self) -> None:
        """Build what every read needs (vector indexes, source alignments) once, before copies.

        Copies of a prepared stack (pickled to reader processes, or one per reader thread)
        start reading at once instead of each rebuilding the vector index.
        """
        self._check_process()
        for g in self._groups:
            for slot in g.per_t:
                if slot.source.kind == "vector":
                    self._vector(slot.source)
                else:
                    self._alignment(slot.source)
                    self._res_ratio_of(slot.source)


    def reader_copy(self) -> AuxStack:
        """A prepared copy that pickles small: vector sources without their GeoDataFrame.

        For reader processes: once a vector source's index (:class:`VectorData`) is built the
        GeoDataFrame is not read again, and pickling it would send every geometry twice.
        """
        import copy
        import dataclasses

        self.prepare()
        memo: dict[int, Any] = {}
        for g in self._groups:
            for slot in [*g.by_year.values(), *([g.static] if g.static else []), *g.per_t]:
                src = slot.source
                if src.kind == "vector" and (src.path, src.attribute) in self._vectors and id(src) not in memo:
                    memo[id(src)] = dataclasses.replace(src, gdf=None)
        return self.copy(groups=copy.deepcopy(self._groups, memo))

    def copy(self, groups: list[Any] | None = None) -> AuxStack:
        """A copy with its own (lazily reopened) dataset handles, e.g. for another thread.

        Layer definitions are shared (or replaced by ``groups``); the copy's :meth:`close`
        leaves this stack's handles and vector indexes alone.
        """
        state = self.__getstate__()
        if groups is not None:
            state["_groups"] = groups
        state["_vectors"] = dict(state["_vectors"])
        new = AuxStack.__new__(AuxStack)
        new.__setstate__(state)
        return new

    def subset(self, names: Sequence[str]) -> AuxStack:
        """A copy (own dataset handles) that reads only the layer groups holding ``names``."""
        want = set(names)
        return self.copy(groups=[g for g in self._groups if want & set(g.names)])

    def read_rows(self, child_row_window: Window) -> np.ndarray:
        """Read a full-width band of child rows (one query/warp per layer for the whole band).

        Args:
            child_row_window: Window whose rows are used; its columns are ignored (the band
                spans all child columns).

        Returns:
            float32 ``[C_aux, T, h, W]`` with ``W`` = child grid width.
        """
        from rasterio.windows import Window

        _, r, _, h = window_ints(child_row_window)
        return self.read(Window(0, r, self.grid.width, h))

    def warp_targets(self) -> dict[Path, list[_Slot]]:
        """Continuous raster files of this stack that only a warp aligns (see :func:`.warp.warp_targets`)."""
        return warp.warp_targets(self)

    def materialize_warps(self, directory: Path, threads: int, rows_per_band: int = 1024) -> list[Path]:
        """Warp every layer that needs a warp onto the child grid once (see :func:`.warp.materialize_warps`)."""
        return warp.materialize_warps(self, directory, threads, rows_per_band)

    def _read_slot(self, slot: _Slot, c: int, r: int, w: int, h: int) -> dict[str, np.ndarray]:
        """The layers of one slot on a child window, from the reader of its kind."""
        return reader_for(slot.op).read(self, slot, c, r, w, h)

    def _inner(self, c: int, r: int, w: int, h: int, k: int = 1) -> tuple[Any, tuple[slice, slice]] | None:
        """Part of a window inside the grid (in ``k``-times finer cells) and where it goes."""
        from rasterio.windows import Window

        g = self.grid
        c0, r0 = max(c, 0), max(r, 0)
        c1, r1 = min(c + w, g.width), min(r + h, g.height)
        if c1 <= c0 or r1 <= r0:
            return None
        win = Window(c0 * k, r0 * k, (c1 - c0) * k, (r1 - r0) * k)
        return win, (slice((r0 - r) * k, (r1 - r) * k), slice((c0 - c) * k, (c1 - c) * k))


    # ----------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Close every open WarpedVRT and dataset (safe to call twice)."""
        for vrt in self._vrts.values():
            vrt.close()
        self._vrts.clear()
        for ds in self._datasets.values():
            ds.close()
        self._datasets.clear()
        self._vectors.clear()

    def __enter__(self) -> AuxStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


