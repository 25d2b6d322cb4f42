"""Area of interest: restrict work to the parent cells touching user polygons.

``--aoi region.gpkg`` (or ``.geojson``, ``.shp``; any CRS) is read with geopandas, reprojected
to the parent CRS and rasterised onto the parent grid with ``all_touched=True``; the work
window is the bounding window of the touched cells.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from rasterio.windows import Window

from carbonsr_cli.errors import InputDataError, UsageError

from carbonsr_cli.errors import MissingInputError

if TYPE_CHECKING:
    from carbonsr_cli.grids import ParentGrid

__all__ = ["AOIWindow", "aoi_parent_window", "read_aoi"]


class AOIWindow(NamedTuple):
    """Result of :func:`aoi_parent_window` (unpacks as ``window, mask``).

    Attributes:
        window: Parent-grid window bounding the touched cells (inside the grid).
        mask: ``[window.height, window.width]`` bool, True for parent cells touching the AOI.
    """

    window: Window
    mask: np.ndarray


def _present(geoms) -> np.ndarray:  # noqa: ANN001 - geopandas.GeoSeries
    """Boolean mask of geometries that are neither missing (None) nor empty."""
    import shapely

    arr = np.asarray(geoms.values, dtype=object)
    return ~(shapely.is_missing(arr) | shapely.is_empty(arr))


def read_aoi(aoi_path: str | os.PathLike[str], crs: object):
    """Read AOI geometries and reproject them to ``crs``.

    Args:
        aoi_path: Vector file (GeoPackage, GeoJSON, Shapefile...).
        crs: Target CRS (the parent grid's).

    Returns:
        ``geopandas.GeoSeries`` of non-empty geometries in ``crs``.

    Raises:
        UsageError: missing file.
        InputDataError: unreadable, no CRS, no (non-empty) geometry.
    """
    import geopandas as gpd

    p = Path(aoi_path)
    if not p.exists():
        raise MissingInputError("AOI file not found", p)
    try:
        gdf = gpd.read_file(p)
    except Exception as exc:  # noqa: BLE001 - pyogrio/fiona raise various types
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputDataError(f"cannot read AOI as a vector file (GeoPackage/GeoJSON/Shapefile): {msg}", p) from None
    if "geometry" not in gdf or len(gdf) == 0:
        raise InputDataError("AOI has no features", p)
    geoms = gdf.geometry
    geoms = geoms[_present(geoms)]
    if len(geoms) == 0:
        raise InputDataError("AOI geometries are all empty", p)
    if geoms.crs is None:
        raise InputDataError("AOI has no CRS; save it with a CRS (e.g. EPSG:4326)", p)
    try:
        geoms = geoms.to_crs(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    except Exception as exc:  # noqa: BLE001
        raise InputDataError(f"cannot reproject AOI to the raster CRS: {exc}", p) from None
    return geoms[_present(geoms)]


def aoi_parent_window(aoi_path: str | os.PathLike[str], parent_grid: ParentGrid) -> AOIWindow:
    """Parent window and mask of the cells touching the AOI polygons.

    Args:
        aoi_path: Vector file with the area(s) of interest, in any CRS.
        parent_grid: The main raster's grid.

    Returns:
        ``AOIWindow(window, mask)``: the bounding window (parent cells, clipped to the grid) and a
        ``[h, w]`` bool mask of touched cells in it.

    Raises:
        UsageError: missing AOI file.
        InputDataError: unreadable/empty AOI, or AOI not overlapping the raster.
    """
    from rasterio import features

    p = Path(aoi_path)
    geoms = read_aoi(p, parent_grid.crs)
    left, bottom, right, top = (float(v) for v in geoms.total_bounds)
    if not all(np.isfinite([left, bottom, right, top])):
        raise InputDataError("AOI could not be placed on the raster CRS (infinite bounds after reprojection)", p)
    window = parent_grid.clip_window(parent_grid.window_from_bounds(left, bottom, right, top))
    if window.width == 0 or window.height == 0:
        raise InputDataError(f"AOI does not overlap the main raster {parent_grid.path or ''}".rstrip(), p)
    h, w = int(window.height), int(window.width)
    mask = features.rasterize(
        ((g, 1) for g in geoms),
        out_shape=(h, w),
        transform=parent_grid.window_transform(window),
        fill=0,
        all_touched=True,
        dtype="uint8",
    ).astype(bool)
    if not mask.any():
        raise InputDataError(f"AOI does not overlap the main raster {parent_grid.path or ''}".rstrip(), p)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    tight = Window(int(window.col_off) + c0, int(window.row_off) + r0, c1 - c0, r1 - r0)
    return AOIWindow(tight, mask[r0:r1, c0:c1].copy())
