"""What the aux package knows about a file: :class:`AuxSource` (a file and its kind),
:class:`AuxEntry` (a band or geometry family and its layer names), :class:`LayerCoverage`, the
year rule of names (:func:`split_year`) and the internal slots a stack reads."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Serialises the reads of vector frames (AuxSource.frame) between a prefetch thread and the run.
_FRAME_LOCK = threading.Lock()

__all__ = [
    "AUX_EXTENSIONS",
    "MAX_CLASSES",
    "AuxEntry",
    "AuxSource",
    "LayerCoverage",
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
    #: Vector bounds ``(left, bottom, right, top)`` in ``crs`` when ``gdf`` is not read yet.
    bounds: tuple[float, float, float, float] | None = field(default=None, repr=False, compare=False)
    #: Identity (``aux/cache.py``) of a vector file whose ``gdf`` is read on first use.
    identity: Any = field(default=None, repr=False, compare=False)

    def frame(self) -> Any:
        """The vector's GeoDataFrame, read on first use when discovery took its layers from the
        cache (an error if the file changed since)."""
        if self.gdf is None and self.kind == "vector":
            with _FRAME_LOCK:  # a prefetch thread may be reading it (prefetch_frame)
                if self.gdf is None:
                    from carbonsr_cli.aux.cache import file_identity
                    from carbonsr_cli.aux.vector import read_frame
                    from carbonsr_cli.errors import InputDataError

                    if self.identity is not None and file_identity(self.path) != self.identity:
                        raise InputDataError("vector file changed during the run; run again", self.path)
                    self.gdf = read_frame(self.path)
        return self.gdf

    def prefetch_frame(self) -> None:
        """Start reading a vector's frame in a background thread (errors surface at :meth:`frame`)."""
        if self.gdf is not None or self.kind != "vector":
            return
        import contextlib
        import threading

        def read() -> None:
            with contextlib.suppress(BaseException):
                self.frame()

        threading.Thread(target=read, name="carbonsr-read-vector", daemon=True).start()

    def vector_bounds(self) -> tuple[float, float, float, float]:
        """Bounds of a vector source in its CRS (without reading it when discovery kept them)."""
        if self.gdf is None and self.bounds is not None:
            return self.bounds
        return tuple(float(v) for v in self.frame().total_bounds)  # type: ignore[return-value]

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



def layer_names(sources: Iterable[AuxSource]) -> list[str]:
    """Layer names the sources would give an :class:`AuxStack` (static defaults, no overrides)."""
    seen: list[str] = []
    for s in sources:
        for n in s.layers:
            if n not in seen:
                seen.append(n)
    return seen
