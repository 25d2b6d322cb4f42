"""Discovery of aux inputs: user arguments (files, globs, directories, ``path:attribute``) ->
:class:`~carbonsr_cli.aux.sources.AuxSource` objects with their kind (continuous, categorical,
vector) and layer names."""

from __future__ import annotations

import glob
import math
import warnings
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from carbonsr_cli.aux.sources import (
    AUX_EXTENSIONS,
    AuxEntry,
    AuxSource,
    CATEGORICAL_HINTS,
    MAX_CLASSES,
    _RASTER_EXT,
    _SCAN_FULL_LIMIT,
    _VECTOR_EXT,
    split_year,
)
from carbonsr_cli.aux import cache
from carbonsr_cli.errors import AuxFillWarning, CarbonSRError, InputDataError, MissingInputError, UsageError
from carbonsr_cli.rasters import open_raster, read_window

__all__ = ["categorical_kinds", "discover_aux", "expand_aux_paths"]


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

    # The counts depend only on the file: kept between runs, keyed by its identity (aux/cache.py).
    ident = cache.file_identity(path)
    params = (band, _SCAN_FULL_LIMIT, ds.width, ds.height, repr(nodata), ds.dtypes[band - 1])
    kept = cache.load_array("classes", ident, params)
    if kept is not None and kept.ndim == 2 and kept.shape[1] == 2 and kept.dtype == np.int64:
        counts = {int(v): int(n) for v, n in kept.tolist()}
    elif ds.width * ds.height <= _SCAN_FULL_LIMIT:
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
    if kept is None and ident is not None:
        try:
            table = np.asarray(sorted(counts.items()), dtype=np.int64).reshape(-1, 2)
        except (OverflowError, ValueError):  # codes beyond int64: not kept
            table = None
        if table is not None:
            cache.store_array("classes", path, ident, params, table)
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
    if attribute is not None:
        return _read_vector_source(path, attribute)
    # The layers of a vector file depend only on the file: kept between runs, keyed by its
    # identity (aux/cache.py); the frame itself is then read on first use (AuxSource.frame).
    ident = cache.file_identity(path)
    params = ("layers", MAX_CLASSES, tuple(_base_name(path)))
    kept = cache.load_json("vector", ident, params)
    if kept is not None:
        try:
            from pyproj import CRS as ProjCRS

            entries = tuple(AuxEntry(str(g), str(op), None, None if y is None else int(y), tuple(str(c) for c in cl))
                            for g, op, y, cl in kept["entries"])
            crs = ProjCRS.from_wkt(kept["crs"])
            bounds = tuple(float(v) for v in kept["bounds"])
            class_attr = kept["class_attr"]
            note = kept["warning"]
        except (KeyError, TypeError, ValueError):
            kept = None
        else:
            if note:
                warnings.warn(f"{path}: {note}", AuxFillWarning, stacklevel=3)
            return AuxSource(path=path, kind="vector", entries=entries, crs=crs, class_attr=class_attr,
                             bounds=bounds, identity=ident)  # type: ignore[arg-type]
    src = _read_vector_source(path, None)
    if ident is not None and all(isinstance(c, str) for e in src.entries for c in e.classes):
        cache.store_json("vector", path, ident, params, {
            "entries": [[e.group, e.op, e.year, list(e.classes)] for e in src.entries],
            "crs": src.crs.to_wkt(), "bounds": [float(v) for v in src.gdf.total_bounds],
            "class_attr": src.class_attr, "warning": getattr(src, "_warning", None),
        })
    return src


def _read_vector_source(path: Path, attribute: str | None = None) -> AuxSource:
    import shapely

    from carbonsr_cli.aux.vector import read_frame

    gdf = read_frame(path)
    base, year = _base_name(path)
    types = shapely.get_type_id(np.asarray(gdf.geometry.values, dtype=object))
    if attribute is not None:
        return _point_sum_source(path, gdf, types, attribute, base, year)
    has_line = bool(np.isin(types, (1, 2, 5)).any())
    has_poly = bool(np.isin(types, (3, 6)).any())
    has_point = bool(np.isin(types, (0, 4)).any())
    class_attr = None
    note = None
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
                note = (f"{len(ranked)} values of {class_attr!r}; keeping the {MAX_CLASSES} longest "
                        "as separate layers (the others count in the total length only)")
                warnings.warn(f"{path}: {note}", AuxFillWarning, stacklevel=4)
            classes = tuple(sorted(ranked[:MAX_CLASSES]))
    entries = []
    if has_line:
        entries.append(AuxEntry(base, "line_length", None, year, classes))
    if has_poly:
        entries.append(AuxEntry(base, "polygon_cover", None, year))
    if has_point:
        entries.append(AuxEntry(base, "point_count", None, year))
    src = AuxSource(path=path, kind="vector", entries=tuple(entries), crs=gdf.crs, class_attr=class_attr, gdf=gdf)
    src._warning = note  # type: ignore[attr-defined]  # for the cache of the layers (_vector_source)
    return src



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
