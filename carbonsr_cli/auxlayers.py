"""Auxiliary layers aligned onto the child grid, window by window.

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

import glob
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from carbonsr_cli.errors import AuxFillWarning, CarbonSRError, InputDataError, MissingInputError, UsageError

if TYPE_CHECKING:
    from rasterio.windows import Window

    from carbonsr_cli.grids import ChildGrid

__all__ = [
    "AUX_EXTENSIONS",
    "MAX_CLASSES",
    "AuxEntry",
    "AuxSource",
    "AuxStack",
    "LayerCoverage",
    "discover_aux",
    "categorical_kinds",
    "layer_names",
    "split_year",
]

#: File extensions picked up from directories (rasters, then vectors).
AUX_EXTENSIONS: tuple[str, ...] = (".tif", ".tiff", ".vrt", ".gpkg", ".geojson", ".shp")
_RASTER_EXT = {".tif", ".tiff", ".vrt"}
_VECTOR_EXT = {".gpkg", ".geojson", ".shp", ".json"}
#: Most classes kept per categorical raster or per vector class attribute.
MAX_CLASSES = 16
#: File-name words that mark an integer raster as categorical.
CATEGORICAL_HINTS: tuple[str, ...] = ("landcover", "land_cover", "lulc", "landuse", "land_use", "worldcover")
#: Minimum covered fraction of the parent extent for a raster layer.
MIN_COVERAGE = 0.999
#: Largest edge (samples) of the decimated read used for coverage, nodata and fill means.
SAMPLE_EDGE = 512
#: Pixels above which the class scan of a categorical raster reads a decimated version.
_SCAN_FULL_LIMIT = 50_000_000

_YEAR_RE = re.compile(r"(?<!\d)(19\d{2}|20\d{2}|2100)(?!\d)")
_SEP_RE = re.compile(r"([_\-. ])[_\-. ]+")


def split_year(text: str) -> tuple[str, int | None]:
    """Split a 4-digit year (1900-2100) out of a name.

    Args:
        text: File stem or band description, e.g. ``"ntl_2019"``.

    Returns:
        ``(name without the year, year)``, e.g. ``("ntl", 2019)``; ``(text, None)`` if no year.
    """
    found = list(_YEAR_RE.finditer(text))
    if not found:
        return text, None
    m = found[-1]
    base = _SEP_RE.sub(r"\1", text[: m.start()] + text[m.end() :]).strip("_-. ")
    return base, int(m.group(1))


@dataclass(frozen=True)
class AuxEntry:
    """One band (raster) or geometry family (vector) of a source: one or more output layers.

    Attributes:
        group: Layer name without year, e.g. ``"ntl"``, ``"s2:nir"``, ``"roads"``.
        op: ``"value"`` (continuous band), ``"classes"`` (categorical band -> fractions),
            ``"line_length"``, ``"polygon_cover"``, ``"point_count"`` or ``"point_sum"``.
        band: 1-based raster band, or None for vectors.
        year: Year the entry belongs to, or None (static).
        classes: Class codes (categorical) or class values (vector lines), in layer order.
        attribute: Numeric point attribute summed per cell (``"point_sum"``), else None.
    """

    group: str
    op: str
    band: int | None
    year: int | None
    classes: tuple[Any, ...] = ()
    attribute: str | None = None

    @property
    def layer_names(self) -> list[str]:
        """Output layer names of this entry (without year)."""
        if self.op == "value":
            return [self.group]
        if self.op == "classes":
            return [f"{self.group}:class{c}" for c in self.classes]
        if self.op == "line_length":
            return [f"{self.group}:length"] + [f"{self.group}:length:{c}" for c in self.classes]
        if self.op == "polygon_cover":
            return [f"{self.group}:cover"]
        if self.op == "point_count":
            return [f"{self.group}:count"]
        if self.op == "point_sum":
            return [f"{self.group}:{self.attribute}"]
        raise ValueError(f"unknown op {self.op!r}")


@dataclass
class AuxSource:
    """One aux file and the layers it provides.

    Attributes:
        path: The file.
        kind: ``"continuous"``, ``"categorical"`` (raster) or ``"vector"``.
        entries: Bands / geometry families, in layer order.
        crs: CRS of the file (``rasterio.crs.CRS`` for rasters, pyproj CRS for vectors).
        nodata: Raster nodata value, or None.
        class_attr: Vector attribute splitting line lengths into classes, or None.
        attribute: Numeric point attribute summed per child cell (``path:attribute``), or None.
    """

    path: Path
    kind: str
    entries: tuple[AuxEntry, ...]
    crs: Any = None
    nodata: float | None = None
    class_attr: str | None = None
    attribute: str | None = None
    gdf: Any = field(default=None, repr=False, compare=False)

    @property
    def layers(self) -> list[str]:
        """Output layer names of this file (years removed)."""
        return [n for e in self.entries for n in e.layer_names]


@dataclass(frozen=True)
class LayerCoverage:
    """Coverage of one aux layer (one file band / geometry family) over the parent extent.

    Attributes:
        name: Layer name without year (the group, e.g. ``"landcover"`` for all its classes).
        path: Source file.
        year: Year of the layer, or None if static.
        covered: Fraction of the parent extent inside the source's bounds, [0, 1].
        nodata: Fraction of the parent extent that is filled (nodata or outside), [0, 1].
        fill_value: Value used where the layer has no data (continuous: valid mean; else 0).
    """

    name: str
    path: str
    year: int | None
    covered: float
    nodata: float
    fill_value: float


# --------------------------------------------------------------------------- discovery


def _split_attribute(text: str) -> tuple[str, str | None]:
    """Split a trailing ``:<attribute>`` off an aux argument (``plants.gpkg:co2_t_yr``).

    Only when the whole text is not an existing path, the part after the last ``:`` holds no
    path separator and the part before it is not a drive letter (``C:``).
    """
    if ":" not in text or Path(text).expanduser().exists():
        return text, None
    head, attr = text.rsplit(":", 1)
    if not attr or not head or "/" in attr or "\\" in attr or (len(head) == 1 and head.isalpha()):
        return text, None
    return head, attr


def _expand(paths: Sequence[str | PathLike[str]]) -> list[tuple[Path, str | None]]:
    """Expand files, globs and directories into aux files with their point attribute (or None).

    Order is kept; the same file with the same attribute is listed once.
    """
    files: list[tuple[Path, str | None]] = []
    for raw in paths:
        text, attr = _split_attribute(str(raw))
        p = Path(text).expanduser()
        if attr is not None and p.is_dir():
            raise UsageError(f"':{attr}' (a point attribute) needs a vector file, not a directory", p)
        if p.is_dir():
            found = sorted(
                q for q in p.iterdir() if q.is_file() and q.suffix.lower() in AUX_EXTENSIONS and not q.name.startswith(".")
            )
            if not found:
                raise MissingInputError(f"directory holds no aux files ({', '.join(AUX_EXTENSIONS)})", p)
            files.extend((q, None) for q in found)
        elif p.exists():
            files.append((p, attr))
        elif glob.has_magic(text):
            found = sorted(Path(q) for q in glob.glob(str(p)) if Path(q).is_file())
            if not found:
                raise MissingInputError("glob matches no file", text)
            files.extend((q, attr) for q in found)
        else:
            raise MissingInputError("aux file not found", p)
    seen: set[tuple[Path, str | None]] = set()
    unique = []
    for f, a in files:
        key = (f.resolve(), a)
        if key not in seen:
            seen.add(key)
            unique.append((f, a))
    return unique


def expand_aux_paths(paths: Any) -> list[Path]:
    """The aux files named by ``paths`` (files, globs, directories; see :func:`discover_aux`).

    Paths that cannot be expanded (missing files, empty globs) are left out: the caller's
    own discovery reports them. Used to refuse an output that would replace an aux file.
    """
    if paths is None:
        return []
    if isinstance(paths, (str, PathLike)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        if not isinstance(raw, (str, PathLike)):
            continue  # e.g. an AuxStack passed by library callers
        try:
            files.extend(p for p, _ in _expand([raw]))
        except CarbonSRError:
            continue
    return files


def _base_name(path: Path) -> tuple[str, int | None]:
    """Layer base name and year of a file (a bare year as stem takes the directory name)."""
    base, year = split_year(path.stem)
    if not base:
        base = path.parent.name or "aux"
    return base, year


def _scan_classes(ds: Any, band: int, path: Path) -> tuple[int, ...]:
    """Class codes of a categorical band, the most frequent first, capped at MAX_CLASSES."""
    from rasterio.windows import Window

    from carbonsr_cli.rasters import read_window

    counts: dict[int, int] = {}
    nodata = ds.nodata

    def add(arr: np.ndarray) -> None:
        vals = arr.ravel()
        if nodata is not None:
            vals = vals[vals != nodata]
        if vals.size == 0:
            return
        u, c = np.unique(vals, return_counts=True)
        for v, n in zip(u.tolist(), c.tolist()):
            counts[int(v)] = counts.get(int(v), 0) + int(n)

    if ds.width * ds.height <= _SCAN_FULL_LIMIT:
        rows = max(1, 4_000_000 // max(ds.width, 1))
        for r in range(0, ds.height, rows):
            add(read_window(ds, Window(0, r, ds.width, min(rows, ds.height - r)), band))
    else:
        s = math.sqrt(ds.width * ds.height / 16e6)
        shape = (max(1, int(ds.height / s)), max(1, int(ds.width / s)))
        try:
            add(ds.read(band, out_shape=shape))
        except Exception as exc:  # noqa: BLE001 - GDAL read error on a corrupt file
            raise InputDataError(f"cannot read data (truncated or corrupt file?): {exc}", path) from None
    ranked = sorted(counts, key=lambda v: (-counts[v], v))
    if len(ranked) > MAX_CLASSES:
        warnings.warn(
            f"{path}: {len(ranked)} classes in band {band}; keeping the {MAX_CLASSES} most frequent "
            f"(dropped: {', '.join(map(str, sorted(ranked[MAX_CLASSES:])))}); cells of dropped classes "
            "get fractions summing to less than 1",
            AuxFillWarning,
            stacklevel=3,
        )
    return tuple(sorted(ranked[:MAX_CLASSES]))


def _raster_source(path: Path, kind_override: str | None) -> AuxSource:
    from carbonsr_cli.rasters import open_raster

    base, file_year = _base_name(path)
    with open_raster(path, require_north_up=False) as ds:
        dtype = np.dtype(ds.dtypes[0])
        tag = (ds.tags().get("CARBONSR_KIND") or "").strip().lower()
        if kind_override:
            kind = kind_override
        elif tag in ("categorical", "continuous"):
            kind = tag
        elif np.issubdtype(dtype, np.integer) and any(h in path.stem.lower() for h in CATEGORICAL_HINTS):
            kind = "categorical"
        else:
            kind = "continuous"
        if kind == "categorical" and not (np.issubdtype(dtype, np.integer) or tag == "categorical" or kind_override):
            raise InputDataError(f"categorical layer must have an integer data type, got {dtype}", path)
        entries = []
        for b in range(1, ds.count + 1):
            desc = (ds.descriptions[b - 1] or "").strip()
            desc_base, desc_year = split_year(desc) if desc else ("", None)
            year = desc_year if desc_year is not None else file_year
            if ds.count == 1:
                group = base
            else:
                label = desc_base if desc_base else (f"b{b}" if desc_year is None else "")
                group = f"{base}:{label}" if label else base
            if kind == "categorical":
                entries.append(AuxEntry(group, "classes", b, year, _scan_classes(ds, b, path)))
            else:
                entries.append(AuxEntry(group, "value", b, year))
        return AuxSource(path=path, kind=kind, entries=tuple(entries), crs=ds.crs, nodata=ds.nodata)


def _numeric_columns(gdf: Any) -> list[str]:
    """Columns of a GeoDataFrame holding numbers (booleans and the geometry excluded)."""
    import pandas as pd

    return [
        str(c) for c in gdf.columns
        if c != gdf.geometry.name
        and pd.api.types.is_numeric_dtype(gdf[c].dtype)
        and not pd.api.types.is_bool_dtype(gdf[c].dtype)
    ]


def _point_sum_source(path: Path, gdf: Any, types: np.ndarray, attribute: str, base: str, year: int | None) -> AuxSource:
    """The ``<stem>:<attribute>`` source of a point file (points only; missing values -> 0, warned)."""
    import pandas as pd

    is_point = np.isin(types, (0, 4))
    if not is_point.any():
        raise InputDataError(f"':{attribute}' sums a point attribute, but the file has no point geometries", path)
    numeric = _numeric_columns(gdf)
    listed = ", ".join(numeric) if numeric else "(none)"
    if attribute not in numeric:
        problem = "is not numeric" if attribute in gdf.columns else "does not exist"
        raise InputDataError(f"attribute {attribute!r} {problem}; numeric columns: {listed}", path)
    points = gdf[is_point]
    values = pd.to_numeric(points[attribute], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = int((~np.isfinite(values)).sum())
    if bad:
        warnings.warn(
            f"{path}: {bad} of {len(values)} points have no (finite) {attribute!r} value; counted as 0",
            AuxFillWarning,
            stacklevel=4,
        )
    entry = AuxEntry(base, "point_sum", None, year, attribute=attribute)
    return AuxSource(path=path, kind="vector", entries=(entry,), crs=gdf.crs, attribute=attribute,
                     gdf=points[[attribute, points.geometry.name]])


def _vector_source(path: Path, attribute: str | None = None) -> AuxSource:
    import geopandas as gpd
    import shapely

    try:
        gdf = gpd.read_file(path, engine="pyogrio")
    except Exception as exc:  # noqa: BLE001 - pyogrio/GDAL errors are varied
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputDataError(f"cannot read vector file: {msg}", path) from None
    if gdf.crs is None:
        raise InputDataError("vector file has no CRS; set one (e.g. ogr2ogr -a_srs EPSG:4326)", path)
    gdf = gdf[~(gdf.geometry.isna() | gdf.geometry.is_empty)]
    if len(gdf) == 0:
        raise InputDataError("vector file has no geometries", path)
    base, year = _base_name(path)
    types = shapely.get_type_id(np.asarray(gdf.geometry.values, dtype=object))
    if attribute is not None:
        return _point_sum_source(path, gdf, types, attribute, base, year)
    has_line = bool(np.isin(types, (1, 2, 5)).any())
    has_poly = bool(np.isin(types, (3, 6)).any())
    has_point = bool(np.isin(types, (0, 4)).any())
    class_attr = None
    classes: tuple[str, ...] = ()
    if has_line:
        cols = {c.lower(): c for c in gdf.columns if c != gdf.geometry.name}
        for name in ("class", "fclass", "highway"):
            if name in cols:
                class_attr = cols[name]
                break
        if class_attr is not None:
            lines = gdf[np.isin(types, (1, 2, 5))]
            lengths = lines.geometry.length.groupby(lines[class_attr].astype(str)).sum()
            ranked = sorted(lengths.index, key=lambda c: (-float(lengths[c]), c))
            if len(ranked) > MAX_CLASSES:
                warnings.warn(
                    f"{path}: {len(ranked)} values of {class_attr!r}; keeping the {MAX_CLASSES} longest "
                    "as separate layers (the others count in the total length only)",
                    AuxFillWarning,
                    stacklevel=3,
                )
            classes = tuple(sorted(ranked[:MAX_CLASSES]))
    entries = []
    if has_line:
        entries.append(AuxEntry(base, "line_length", None, year, classes))
    if has_poly:
        entries.append(AuxEntry(base, "polygon_cover", None, year))
    if has_point:
        entries.append(AuxEntry(base, "point_count", None, year))
    return AuxSource(path=path, kind="vector", entries=tuple(entries), crs=gdf.crs, class_attr=class_attr, gdf=gdf)


def categorical_kinds(names: Sequence[str] | None) -> dict[str, str] | None:
    """``discover_aux`` kinds marking these raster file stems or names categorical (``--categorical``)."""
    return {str(n): "categorical" for n in names} if names else None


def discover_aux(
    paths: Sequence[str | PathLike[str]],
    *,
    kinds: Mapping[str, str] | None = None,
) -> list[AuxSource]:
    """Find aux files and describe the layers each provides.

    Args:
        paths: Files, globs (expanded here, sorted) and directories (their
            ``.tif/.tiff/.vrt/.gpkg/.geojson/.shp`` files, sorted; not recursive). A vector
            file or glob may end in ``:<attribute>`` (``plants.gpkg:co2_t_yr``): that numeric
            attribute summed over the points per child cell, instead of the file's layers.
        kinds: Override the detected kind of rasters: ``{"<file stem or name>":
            "categorical"|"continuous"}``. Otherwise a raster is categorical if it has the tag
            ``CARBONSR_KIND=categorical``, or an integer type and a name containing one of
            :data:`CATEGORICAL_HINTS`.

    Returns:
        One :class:`AuxSource` per file, in argument order (sorted within globs/directories).

    Raises:
        UsageError: a path does not exist, a glob matches nothing, an unknown extension or
            an invalid ``kinds`` value, or ``:<attribute>`` on a raster or directory.
        InputDataError: a file cannot be read (not a raster/vector, no CRS, ...), or a point
            attribute is missing, not numeric, or the file has no points.
    """
    kinds = dict(kinds or {})
    for key, value in kinds.items():
        if value not in ("categorical", "continuous"):
            raise UsageError(f"aux kind for {key!r} must be 'categorical' or 'continuous', got {value!r}")
    sources = []
    for path, attribute in _expand(paths):
        ext = path.suffix.lower()
        if attribute is not None and ext not in _VECTOR_EXT:
            raise UsageError(f"':{attribute}' (a point attribute) applies to vector files of points only", path)
        if ext in _RASTER_EXT:
            sources.append(_raster_source(path, kinds.get(path.stem) or kinds.get(path.name)))
        elif ext in _VECTOR_EXT:
            sources.append(_vector_source(path, attribute))
        else:
            raise UsageError(f"unsupported aux file type {ext or '(none)'}; use one of {', '.join(AUX_EXTENSIONS)}", path)
    return sources


# --------------------------------------------------------------------------- stack


@dataclass
class _Slot:
    """Where a (group, year) entry comes from."""

    source: AuxSource
    entry: AuxEntry
    op: str  # effective op ("value" for categorical with a nearest/mode override)
    resampling: str  # rasterio Resampling name (value op), or "" for others
    fill: float = 0.0
    coverage: LayerCoverage | None = None


@dataclass
class _Group:
    key: str
    op: str
    names: list[str]
    by_year: dict[int, _Slot]
    static: _Slot | None
    per_t: list[_Slot] = field(default_factory=list)


@dataclass(frozen=True)
class _Align:
    """A same-CRS, north-up raster source relative to the child grid.

    Attributes:
        ratio: Source pixel size / child cell size (both axes).
        col0: Source column coordinate (pixels, fractional) of the child grid's left edge.
        row0: Source row coordinate of the child grid's top edge.
    """

    ratio: float
    col0: float
    row0: float


def _year_of(label: str) -> int | None:
    m = list(_YEAR_RE.finditer(str(label)))
    return int(m[-1].group(1)) if m else None



def _warped_vrt(ds: Any, grid: ChildGrid, resampling: str, k: int = 1, **warp_extras: Any) -> Any:
    """WarpedVRT of dataset ``ds`` onto ``grid`` (``k`` times finer), NaN outside and for nodata.

    float32 on the grid itself (``k == 1``) or for sources of <= 16 bits, else float64. The one
    definition of the warp used by window reads and by :meth:`AuxStack.materialize_warps`.
    """
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    kwargs: dict[str, Any] = dict(warp_extras)
    if ds.nodata is not None:
        kwargs["src_nodata"] = ds.nodata
    dtype = "float32" if np.dtype(ds.dtypes[0]).itemsize <= 2 or k == 1 else "float64"
    return WarpedVRT(
        ds,
        crs=grid.crs,
        transform=_subgrid(grid.transform, 0, 0, 1.0 / k, 1.0 / k),
        width=grid.width * k,
        height=grid.height * k,
        resampling=Resampling[resampling],
        nodata=float("nan"),
        dtype=dtype,
        **kwargs,
    )

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
            self._check_coverage()
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
            from carbonsr_cli.rasters import open_raster

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

    def _src_block(self, slot: _Slot, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        """Source pixels ``[r0:r1, c0:c1]`` (may extend past the raster) and their validity.

        Returns:
            ``(raw values [r1 - r0, c1 - c0] in the source dtype (0 where invalid), valid bool mask)``;
            outside the raster, nodata and non-finite values are invalid.
        """
        from rasterio.windows import Window

        ds = self._dataset(slot.source.path)
        h, w = r1 - r0, c1 - c0
        dtype = np.dtype(ds.dtypes[slot.entry.band - 1])
        raw = np.zeros((h, w), dtype=dtype)
        valid = np.zeros((h, w), dtype=bool)
        a0, a1 = max(r0, 0), min(r1, ds.height)
        b0, b1 = max(c0, 0), min(c1, ds.width)
        if a1 <= a0 or b1 <= b0:
            return raw, valid
        data = self._read_vrt(ds, slot.entry.band, Window(b0, a0, b1 - b0, a1 - a0), slot.source.path)
        ok = np.ones(data.shape, dtype=bool) if ds.nodata is None else data != ds.nodata
        if dtype.kind == "f":
            ok &= np.isfinite(data)
        raw[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = np.where(ok, data, 0)
        valid[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = ok
        return raw, valid

    def _fast_value(self, slot: _Slot, win: Any) -> np.ndarray | None:
        """Continuous layer on an inside-grid child window without a warp (NaN = fill), or None.

        Same results as the ``WarpedVRT`` path (up to float rounding) for: same-size pixels on
        the child grid lines (any of ``average``/``nearest``/``mode``: one pixel per cell);
        integer-finer pixels on the child grid lines with ``average`` (mean of the valid
        pixels of each cell; cells entirely outside the source are filled, where GDAL's
        average lets edge pixels leak into some of them); coarser pixels with ``bilinear``
        (GDAL's kernel: the 2 x 2 source pixels around each cell centre, weights of invalid
        or outside pixels dropped and the rest renormalised; a cell whose centre is outside
        the source or on an invalid pixel is filled).
        """
        al = self._alignment(slot.source)
        if al is None:
            return None
        c, r, w, h = int(win.col_off), int(win.row_off), int(win.width), int(win.height)
        tol = 1e-6
        on_lines = abs(al.col0 - round(al.col0)) <= tol and abs(al.row0 - round(al.row0)) <= tol
        if abs(al.ratio - 1.0) <= tol and on_lines and slot.resampling in ("average", "nearest", "mode"):
            sc, sr = int(round(al.col0)) + c, int(round(al.row0)) + r
            raw, valid = self._src_block(slot, sr, sr + h, sc, sc + w)
            out = raw.astype(np.float32)
            out[~valid] = np.nan
            return out
        inv = 1.0 / al.ratio
        f = int(round(inv))
        if al.ratio < 1.0 and f >= 2 and abs(inv - f) <= tol * f and slot.resampling == "average":
            # child grid lines must fall on source grid lines: col0 (in source pixels) integer
            if abs(al.col0 - round(al.col0)) > tol or abs(al.row0 - round(al.row0)) > tol:
                return None
            sc, sr = int(round(al.col0)) + c * f, int(round(al.row0)) + r * f
            raw, valid = self._src_block(slot, sr, sr + h * f, sc, sc + w * f)
            total = raw.astype(np.float64).reshape(h, f, w, f).sum(axis=(1, 3))
            n = valid.reshape(h, f, w, f).sum(axis=(1, 3))
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(n > 0, total / n, np.nan).astype(np.float32)
        if al.ratio > 1.0 + tol and slot.resampling == "bilinear":
            return self._bilinear(slot, al, c, r, w, h)
        return None

    def _bilinear(self, slot: _Slot, al: _Align, c: int, r: int, w: int, h: int) -> np.ndarray:
        """Bilinear upsampling of a coarser same-CRS source, as GDAL's warp kernel; NaN = fill."""
        ds = self._dataset(slot.source.path)
        u = al.col0 + (np.arange(c, c + w) + 0.5) / al.ratio  # cell centres in source pixels
        v = al.row0 + (np.arange(r, r + h) + 0.5) / al.ratio
        ix = np.floor(u - 0.5).astype(np.int64)
        iy = np.floor(v - 0.5).astype(np.int64)
        wx1, wy1 = u - 0.5 - ix, v - 0.5 - iy
        wx0, wy0 = 1.0 - wx1, 1.0 - wy1
        cs, ce = int(ix.min()), int(ix.max()) + 2
        rs, re_ = int(iy.min()), int(iy.max()) + 2
        raw, valid = self._src_block(slot, rs, re_, cs, ce)
        jx, jy = ix - cs, iy - rs
        all_valid = bool(valid.all())
        a = raw.astype(np.float64)
        if not all_valid:
            m = valid.astype(np.float64)
            a *= m
        num = a[:, jx] * wx0 + a[:, jx + 1] * wx1  # [source rows, w]
        num = num[jy] * wy0[:, None] + num[jy + 1] * wy1[:, None]
        if all_valid:  # every weight counts: the divisor is 1 (up to rounding)
            inside = ((v >= 0) & (v + 1e-10 <= ds.height))[:, None] & ((u >= 0) & (u + 1e-10 <= ds.width))[None, :]
            out = num.astype(np.float32)
            if not inside.all():
                out[~inside] = np.nan
            return out
        den = m[:, jx] * wx0 + m[:, jx + 1] * wx1
        den = den[jy] * wy0[:, None] + den[jy + 1] * wy1[:, None]
        # As GDAL's warp kernel: a cell is skipped (filled) when its centre is outside the
        # source or on an invalid source pixel (the pixel at floor(centre + 1e-10)).
        inside = ((v >= 0) & (v + 1e-10 <= ds.height))[:, None] & ((u >= 0) & (u + 1e-10 <= ds.width))[None, :]
        px = np.clip(np.floor(u + 1e-10).astype(np.int64) - cs, 0, ce - cs - 1)
        py = np.clip(np.floor(v + 1e-10).astype(np.int64) - rs, 0, re_ - rs - 1)
        ok = inside & valid[py][:, px] & (den >= 1e-5)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(ok, num / np.where(ok, den, 1.0), np.nan).astype(np.float32)

    def _fast_counts(self, slot: _Slot, win: Any) -> tuple[int, np.ndarray] | None:
        """``(f, per-class pixel counts [n_classes, h, w])`` for an inside-grid window without a warp, or None.

        Applies when the categorical source is on the child grid lines with pixels equal to the
        child cell or an integer ``f`` times finer (``f <= 10``, where the supersampled path is
        exact too): each cell counts its ``f * f`` pixels.
        """
        al = self._alignment(slot.source)
        if al is None:
            return None
        tol = 1e-6
        inv = 1.0 / al.ratio
        f = int(round(inv))
        if f < 1 or f > 10 or abs(inv - f) > tol * f:
            return None
        if abs(al.col0 - round(al.col0)) > tol or abs(al.row0 - round(al.row0)) > tol:
            return None
        c, r, w, h = int(win.col_off), int(win.row_off), int(win.width), int(win.height)
        sc, sr = int(round(al.col0)) + c * f, int(round(al.row0)) + r * f
        raw, valid = self._src_block(slot, sr, sr + h * f, sc, sc + w * f)
        classes = slot.entry.classes
        out = np.zeros((len(classes), h, w), dtype=np.float32)
        for i, code in enumerate(classes):
            hit = (raw == code) & valid
            if f == 1:
                out[i] = hit
            else:
                out[i] = hit.reshape(h, f, w, f).sum(axis=(1, 3), dtype=np.int32)
        return f, out

    def _vrt(self, src: AuxSource, resampling: str, k: int = 1) -> Any:
        """WarpedVRT of a source onto the child grid (``k`` times finer), opened once."""
        key = (src.path, resampling, k)
        vrt = self._vrts.get(key)
        if vrt is None:
            vrt = self._vrts[key] = _warped_vrt(self._dataset(src.path), self.grid, resampling, k)
        return vrt

    def _vector(self, src: AuxSource) -> Any:
        data = self._vectors.get((src.path, src.attribute))
        if data is None:
            from carbonsr_cli.auxlayers_vector import VectorData

            line = next((e for e in src.entries if e.op == "line_length"), None)
            data = VectorData.build(src.gdf, self.grid.crs, line.classes if line else (), src.class_attr, src.attribute)
            self._vectors[(src.path, src.attribute)] = data
        return data

    def _sample_grid(self) -> tuple[Any, int, int]:
        """Transform and shape of a decimated grid (<= SAMPLE_EDGE per side) over the extent."""
        g = self.grid
        sw, sh = min(g.width, SAMPLE_EDGE), min(g.height, SAMPLE_EDGE)
        return _subgrid(g.transform, 0, 0, g.width / sw, g.height / sh), sw, sh

    def _covered_fraction(self, crs: Any, bounds: tuple[float, float, float, float]) -> float:
        """Fraction of sample points of the extent inside ``bounds`` (given in ``crs``)."""
        from pyproj import CRS as ProjCRS
        from pyproj import Transformer

        if self._sample_xy is None:
            t, sw, sh = self._sample_grid()
            cols, rows = np.meshgrid(np.arange(sw) + 0.5, np.arange(sh) + 0.5)
            self._sample_xy = (t.c + cols.ravel() * t.a, t.f + rows.ravel() * t.e)
        xs, ys = self._sample_xy
        try:
            src_crs = ProjCRS.from_user_input(crs.to_wkt())
            dst = ProjCRS.from_user_input(self.grid.crs.to_wkt())
            if src_crs == dst:
                tx, ty = xs, ys
            else:
                tx, ty = Transformer.from_crs(dst, src_crs, always_xy=True).transform(xs, ys, errcheck=False)
        except Exception:  # noqa: BLE001 - no transformation between the CRSs
            return 0.0
        tx, ty = np.asarray(tx), np.asarray(ty)
        left, bottom, right, top = bounds
        inside = np.isfinite(tx) & np.isfinite(ty) & (tx >= left) & (tx <= right) & (ty >= bottom) & (ty <= top)
        return float(inside.mean())

    def _coverage_samples(self, by_source: Mapping[Path, list[_Slot]]) -> dict[Path, Any]:
        """Start reading every raster source on the decimated sample grid, one thread per file.

        The warp of a decimated grid still decompresses the whole source, ~1-2 s for a
        10,000 x 10,000 layer; the files are read in parallel (GDAL releases the GIL), each with
        multi-threaded block decoding (:func:`~carbonsr_cli.rasters.decode_threads_env`). Datasets
        are opened here, in this thread. Returns ``path -> Future`` of ``[bands, sh, sw]`` float64
        (NaN = nodata/outside); ``result()`` raises ``InputDataError`` for an unreadable file.
        """
        import concurrent.futures as cf

        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT

        t, sw, sh = self._sample_grid()

        def sample(ds: Any, bands: list[int], path: Path) -> np.ndarray:
            kwargs: dict[str, Any] = {}
            if ds.nodata is not None:
                kwargs["src_nodata"] = ds.nodata
            try:
                with decode_threads_env(), WarpedVRT(
                    ds, crs=self.grid.crs, transform=t, width=sw, height=sh, resampling=Resampling.nearest,
                    nodata=float("nan"), dtype="float64", **kwargs,
                ) as vrt:
                    return vrt.read(bands)
            except Exception as exc:  # noqa: BLE001 - GDAL read/warp error
                msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise InputDataError(f"cannot read aux data (corrupt file?): {msg}", path) from None

        rasters = [(p, sl) for p, sl in by_source.items() if sl[0].source.kind != "vector"]
        out: dict[Path, Any] = {}
        if not rasters:
            return out
        from carbonsr_cli.rasters import decode_threads_env, open_raster

        with cf.ThreadPoolExecutor(max_workers=min(len(rasters), 8)) as ex:
            for path, sl in rasters:
                # A handle of its own: rasterio datasets are not thread-safe. An unreadable file
                # raises here, in order, after waiting for the samples already started.
                with decode_threads_env():  # GTiff reads the option when the file is opened
                    own = open_raster(path, require_north_up=False)
                fut = ex.submit(sample, own, sorted({s.entry.band for s in sl}), path)
                fut.add_done_callback(lambda _f, d=own: d.close())
                out[path] = fut
        return out

    def _check_coverage(self) -> None:
        from rasterio.crs import CRS

        slots = {id(s): s for g in self._groups for s in [*g.by_year.values(), *([g.static] if g.static else [])]}
        by_source: dict[Path, list[_Slot]] = {}
        for s in slots.values():
            by_source.setdefault(s.source.path, []).append(s)
        used = {id(s) for g in self._groups for s in g.per_t}
        samples = self._coverage_samples(by_source)
        for path, sl in by_source.items():
            src = sl[0].source
            if src.kind == "vector":
                vcrs = CRS.from_user_input(src.crs.to_wkt())
                covered = self._covered_fraction(vcrs, tuple(src.gdf.total_bounds))
                if covered == 0.0:
                    raise InputDataError(
                        f"does not overlap the main raster extent ({self._extent_text()}); check both CRSs", path
                    )
                for s in sl:
                    s.fill = 0.0
                    s.coverage = LayerCoverage(s.entry.group, str(path), s.entry.year, covered, 0.0, 0.0)
                continue
            ds = self._dataset(path)
            covered = self._covered_fraction(ds.crs, tuple(ds.bounds))
            if covered == 0.0:
                raise InputDataError(
                    f"does not overlap the main raster extent ({self._extent_text()}); aux bounds "
                    f"{tuple(round(v, 6) for v in ds.bounds)} in {ds.crs.to_string()}; check both CRSs",
                    path,
                )
            sample = samples[path].result()
            bands = sorted({s.entry.band for s in sl})
            for s in sl:
                arr = sample[bands.index(s.entry.band)]
                valid = np.isfinite(arr)
                if s.op == "classes":
                    valid &= np.isin(arr, np.asarray(s.entry.classes, dtype=np.float64))
                nodata_frac = float(1.0 - valid.mean())
                if s.op == "value" and src.kind == "continuous":
                    s.fill = float(arr[valid].mean()) if valid.any() else 0.0
                else:
                    s.fill = 0.0
                s.coverage = LayerCoverage(s.entry.group, str(path), s.entry.year, covered, nodata_frac, s.fill)
                if id(s) not in used:
                    continue
                problem = None
                if covered < MIN_COVERAGE:
                    problem = f"covers only {covered:.1%} of the main raster extent"
                elif not valid.any():
                    problem = f"aux layer {s.entry.group!r} is all nodata over the main raster extent"
                if problem is None:
                    continue
                rule = "valid mean" if s.fill and s.op == "value" and src.kind == "continuous" else "0"
                if not self.fill_missing:
                    raise InputDataError(f"{problem}; pass --fill-missing to fill the gaps with {rule}", path)
                warnings.warn(
                    f"{path}: {problem}; filling {nodata_frac:.1%} of the extent with {rule} ({s.fill:.6g})",
                    AuxFillWarning,
                    stacklevel=3,
                )

    def _extent_text(self) -> str:
        b = self.grid.bounds
        return f"main bounds {tuple(round(v, 6) for v in b)} in {self.grid.crs.to_string()}"

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
        from carbonsr_cli.grids import window_ints

        self._check_process()
        c, r, w, h = window_ints(child_window)
        shape = (self.channels, len(self.years), h, w)
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32:
            raise ValueError(f"out has shape {out.shape} {out.dtype}, expected {shape} float32")
        cache: dict[int, dict[str, np.ndarray]] = {}
        ch = 0
        for g in self._groups:
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

    def warp_targets(self) -> dict[Path, list[_Slot]]:
        """Continuous raster files read by this stack that only a warp can align to the child grid.

        Returns ``path -> slots`` (each slot once; slots of years the stack does not use are left out).
        """
        by_path: dict[Path, list[_Slot]] = {}
        seen: set[int] = set()
        for g in self._groups:
            for slot in g.per_t:
                if id(slot) in seen:
                    continue
                seen.add(id(slot))
                if slot.op == "value" and slot.source.kind == "continuous" and self._alignment(slot.source) is None:
                    by_path.setdefault(slot.source.path, []).append(slot)
        return by_path

    def materialize_warps(self, directory: Path, threads: int, rows_per_band: int = 1024) -> list[Path]:
        """Warp every continuous raster that needs a warp onto the child grid once, up front.

        Each such file (e.g. an EPSG:4326 layer under a UTM grid) is warped by GDAL in bands
        of ``rows_per_band`` child rows, several bands at once (each in a thread with its own
        dataset handle and WarpedVRT, warping and decoding blocks with a share of ``threads``), into an
        uncompressed float32 GeoTIFF on the child grid in ``directory`` (NaN = nodata/outside);
        its slots then read that file without a warp. Same warp options as the per-window reads
        (the slot's resampling, the source nodata); values can differ from a per-window warp by
        GDAL's approximate-transformer error (<= 0.125 source pixel of position).

        Returns:
            The files written (the caller deletes them, after closing this stack).
        """
        import concurrent.futures as cf
        import dataclasses
        import threading

        import rasterio
        from rasterio.windows import Window

        from carbonsr_cli.rasters import decode_threads_env, open_raster

        self._check_process()
        by_path = self.warp_targets()
        written: list[Path] = []
        grid = self.grid
        threads = max(1, int(threads))
        n_par = min(4, threads, -(-grid.height // rows_per_band))
        per = max(1, threads // n_par)
        local = threading.local()
        write_lock = threading.Lock()
        opened: list[Any] = []

        def warp_band(path: Path, dst: Any, r0: int, keys: list[tuple[int, str]]) -> None:
            # Per thread: one dataset handle and one WarpedVRT per resampling, as the window reads
            # use (rasterio's reproject() is not safe to call from several threads: with
            # rasterio 1.5 a concurrent call may see a destination without its transform).
            handles = getattr(local, "handles", None)
            if handles is None:
                handles = local.handles = {}
            h = min(rows_per_band, grid.height - r0)
            win = Window(0, r0, grid.width, h)
            for b, (band, resampling) in enumerate(keys, start=1):
                try:
                    vrt = handles.get((path, resampling))
                    if vrt is None:
                        src = handles.get(path)
                        if src is None:
                            with decode_threads_env(per):  # GTiff reads the option when the file is opened
                                src = handles[path] = open_raster(path, require_north_up=False)
                            opened.append(src)
                        vrt = handles[(path, resampling)] = _warped_vrt(src, grid, resampling, NUM_THREADS=str(per))
                        opened.insert(0, vrt)  # closed before the datasets
                    arr = vrt.read(band, window=win)
                except InputDataError:
                    raise
                except Exception as exc:  # noqa: BLE001 - GDAL read/warp error
                    msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                    raise InputDataError(f"cannot read aux data (truncated or corrupt file?): {msg}", path) from None
                with write_lock:
                    dst.write(arr, b, window=win)

        try:
            with cf.ThreadPoolExecutor(max_workers=n_par, thread_name_prefix="carbonsr-warp") as ex:
                for n, (path, slots) in enumerate(by_path.items()):
                    keys = sorted({(s.entry.band, s.resampling) for s in slots})
                    out = Path(directory) / f"warp{n}_{path.stem}.tif"
                    profile = {
                        "driver": "GTiff", "width": grid.width, "height": grid.height, "count": len(keys),
                        "dtype": "float32", "crs": grid.crs, "transform": grid.transform, "nodata": float("nan"),
                        "tiled": True, "blockxsize": 256, "blockysize": 256, "BIGTIFF": "IF_SAFER",
                    }
                    written.append(out)
                    with rasterio.open(out, "w", **profile) as dst:
                        futs = [ex.submit(warp_band, path, dst, r0, keys) for r0 in range(0, grid.height, rows_per_band)]
                        try:
                            for fut in futs:
                                fut.result()
                        finally:
                            for fut in futs:
                                fut.cancel()
                            cf.wait(futs)
                    warped = dataclasses.replace(slots[0].source, path=out, nodata=float("nan"))
                    for s in slots:
                        s.source = warped
                        s.entry = dataclasses.replace(s.entry, band=keys.index((s.entry.band, s.resampling)) + 1)
                        s.resampling = "average"  # one pixel per child cell: any of average/nearest reads it as is
        finally:
            for src in opened:
                src.close()
        return written

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

    def read_rows(self, child_row_window: Window) -> np.ndarray:
        """Read a full-width band of child rows (one query/warp per layer for the whole band).

        Args:
            child_row_window: Window whose rows are used; its columns are ignored (the band
                spans all child columns).

        Returns:
            float32 ``[C_aux, T, h, W]`` with ``W`` = child grid width.
        """
        from rasterio.windows import Window

        from carbonsr_cli.grids import window_ints

        _, r, _, h = window_ints(child_row_window)
        return self.read(Window(0, r, self.grid.width, h))

    def _read_slot(self, slot: _Slot, c: int, r: int, w: int, h: int) -> dict[str, np.ndarray]:
        if slot.op == "value":
            return {slot.entry.group: self._read_value(slot, c, r, w, h)}
        if slot.op == "classes":
            return self._read_classes(slot, c, r, w, h)
        from carbonsr_cli.auxlayers_vector import rasterize_window

        data = self._vector(slot.source)
        arr = rasterize_window(data, slot.op, _subgrid(self.grid.transform, c, r), h, w)
        inner = self._inner(c, r, w, h)
        if inner is None:
            arr[:] = 0.0
        elif arr.shape[1:] != (inner[0].height, inner[0].width):
            keep = np.zeros(arr.shape[1:], dtype=bool)
            keep[inner[1]] = True
            arr[:, ~keep] = 0.0  # outside the child grid: fill rule (0), as for rasters
        return dict(zip(slot.entry.layer_names, arr))

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

    def _read_vrt(self, vrt: Any, band: int, win: Any, path: Path) -> np.ndarray:
        try:
            return vrt.read(band, window=win)
        except Exception as exc:  # noqa: BLE001 - GDAL read error on a corrupt file
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise InputDataError(f"cannot read aux data (truncated or corrupt file?): {msg}", path) from None

    def _read_value(self, slot: _Slot, c: int, r: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w), slot.fill, dtype=np.float32)
        inner = self._inner(c, r, w, h)
        if inner is None:
            return out
        win, (rs, cs) = inner
        data = self._fast_value(slot, win) if self.fast else None
        if data is None:
            data = self._read_vrt(self._vrt(slot.source, slot.resampling), slot.entry.band, win, slot.source.path)
        data = data.astype(np.float32, copy=False)
        np.copyto(data, np.float32(slot.fill), where=~np.isfinite(data))
        out[rs, cs] = data
        return out

    def _read_classes(self, slot: _Slot, c: int, r: int, w: int, h: int) -> dict[str, np.ndarray]:
        classes = slot.entry.classes
        names = slot.entry.layer_names
        n = len(classes)
        k = self._supersample(slot.source)
        counts = np.zeros((n, h, w), dtype=np.float32)
        inner = self._inner(c, r, w, h)
        fast = self._fast_counts(slot, inner[0]) if (n and inner is not None and self.fast) else None
        if fast is not None:
            f, cnt = fast
            if f == 1:  # one pixel per cell: the counts are the fractions (0 or 1)
                if cnt.shape[1:] == (h, w):
                    return dict(zip(names, cnt))
                counts[(slice(None), *inner[1])] = cnt
                return dict(zip(names, counts))
            counts[(slice(None), *inner[1])] = cnt
        elif n:
            # Column chunks keep the k-times finer code array at <= ~4 M samples.
            step = max(1, 4_000_000 // max(1, h * k * k))
            for cc in range(0, w, step):
                cw = min(step, w - cc)
                counts[:, :, cc : cc + cw] = self._count_classes(slot, c + cc, r, cw, h, k)
        valid = counts.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(valid > 0, counts / np.maximum(valid, 1), 0.0).astype(np.float32)
        return dict(zip(names, frac))

    def _count_classes(self, slot: _Slot, c: int, r: int, w: int, h: int, k: int) -> np.ndarray:
        """Samples of each class per child cell, float32 ``[n_classes, h, w]`` (k*k samples per cell)."""
        classes = slot.entry.classes
        n = len(classes)
        inner = self._inner(c, r, w, h, k)
        if inner is None:
            return np.zeros((n, h, w), dtype=np.float32)
        win, (rs, cs) = inner
        raw = self._read_vrt(self._vrt(slot.source, "nearest", k), slot.entry.band, win, slot.source.path)
        codes = np.full((h * k, w * k), np.nan, dtype=raw.dtype)
        codes[rs, cs] = raw
        out = np.zeros((n, h, w), dtype=np.float32)
        for i, code in enumerate(classes):
            hit = (codes == code).view(np.uint8)
            acc = np.zeros((h, w), dtype=np.uint8 if k * k < 256 else np.uint16)
            for dy in range(k):
                for dx in range(k):
                    acc += hit[dy::k, dx::k]
            out[i] = acc
        return out

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


def _subgrid(t: Any, col: float, row: float, sx: float = 1.0, sy: float = 1.0) -> Any:
    """North-up transform of a grid starting at cell ``(col, row)`` of ``t`` with cells ``sx, sy`` times as large.

    Written out (instead of ``t * Affine.translation(...)``) to work with every affine version.
    """
    from affine import Affine

    return Affine(t.a * sx, 0.0, t.c + col * t.a, 0.0, t.e * sy, t.f + row * t.e)


def layer_names(sources: Iterable[AuxSource]) -> list[str]:
    """Layer names the sources would give an :class:`AuxStack` (static defaults, no overrides)."""
    seen: list[str] = []
    for s in sources:
        for n in s.layers:
            if n not in seen:
                seen.append(n)
    return seen
