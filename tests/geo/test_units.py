"""Cell areas (geodesic for geographic CRSs) and density <-> totals conversion."""

from __future__ import annotations

import numpy as np
import pytest
from pyproj import Geod
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.windows import Window

from carbonsr_cli.errors import UsageError
from carbonsr_cli.grids import ParentGrid
from carbonsr_cli.units import (
    cell_areas_m2,
    from_totals,
    parse_unit,
    to_totals,
    totals_unit,
)

D30 = 1.0 / 120.0


def _geod_cell_area(lon0: float, lat_top: float, dlon: float, dlat: float) -> float:
    """Area of a lat/lon cell with pyproj.Geod, parallels densified (geodesic edges otherwise)."""
    n = 50
    lons = list(np.linspace(lon0, lon0 + dlon, n)) + list(np.linspace(lon0 + dlon, lon0, n))
    lats = [lat_top] * n + [lat_top - dlat] * n
    area, _ = Geod(ellps="WGS84").polygon_area_perimeter(lons, lats)
    return abs(area)


def test_equator_30_arcsecond_cell() -> None:
    g = ParentGrid(CRS.from_epsg(4326), from_origin(0.0, D30, D30, D30), 1, 1)
    a = cell_areas_m2(g)[0, 0]
    # 927.66 m (1/120 deg of equator) x 921.39 m (1/120 deg of meridian at the equator).
    assert a == pytest.approx(854_796.7, rel=1e-6)
    assert a == pytest.approx(_geod_cell_area(0.0, D30, D30, D30), rel=1e-7)


@pytest.mark.parametrize("lat_top,d", [(60.0, D30), (-35.5, 0.1), (61.0, 1.0), (89.0, 1.0)])
def test_geographic_rows_match_pyproj_geod(lat_top, d) -> None:
    g = ParentGrid(CRS.from_epsg(4326), from_origin(10.0, lat_top, d, d), 3, 2)
    areas = cell_areas_m2(g)
    assert areas.shape == (2, 3)
    assert np.all(areas[0] == areas[0, 0])  # constant along a row
    for r in range(2):
        assert areas[r, 0] == pytest.approx(_geod_cell_area(10.0, lat_top - r * d, d, d), rel=1e-6)
    # areas shrink poleward in the northern hemisphere
    if lat_top > 0:
        assert areas[0, 0] < areas[1, 0]


def test_child_areas_sum_to_parent() -> None:
    g = ParentGrid(CRS.from_epsg(4326), from_origin(10.0, 50.0, D30, D30), 4, 4)
    c = g.child(10)
    parent = cell_areas_m2(g, Window(1, 2, 1, 1))[0, 0]
    child = cell_areas_m2(c, Window(10, 20, 10, 10))
    assert child.sum() == pytest.approx(parent, rel=1e-9)


def test_projected_area_and_window() -> None:
    g = ParentGrid(CRS.from_epsg(3035), from_origin(4321000.0, 3210000.0, 1000.0, 1000.0), 5, 4)
    a = cell_areas_m2(g, Window(1, 1, 2, 3))
    assert a.shape == (3, 2) and np.all(a == 1e6)
    assert np.all(cell_areas_m2(g.child(10)) == 1e4)


def test_projected_feet_units() -> None:
    # NAD83 / Texas North Central (ftUS): 1000 ft cells
    g = ParentGrid(CRS.from_epsg(2276), from_origin(2e6, 7e6, 1000.0, 1000.0), 1, 1)
    assert cell_areas_m2(g)[0, 0] == pytest.approx((1000 * 1200 / 3937) ** 2, rel=1e-9)


def test_kg_m2_s_to_totals() -> None:
    # 1e-9 kg m-2 s-1 over a 1 km2 cell for a 365.25-day year = 31.5576 t
    v = np.array([[1e-9, 0.0]])
    t = to_totals(v, "kg m-2 s-1", np.full((1, 2), 1e6))
    assert t[0, 0] == pytest.approx(31.5576, rel=1e-12) and t[0, 1] == 0
    t365 = to_totals(v, "kg m-2 s-1", np.full((1, 2), 1e6), days_per_year=365)
    assert t365[0, 0] == pytest.approx(31.536, rel=1e-12)


@pytest.mark.parametrize(
    "unit,value,expected_t",
    [
        ("g m-2 yr-1", 1.0, 1.0),  # 1 g/m2 over 1 km2 = 1e6 g = 1 t
        ("t km-2 yr-1", 5.0, 5.0),
        ("kg m-2 yr-1", 2.0, 2000.0),
        ("t ha-1 yr-1", 1.0, 100.0),
        ("kg/m2/s", 1e-9, 31.5576),
        ("t CO2 km-2 yr-1", 3.0, 3.0),
    ],
)
def test_density_units_on_1km2(unit, value, expected_t) -> None:
    out = to_totals(np.array([value]), unit, np.array([1e6]))
    assert out[0] == pytest.approx(expected_t, rel=1e-12)
    back = from_totals(out, unit, np.array([1e6]))
    assert back[0] == pytest.approx(value, rel=1e-12)


def test_totals_pass_through_and_units_label() -> None:
    v = np.array([1.5, 2.5], dtype=np.float32)
    assert np.array_equal(to_totals(v, "t/cell/yr"), v)
    assert np.array_equal(to_totals(v, "kt CO2 cell-1 yr-1"), v)
    assert totals_unit("kg m-2 s-1") == "t / cell / yr"
    assert totals_unit("kg CO2 m-2 s-1") == "t CO2 / cell / yr"
    assert totals_unit("t/cell/yr") == "t/cell/yr"
    assert parse_unit("t/cell/yr").is_density is False


def test_nodata_preserved() -> None:
    v = np.array([1.0, -9999.0, np.nan])
    out = to_totals(v, "t km-2 yr-1", np.array([2e6, 2e6, 2e6]), nodata=-9999.0)
    assert out[0] == 2.0 and out[1] == -9999.0 and np.isnan(out[2])


def test_density_needs_areas() -> None:
    with pytest.raises(ValueError, match="areas"):
        to_totals(np.ones(2), "kg m-2 s-1")


@pytest.mark.parametrize("bad", ["", "m-2 s-1", "kg m2 s-1", "kg furlong-2", "kg kg m-2", "kg m-2 s-2"])
def test_bad_units(bad) -> None:
    with pytest.raises(UsageError):
        parse_unit(bad)
