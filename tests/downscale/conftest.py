"""Fixtures of the downscale tests: small synthetic regions (projected and geographic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ds_helpers import make_checkpoint, synthetic_totals, write_tif


def _aux_over(path: Path, bounds: tuple[float, float, float, float], src_crs: str, dst_crs: str, res: float, seed: int) -> Path:
    """A smooth positive aux layer in ``dst_crs`` covering ``bounds`` (given in ``src_crs``) with a margin."""
    from rasterio.warp import transform_bounds

    left, bottom, right, top = transform_bounds(src_crs, dst_crs, *bounds, densify_pts=21)
    mx, my = (right - left) * 0.1, (top - bottom) * 0.1
    left, bottom, right, top = left - mx, bottom - my, right + mx, top + my
    w = int(np.ceil((right - left) / res))
    h = int(np.ceil((top - bottom) / res))
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    field = 50 * (1 + np.sin(xx / 7.0) * np.cos(yy / 5.0)) + rng.gamma(1.0, 10.0, (h, w))
    return write_tif(path, field, res=res, origin=(left, top), crs=dst_crs, nodata=None)


@pytest.fixture(scope="session")
def small_region(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Projected main (EPSG:32633, 1 km, 20 x 22 cells, years 2019-2020) with aux in other CRSs.

    ``lights`` is in EPSG:4326 (~500 m), ``pop`` in EPSG:3857 (~150 m): main and aux CRSs differ.
    """
    d = tmp_path_factory.mktemp("ds_small")
    rows, cols = 20, 22
    origin = (500_000.0, 5_000_000.0)
    main = write_tif(
        d / "main.tif", synthetic_totals(rows, cols, 2, seed=1), res=1000.0, origin=origin, crs="EPSG:32633",
        descriptions=["2019", "2020"],
    )
    bounds = (origin[0], origin[1] - rows * 1000.0, origin[0] + cols * 1000.0, origin[1])
    aux = d / "aux"
    aux.mkdir()
    _aux_over(aux / "lights.tif", bounds, "EPSG:32633", "EPSG:4326", 0.005, 2)
    _aux_over(aux / "pop.tif", bounds, "EPSG:32633", "EPSG:3857", 150.0, 3)
    return {"dir": d, "main": main, "aux": aux, "names": ["lights", "pop"], "shape": (rows, cols)}


@pytest.fixture(scope="session")
def small_ckpt(small_region: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untrained tiny checkpoint for ``small_region`` (factor 10, T = 1)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", small_region["names"])


@pytest.fixture(scope="session")
def geo_region(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Geographic main grid: EPSG:4326, 30 arc-seconds, 14 x 18 cells near 45 N; aux in EPSG:3857."""
    d = tmp_path_factory.mktemp("ds_geo")
    rows, cols = 14, 18
    res = 1.0 / 120.0
    origin = (10.0, 45.5)
    main = write_tif(
        d / "main_geo.tif", synthetic_totals(rows, cols, 1, seed=4), res=res, origin=origin, crs="EPSG:4326",
        descriptions=["2020"],
    )
    bounds = (origin[0], origin[1] - rows * res, origin[0] + cols * res, origin[1])
    aux = d / "aux"
    aux.mkdir()
    _aux_over(aux / "lights.tif", bounds, "EPSG:4326", "EPSG:3857", 120.0, 5)
    return {"dir": d, "main": main, "aux": aux, "names": ["lights"], "shape": (rows, cols)}
