"""AOI: parent cells touching polygons given in another CRS."""

from __future__ import annotations

import geopandas as gpd
import pytest
from rasterio.crs import CRS
from rasterio.transform import from_origin
from shapely.geometry import Polygon, box

from carbonsr_cli.aoi import aoi_parent_window
from carbonsr_cli.errors import InputDataError, MissingInputError, UsageError
from carbonsr_cli.grids import ParentGrid


@pytest.fixture
def grid() -> ParentGrid:
    # UTM 33N, 1 km cells, 40 x 30 cells
    return ParentGrid(CRS.from_epsg(32633), from_origin(500000.0, 4000000.0, 1000.0, 1000.0), 30, 40)


def _save(tmp_path, geoms, crs, name="aoi.gpkg"):
    p = tmp_path / name
    gpd.GeoDataFrame({"id": list(range(len(geoms)))}, geometry=geoms, crs=crs).to_file(p)
    return p


def test_aoi_in_same_crs(tmp_path, grid) -> None:
    # box covering cells cols 2.5..5.5, rows 3.5..6.5 -> touched cols 2..5, rows 3..6
    geom = box(502500.0, 4000000.0 - 6500.0, 505500.0, 4000000.0 - 3500.0)
    window, mask = aoi_parent_window(_save(tmp_path, [geom], "EPSG:32633"), grid)
    assert (window.col_off, window.row_off, window.width, window.height) == (2, 3, 4, 4)
    assert mask.shape == (4, 4) and mask.all()


def test_aoi_in_geographic_crs_geojson(tmp_path, grid) -> None:
    # triangle given in EPSG:4326 around known UTM cells: reproject the cell centres
    from pyproj import Transformer

    to_ll = Transformer.from_crs(32633, 4326, always_xy=True)
    pts = [to_ll.transform(500000.0 + 10500.0, 4000000.0 - 10500.0),
           to_ll.transform(500000.0 + 20500.0, 4000000.0 - 10500.0),
           to_ll.transform(500000.0 + 10500.0, 4000000.0 - 25500.0)]
    p = _save(tmp_path, [Polygon(pts)], "EPSG:4326", name="aoi.geojson")
    window, mask = aoi_parent_window(p, grid)
    assert (window.col_off, window.row_off) == (10, 10)
    assert (window.width, window.height) == (11, 16)
    assert mask[0, 0] and mask[0, -1] and mask[-1, 0] and not mask[-1, -1]  # a triangle, not a box


def test_aoi_clipped_to_grid(tmp_path, grid) -> None:
    geom = box(495000.0, 3950000.0, 503000.0, 4010000.0)  # sticks out left/top/bottom
    window, mask = aoi_parent_window(_save(tmp_path, [geom], "EPSG:32633"), grid)
    assert (window.col_off, window.row_off, window.width, window.height) == (0, 0, 3, 40)
    assert mask.all()


def test_aoi_errors(tmp_path, grid) -> None:
    with pytest.raises(MissingInputError) as ei:
        aoi_parent_window(tmp_path / "none.gpkg", grid)
    assert "none.gpkg" in str(ei.value)
    far = _save(tmp_path, [box(0.0, 0.0, 1.0, 1.0)], "EPSG:32633", name="far.gpkg")
    with pytest.raises(InputDataError, match="does not overlap") as ei:
        aoi_parent_window(far, grid)
    assert "far.gpkg" in str(ei.value)
    txt = tmp_path / "bad.geojson"
    txt.write_text("not json")
    with pytest.raises(InputDataError, match="cannot read AOI"):
        aoi_parent_window(txt, grid)
    empty = _save(tmp_path, [Polygon()], "EPSG:32633", name="empty.gpkg")
    with pytest.raises(InputDataError, match="empty|no features"):
        aoi_parent_window(empty, grid)
