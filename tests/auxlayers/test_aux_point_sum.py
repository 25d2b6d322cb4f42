"""Tests of point-attribute aux layers (``--aux plants.gpkg:co2_t_yr``): per-cell sums, names, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from aux_helpers import write_raster
from rasterio.windows import Window

from carbonsr_cli.aux import AuxStack, discover_aux
from carbonsr_cli.errors import AuxFillWarning, InputDataError, MissingInputError, UsageError
from carbonsr_cli.grids import ChildGrid

TOP = 5_600_000.0
LEFT = 500_000.0


def _plants(path: Path, values: list[float | None], crs: str = "EPSG:32632") -> Path:
    """Five points (the 5th outside the grid) with a ``co2_t_yr`` column and a ``name`` column."""
    import geopandas as gpd
    from shapely import Point

    pts = [Point(LEFT + 10, TOP - 10), Point(LEFT + 20, TOP - 30), Point(LEFT + 90, TOP - 90),
           Point(LEFT + 450, TOP - 150), Point(LEFT - 50, TOP - 50)]
    gdf = gpd.GeoDataFrame({"co2_t_yr": values, "name": [f"p{i}" for i in range(5)], "units": [1, 2, 3, 4, 5]},
                           geometry=pts, crs="EPSG:32632")
    gdf.to_crs(crs).to_file(path, engine="pyogrio")
    return path


def _expected(values: list[float], h: int, w: int) -> np.ndarray:
    out = np.zeros((h, w))
    out[0, 0] = values[0] + values[1] + values[2]  # three points in child cell (0, 0)
    out[1, 4] = values[3]
    return out


def test_point_sum_per_cell_and_name(tmp_path: Path, utm_parent: object) -> None:
    cg = ChildGrid(utm_parent, 10)
    vals = [10.0, 2.5, 100.0, 7.0, 1e6]
    path = _plants(tmp_path / "plants.gpkg", vals)
    sources = discover_aux([f"{path}:co2_t_yr", path])
    assert [s.layers for s in sources] == [["plants:co2_t_yr"], ["plants:count"]]
    with AuxStack(sources, cg, ["2020"]) as stack:
        assert stack.names == ["plants:co2_t_yr", "plants:count"]
        assert stack.point_names == ["plants:co2_t_yr", "plants:count"]
        got = stack.read(Window(0, 0, cg.width, cg.height))[:, 0]
        np.testing.assert_allclose(got[0], _expected(vals, cg.height, cg.width), rtol=1e-6)
        assert got[1, 0, 0] == 3 and got[1].sum() == 4
        # Tiled and boundless reads give the same cells.
        part = stack.read(Window(-2, -1, 8, 4))[0, 0]
        np.testing.assert_allclose(part[1:, 2:], got[0, :3, :6], rtol=1e-6)
        assert np.all(part[0] == 0) and np.all(part[:, :2] == 0)


def test_point_sum_reprojected_and_integer_attribute(tmp_path: Path, utm_parent: object) -> None:
    cg = ChildGrid(utm_parent, 10)
    path = _plants(tmp_path / "plants_wgs.geojson", [1.0] * 5, crs="EPSG:4326")
    with AuxStack(discover_aux([f"{path}:units"]), cg, ["2020"]) as stack:
        assert stack.names == ["plants_wgs:units"]
        got = stack.read(Window(0, 0, cg.width, cg.height))[0, 0]
        np.testing.assert_allclose(got, _expected([1, 2, 3, 4], cg.height, cg.width), rtol=1e-6)


def test_point_sum_missing_values_are_zero_with_warning(tmp_path: Path, utm_parent: object) -> None:
    cg = ChildGrid(utm_parent, 10)
    path = _plants(tmp_path / "plants.gpkg", [10.0, None, float("nan"), 7.0, 1.0])
    with pytest.warns(AuxFillWarning, match=r"plants\.gpkg: 2 of 5 points have no .*'co2_t_yr'.*counted as 0"):
        sources = discover_aux([f"{path}:co2_t_yr"])
    with AuxStack(sources, cg, ["2020"]) as stack:
        got = stack.read(Window(0, 0, cg.width, cg.height))[0, 0]
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, _expected([10.0, 0.0, 0.0, 7.0], cg.height, cg.width), rtol=1e-6)


def test_point_sum_through_a_reader_process_copy(tmp_path: Path, utm_parent: object) -> None:
    cg = ChildGrid(utm_parent, 10)
    vals = [10.0, 2.5, 100.0, 7.0, 1e6]
    path = _plants(tmp_path / "plants.gpkg", vals)
    with AuxStack(discover_aux([f"{path}:co2_t_yr", path]), cg, ["2019", "2020"]) as stack:
        direct = stack.read(Window(0, 0, cg.width, cg.height))
        copy = pickle.loads(pickle.dumps(stack.reader_copy(), protocol=pickle.HIGHEST_PROTOCOL))
        try:
            assert copy.names == stack.names
            np.testing.assert_array_equal(copy.read(Window(0, 0, cg.width, cg.height)), direct)
        finally:
            copy.close()
        thread_copy = stack.copy()
        np.testing.assert_array_equal(thread_copy.read(Window(0, 0, cg.width, cg.height)), direct)


def test_point_sum_stats_use_log1p(tmp_path: Path, utm_parent: object) -> None:
    from carbonsr_cli.stats import _aux_stats

    cg = ChildGrid(utm_parent, 10)
    path = _plants(tmp_path / "plants.gpkg", [10.0, 2.5, 100.0, 7.0, 1e6])
    with AuxStack(discover_aux([f"{path}:co2_t_yr"]), cg, ["2020"]) as stack:
        entries, _ = _aux_stats([stack], tile=20, max_tiles=100, max_samples=1000, seed=0)
    (e,) = entries
    assert e["name"] == "plants:co2_t_yr" and e["transform"] == "log1p"
    assert e["clip_hi"] == pytest.approx(np.log1p(112.5), rel=1e-6)  # the cell sum is not clipped away


@pytest.mark.parametrize(
    ("attr", "pattern"),
    [
        ("name", r"plants\.gpkg: attribute 'name' is not numeric; numeric columns: co2_t_yr, units$"),
        ("co2", r"plants\.gpkg: attribute 'co2' does not exist; numeric columns: co2_t_yr, units$"),
    ],
)
def test_point_sum_bad_attribute_is_one_line_error(tmp_path: Path, attr: str, pattern: str) -> None:
    path = _plants(tmp_path / "plants.gpkg", [1.0] * 5)
    with pytest.raises(InputDataError, match=pattern) as info:
        discover_aux([f"{path}:{attr}"])
    assert "\n" not in str(info.value)


def test_point_sum_on_raster_or_file_without_points_is_error(tmp_path: Path) -> None:
    import geopandas as gpd
    from shapely import LineString

    from rasterio.transform import from_origin

    tif = write_raster(tmp_path / "ntl.tif", np.ones((4, 4), dtype=np.float32), transform=from_origin(LEFT, TOP, 100, 100),
                       crs="EPSG:32632")
    with pytest.raises(UsageError, match=r"ntl\.tif: ':co2_t_yr' .*vector files of points only"):
        discover_aux([f"{tif}:co2_t_yr"])
    roads = tmp_path / "roads.gpkg"
    gpd.GeoDataFrame({"co2_t_yr": [1.0]}, geometry=[LineString([(LEFT, TOP), (LEFT + 10, TOP)])],
                     crs="EPSG:32632").to_file(roads, engine="pyogrio")
    with pytest.raises(InputDataError, match=r"roads\.gpkg: ':co2_t_yr' .*no point geometries"):
        discover_aux([f"{roads}:co2_t_yr"])
    with pytest.raises(MissingInputError, match="aux file not found"):
        discover_aux([f"{tmp_path / 'missing.gpkg'}:co2_t_yr"])


def test_existing_path_with_colon_is_not_split(tmp_path: Path, utm_parent: object) -> None:
    odd = tmp_path / "a:b"
    odd.mkdir()
    path = _plants(odd / "plants:v2.gpkg", [1.0] * 5)
    (src,) = discover_aux([path])
    assert src.attribute is None and src.layers == ["plants:v2:count"]
    (src,) = discover_aux([f"{path}:co2_t_yr"])
    assert src.path == path and src.layers == ["plants:v2:co2_t_yr"]
