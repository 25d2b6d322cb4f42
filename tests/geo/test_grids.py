"""ParentGrid / ChildGrid in a UTM zone, EPSG:4326 at 30 arc-seconds and a national Lambert."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.transform import from_origin
from rasterio.windows import Window

from carbonsr_cli.errors import GeographicCRSWarning, InputDataError, NoNodataWarning, UsageError
from carbonsr_cli.grids import (
    ChildGrid,
    ParentGrid,
    clip_window,
    scale_window,
    validate_factor,
    window_is_aligned,
    window_to_parent,
)

ARCSEC30 = 1.0 / 120.0

#: (crs, transform) of 1 km-ish parent grids in three kinds of CRS.
GRIDS = {
    "utm33n": ("EPSG:32633", from_origin(500000.0, 4000000.0, 1000.0, 1000.0)),
    "wgs84_30s": ("EPSG:4326", from_origin(10.0, 50.0, ARCSEC30, ARCSEC30)),
    "laea_europe": ("EPSG:3035", from_origin(4321000.0, 3210000.0, 1000.0, 1000.0)),
    "lambert93": ("EPSG:2154", from_origin(650000.0, 6870000.0, 1000.0, 1000.0)),
}


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_from_raster_and_child_alignment(make_raster, name) -> None:
    crs, transform = GRIDS[name]
    p = make_raster(f"{name}.tif", np.ones((3, 7, 9), "float32"), crs=crs, transform=transform,
                    nodata=-1.0, descriptions=["2019", "2020", "2021"])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        g = ParentGrid.from_raster(p)
    geo = [w for w in rec if issubclass(w.category, GeographicCRSWarning)]
    assert bool(geo) == (name == "wgs84_30s")
    assert g.is_geographic == (name == "wgs84_30s")
    assert g.shape == (7, 9) and g.count == 3 and g.band_names == ("2019", "2020", "2021")
    assert g.nodata == -1.0 and g.path == str(p)
    with rasterio.open(p) as ds:
        assert tuple(g.bounds) == pytest.approx(tuple(ds.bounds))
        assert g.crs == ds.crs

    for f in (2, 10, 7):
        c = ChildGrid(g, f)
        assert c.shape == (7 * f, 9 * f)
        assert c.res == pytest.approx((g.res[0] / f, g.res[1] / f))
        assert tuple(c.bounds) == pytest.approx(tuple(g.bounds))
        # Child block (i, j) lies exactly inside parent cell (i, j): compare corner coordinates.
        for i, j in [(0, 0), (3, 5), (6, 8)]:
            pw = Window(j, i, 1, 1)
            cw = c.child_window(pw)
            assert (cw.col_off, cw.row_off, cw.width, cw.height) == (j * f, i * f, f, f)
            assert tuple(c.window_bounds(cw)) == pytest.approx(tuple(g.window_bounds(pw)), rel=0, abs=1e-9)
            # centre of the last child of the block maps back into the parent cell
            x, y = c.transform @ (cw.col_off + f - 0.5, cw.row_off + f - 0.5)
            col, row = ~g.transform @ (x, y)
            assert (int(np.floor(row)), int(np.floor(col))) == (i, j)


def test_child_transform_is_scaled_parent() -> None:
    crs, t = GRIDS["wgs84_30s"]
    g = ParentGrid(rasterio.crs.CRS.from_string(crs), t, 12, 12)
    c = g.child(10)
    assert c.transform.a == pytest.approx(ARCSEC30 / 10)  # 3 arc-seconds: "100 m" is nominal
    assert c.transform.e == pytest.approx(-ARCSEC30 / 10)
    assert (c.transform.c, c.transform.f) == (t.c, t.f)


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, "10", True, None])
def test_bad_factor(bad) -> None:
    g = ParentGrid(rasterio.crs.CRS.from_epsg(32633), GRIDS["utm33n"][1], 4, 4)
    with pytest.raises(UsageError, match="factor must be an integer >= 2"):
        ChildGrid(g, bad)


def test_integral_float_factor_is_accepted() -> None:
    assert validate_factor(10.0) == 10 and validate_factor(np.int64(3)) == 3


def test_no_nodata_warns(make_raster) -> None:
    p = make_raster("nonodata.tif", np.ones((2, 2), "float32"))
    with pytest.warns(NoNodataWarning, match=str(p)):
        g = ParentGrid.from_raster(p)
    assert g.nodata is None


def test_grid_rejects_rotation_directly() -> None:
    with pytest.raises(InputDataError, match="rotated"):
        ParentGrid(rasterio.crs.CRS.from_epsg(32633), Affine(1, 0.1, 0, 0, -1, 0), 3, 3)


def test_window_helpers() -> None:
    assert scale_window(Window(2, 3, 4, 5), 10) == Window(20, 30, 40, 50)
    # Unaligned child windows round outwards to whole parent cells.
    assert window_to_parent(Window(15, 0, 10, 20), 10) == Window(1, 0, 2, 2)
    assert window_to_parent(Window(20, 30, 40, 50), 10) == Window(2, 3, 4, 5)
    assert window_is_aligned(Window(20, 30, 40, 50), 10)
    assert not window_is_aligned(Window(25, 30, 40, 50), 10)
    assert clip_window(Window(-2, -3, 10, 10), 5, 6) == Window(0, 0, 6, 5)
    empty = clip_window(Window(8, 8, 3, 3), 5, 6)
    assert (empty.width, empty.height) == (0, 0)


def test_window_from_bounds_on_cell_edges() -> None:
    crs, t = GRIDS["wgs84_30s"]
    g = ParentGrid(rasterio.crs.CRS.from_string(crs), t, 120, 120)
    left, top = t @ (7, 11)
    right, bottom = t @ (19, 23)
    assert g.window_from_bounds(left, bottom, right, top) == Window(7, 11, 12, 12)
