"""Helpers for the aux tests: parent grids and aux rasters whose values encode their coordinates."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import raster_files


def write_raster(
    path: Path,
    data: np.ndarray,
    *,
    transform: object,
    crs: str,
    nodata: float | None = None,
    descriptions: Sequence[str] | None = None,
    tags: dict[str, str] | None = None,
) -> Path:
    """Write ``data`` ``[bands, rows, cols]`` (or ``[rows, cols]``) as a GeoTIFF (its own dtype)."""
    return raster_files.write_raster(path, data, crs, transform, nodata, descriptions, tags=tags)


def parent_grid(crs: str, origin: tuple[float, float], res: float, shape: tuple[int, int]) -> object:
    """A ParentGrid (no file) with ``shape = (rows, cols)`` cells of ``res`` CRS units."""
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    from carbonsr_cli.grids import ParentGrid

    return ParentGrid(
        crs=CRS.from_user_input(crs),
        transform=from_origin(origin[0], origin[1], res, res),
        width=shape[1],
        height=shape[0],
        nodata=-9999.0,
        band_names=("2020",),
    )


def coordinate_raster(
    path: Path,
    *,
    target_crs: str,
    func: Callable[[np.ndarray, np.ndarray], np.ndarray],
    aux_crs: str,
    bounds_target: tuple[float, float, float, float],
    aux_res: float,
    margin: float = 0.2,
    nodata: float | None = None,
) -> Path:
    """An aux raster in ``aux_crs`` whose pixels hold ``func(X, Y)`` of their centre in ``target_crs``.

    The raster covers ``bounds_target`` (left, bottom, right, top in ``target_crs``) plus a
    ``margin`` (fraction of the extent) on every side, at ``aux_res`` units of ``aux_crs``.
    """
    from rasterio.transform import from_origin
    from rasterio.warp import transform, transform_bounds

    left, bottom, right, top = bounds_target
    dx, dy = (right - left) * margin, (top - bottom) * margin
    aleft, abottom, aright, atop = transform_bounds(
        target_crs, aux_crs, left - dx, bottom - dy, right + dx, top + dy, densify_pts=51
    )
    cols = int(np.ceil((aright - aleft) / aux_res))
    rows = int(np.ceil((atop - abottom) / aux_res))
    tr = from_origin(aleft, atop, aux_res, aux_res)
    cc, rr = np.meshgrid(np.arange(cols) + 0.5, np.arange(rows) + 0.5)
    xs = aleft + cc * aux_res
    ys = atop - rr * aux_res
    tx, ty = transform(aux_crs, target_crs, xs.ravel(), ys.ravel())
    vals = func(np.asarray(tx), np.asarray(ty)).reshape(rows, cols).astype(np.float32)
    return write_raster(path, vals, transform=tr, crs=aux_crs, nodata=nodata)


def child_centres(grid: object, window: object) -> tuple[np.ndarray, np.ndarray]:
    """X and Y (CRS units) of the child-cell centres of a window, each ``[h, w]``."""
    from carbonsr_cli.grids import window_ints

    c, r, w, h = window_ints(window)
    t = grid.transform
    cc, rr = np.meshgrid(np.arange(c, c + w) + 0.5, np.arange(r, r + h) + 0.5)
    return t.c + cc * t.a, t.f + rr * t.e


@pytest.fixture
def utm_parent() -> object:
    """6 x 8 parent cells of 1 km in UTM 32N (child: 60 x 80 cells of 100 m)."""
    return parent_grid("EPSG:32632", (500_000.0, 5_600_000.0), 1000.0, (6, 8))
