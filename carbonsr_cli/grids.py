"""Parent and child grids: the vocabulary of carbonsr.

A :class:`ParentGrid` is the grid of the main raster (CRS, north-up affine transform,
shape, nodata, band/year names); its cell values are totals per cell (e.g.
t CO2 / cell / yr). A :class:`ChildGrid` subdivides every parent cell into
``factor x factor`` child cells: child block (i, j) is child rows ``i*f .. i*f+f-1`` and
cols ``j*f .. j*f+f-1``. Resolutions are in CRS units (metres for projected CRSs, degrees
for geographic ones): "100 m" is nominal, a 30 arc-second parent gives 3 arc-second
children.

Windows are ``rasterio.windows.Window(col_off, row_off, width, height)`` in cells of the
grid they refer to. Child windows produced here always cover whole parent cells.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from affine import Affine
from rasterio.coords import BoundingBox
from rasterio.windows import Window

from carbonsr_cli.errors import GeographicCRSWarning, NoNodataWarning, UsageError
from carbonsr_cli.rasters import check_north_up
from carbonsr_cli.rasters import open_raster, read_years

if TYPE_CHECKING:
    from rasterio.crs import CRS

__all__ = [
    "ParentGrid",
    "ChildGrid",
    "validate_factor",
    "clip_window",
    "scale_window",
    "window_to_parent",
    "window_is_aligned",
    "window_ints",
]


def validate_factor(factor: Any) -> int:
    """Return ``factor`` as an int, or raise ``UsageError`` unless it is an integer >= 2.

    Integral floats (``10.0``) are accepted; ``2.5``, ``1``, ``0``, booleans and strings are not.
    """
    if isinstance(factor, bool):
        raise UsageError(f"factor must be an integer >= 2, got {factor!r}")
    if isinstance(factor, numbers.Integral):
        f = int(factor)
    elif isinstance(factor, numbers.Real) and float(factor).is_integer():
        f = int(factor)
    else:
        raise UsageError(f"factor must be an integer >= 2, got {factor!r}")
    if f < 2:
        raise UsageError(f"factor must be an integer >= 2, got {factor!r}")
    return f


def window_ints(window: Window) -> tuple[int, int, int, int]:
    """``(col_off, row_off, width, height)`` of a window as ints (rounded; windows here are integral)."""
    return (
        int(round(window.col_off)),
        int(round(window.row_off)),
        int(round(window.width)),
        int(round(window.height)),
    )


def clip_window(window: Window, height: int, width: int) -> Window:
    """Intersect ``window`` with a ``height x width`` grid; an empty result has width/height 0.

    Args:
        window: Window in cells of the grid (may extend past it or have negative offsets).
        height: Grid rows.
        width: Grid cols.

    Returns:
        The part of ``window`` inside ``[0, height) x [0, width)`` (integral offsets/sizes).
    """
    c, r, w, h = window_ints(window)
    c0, r0 = max(c, 0), max(r, 0)
    c1, r1 = min(c + w, width), min(r + h, height)
    return Window(c0, r0, max(c1 - c0, 0), max(r1 - r0, 0))


def scale_window(parent_window: Window, factor: int) -> Window:
    """Child window covering exactly the cells of ``parent_window`` (offsets and sizes x factor)."""
    c, r, w, h = window_ints(parent_window)
    return Window(c * factor, r * factor, w * factor, h * factor)


def window_to_parent(child_window: Window, factor: int) -> Window:
    """Smallest parent window covering ``child_window`` (rounded outwards to whole parent cells)."""
    c, r, w, h = window_ints(child_window)
    c0, r0 = c // factor, r // factor
    c1, r1 = -(-(c + w) // factor), -(-(r + h) // factor)
    return Window(c0, r0, c1 - c0, r1 - r0)


def window_is_aligned(child_window: Window, factor: int) -> bool:
    """True if ``child_window`` starts and ends on parent-cell boundaries."""
    return all(v % factor == 0 for v in window_ints(child_window))


@dataclass(frozen=True)
class ParentGrid:
    """Grid of the main (parent) raster; values are totals per cell (e.g. t CO2 / cell / yr).

    Attributes:
        crs: Coordinate reference system (``rasterio.crs.CRS``).
        transform: North-up affine transform (no rotation/shear), CRS units per cell.
        width: Number of columns (parent cells).
        height: Number of rows (parent cells).
        nodata: Nodata value of the main raster, or None (then every cell is valid).
        band_names: One name per band, normally years (see ``rasters.read_years``).
        path: Source file, if the grid came from one.
        dtype: Data type of the main raster's bands (e.g. ``"float32"``), if known.
    """

    crs: CRS
    transform: Affine
    width: int
    height: int
    nodata: float | None = None
    band_names: tuple[str, ...] = ()
    path: str | None = None
    dtype: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.crs is None:
            raise UsageError("grid has no CRS", self.path)
        check_north_up(self.transform, self.path)
        if int(self.width) < 1 or int(self.height) < 1:
            raise UsageError(f"grid must have at least one cell, got {self.height} x {self.width}", self.path)
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))
        object.__setattr__(self, "band_names", tuple(str(b) for b in self.band_names))

    @classmethod
    def from_raster(cls, path: str | os.PathLike[str], *, warn: bool = True) -> ParentGrid:
        """Read the grid of a main raster.

        Args:
            path: Main raster (GeoTIFF of totals per cell, one band per year).
            warn: Emit ``NoNodataWarning`` (no nodata set) and ``GeographicCRSWarning``.

        Raises:
            UsageError: missing file.
            InputDataError: not a raster, truncated, no CRS, rotated/sheared transform.
        """

        with open_raster(path) as ds:
            grid = cls(
                crs=ds.crs,
                transform=ds.transform,
                width=ds.width,
                height=ds.height,
                nodata=ds.nodata,
                band_names=tuple(read_years(ds)),
                path=str(path),
                dtype=ds.dtypes[0],
            )
        if warn:
            if grid.nodata is None:
                warnings.warn(
                    f"{path}: no nodata value set; every cell is treated as valid "
                    "(set one with gdal_edit.py -a_nodata)",
                    NoNodataWarning,
                    stacklevel=2,
                )
            if grid.is_geographic:
                warnings.warn(
                    f"{path}: geographic CRS ({grid.crs}); cell areas vary with latitude and "
                    "child resolution is nominal",
                    GeographicCRSWarning,
                    stacklevel=2,
                )
        return grid

    @property
    def count(self) -> int:
        """Number of bands (years)."""
        return len(self.band_names)

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` in parent cells."""
        return (self.height, self.width)

    @property
    def res(self) -> tuple[float, float]:
        """``(x, y)`` cell size in CRS units (both positive)."""
        return (abs(self.transform.a), abs(self.transform.e))

    @property
    def bounds(self) -> BoundingBox:
        """``(left, bottom, right, top)`` in CRS units."""
        return self.window_bounds(self.full_window)

    @property
    def is_geographic(self) -> bool:
        """True if the CRS is geographic (cell sizes in degrees)."""
        return bool(self.crs.is_geographic)

    @property
    def full_window(self) -> Window:
        """Window covering the whole grid."""
        return Window(0, 0, self.width, self.height)

    def window_bounds(self, window: Window) -> BoundingBox:
        """``(left, bottom, right, top)`` of a window of this grid, in CRS units."""
        c, r, w, h = window_ints(window)
        left, top = self.transform @ (c, r)
        right, bottom = self.transform @ (c + w, r + h)
        return BoundingBox(left, bottom, right, top)

    def window_transform(self, window: Window) -> Affine:
        """Affine transform of the top-left cell of ``window``."""
        c, r, _, _ = window_ints(window)
        return self.transform @ Affine.translation(c, r)

    def clip_window(self, window: Window) -> Window:
        """Intersect ``window`` with the grid."""
        return clip_window(window, self.height, self.width)

    def window_from_bounds(self, left: float, bottom: float, right: float, top: float) -> Window:
        """Smallest window of whole cells covering the bounds (CRS units), not clipped."""
        inv = ~self.transform
        c0, r0 = inv @ (left, top)
        c1, r1 = inv @ (right, bottom)
        eps = 1e-6  # cells; absorbs float noise when bounds fall on cell edges
        c_lo, c_hi = math.floor(min(c0, c1) + eps), math.ceil(max(c0, c1) - eps)
        r_lo, r_hi = math.floor(min(r0, r1) + eps), math.ceil(max(r0, r1) - eps)
        return Window(c_lo, r_lo, max(c_hi - c_lo, 0), max(r_hi - r_lo, 0))

    def child(self, factor: int = 10) -> ChildGrid:
        """The child grid subdividing every cell into ``factor x factor`` cells."""
        return ChildGrid(self, factor)


@dataclass(frozen=True)
class ChildGrid:
    """Parent grid subdivided by ``factor``: exactly aligned, ``factor`` times finer.

    Child values are totals per child cell (a child holds ``1 / factor**2`` of its parent's
    area).

    Attributes:
        parent: The parent grid.
        factor: Child cells per parent cell along each axis (integer >= 2; default 10).
    """

    parent: ParentGrid
    factor: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", validate_factor(self.factor))

    @property
    def transform(self) -> Affine:
        """Parent transform with the pixel size divided by ``factor`` (same origin)."""
        return self.parent.transform @ Affine.scale(1.0 / self.factor)

    @property
    def width(self) -> int:
        """Columns in child cells (``parent.width * factor``)."""
        return self.parent.width * self.factor

    @property
    def height(self) -> int:
        """Rows in child cells (``parent.height * factor``)."""
        return self.parent.height * self.factor

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` in child cells."""
        return (self.height, self.width)

    @property
    def crs(self) -> CRS:
        """CRS of the parent."""
        return self.parent.crs

    @property
    def nodata(self) -> float | None:
        """Nodata of the parent raster."""
        return self.parent.nodata

    @property
    def band_names(self) -> tuple[str, ...]:
        """Band (year) names of the parent."""
        return self.parent.band_names

    @property
    def res(self) -> tuple[float, float]:
        """``(x, y)`` child cell size in CRS units."""
        rx, ry = self.parent.res
        return (rx / self.factor, ry / self.factor)

    @property
    def bounds(self) -> BoundingBox:
        """Same bounds as the parent."""
        return self.parent.bounds

    @property
    def is_geographic(self) -> bool:
        """True if the CRS is geographic."""
        return self.parent.is_geographic

    @property
    def full_window(self) -> Window:
        """Window covering the whole child grid."""
        return Window(0, 0, self.width, self.height)

    def child_window(self, parent_window: Window) -> Window:
        """Child window covering exactly the parent cells of ``parent_window``."""
        return scale_window(parent_window, self.factor)

    def parent_window(self, child_window: Window) -> Window:
        """Parent window covering ``child_window`` (rounded outwards to whole parent cells)."""
        return window_to_parent(child_window, self.factor)

    def is_aligned(self, child_window: Window) -> bool:
        """True if ``child_window`` covers whole parent cells."""
        return window_is_aligned(child_window, self.factor)

    def clip_window(self, window: Window) -> Window:
        """Intersect a child window with the child grid."""
        return clip_window(window, self.height, self.width)

    def window_bounds(self, window: Window) -> BoundingBox:
        """``(left, bottom, right, top)`` of a child window, in CRS units."""
        c, r, w, h = window_ints(window)
        t = self.transform
        left, top = t @ (c, r)
        right, bottom = t @ (c + w, r + h)
        return BoundingBox(left, bottom, right, top)

    def window_transform(self, window: Window) -> Affine:
        """Affine transform of the top-left child cell of ``window``."""
        c, r, _, _ = window_ints(window)
        return self.transform @ Affine.translation(c, r)
