"""Tests of vector aux layers: exact line length per child cell, polygon cover, point counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from aux_helpers import parent_grid
from rasterio.windows import Window

from carbonsr_cli.aux import AuxStack, discover_aux
from carbonsr_cli.aux.vector import clip_segments_to_grid
from carbonsr_cli.errors import InputDataError
from carbonsr_cli.grids import ChildGrid

TOP = 5_600_000.0
LEFT = 500_000.0


def _write(path: Path, geoms: list, crs: str = "EPSG:32632", **columns: list) -> Path:
    import geopandas as gpd

    gpd.GeoDataFrame(columns, geometry=geoms, crs=crs).to_file(path, engine="pyogrio")
    return path


def test_horizontal_line_gives_cell_width_per_cell_by_class(tmp_path: Path, utm_parent: object) -> None:
    from shapely import LineString

    cg = ChildGrid(utm_parent, 10)
    y = TOP - 350.0  # centre of child row 3
    path = _write(
        tmp_path / "roads.gpkg",
        [LineString([(LEFT - 500, y), (LEFT + 9000, y)]), LineString([(LEFT + 250, TOP - 5950), (LEFT + 250, TOP - 5050)])],
        **{"class": ["primary", "track"]},
    )
    with AuxStack(discover_aux([path]), cg, ["2020"]) as stack:
        assert stack.names == ["roads:length", "roads:length:primary", "roads:length:track"]
        got = stack.read(Window(0, 0, cg.width, cg.height))[:, 0]
        expected = np.zeros((cg.height, cg.width))
        expected[3, :] = 100.0
        np.testing.assert_allclose(got[1], expected, atol=1e-3)
        vertical = np.zeros_like(expected)
        vertical[51:59, 2] = 100.0
        vertical[50, 2] = 50.0
        vertical[59, 2] = 50.0
        np.testing.assert_allclose(got[2], vertical, atol=1e-3)
        np.testing.assert_allclose(got[0], expected + vertical, atol=1e-3)
        # Boundless window: cells outside the child grid get 0 although the line goes on.
        edge = stack.read(Window(-10, 0, 20, 5))[0, 0]
        assert np.all(edge[3, :10] == 0.0)
        np.testing.assert_allclose(edge[3, 10:], 100.0, atol=1e-3)


def test_diagonal_through_corners_and_reprojected_line(tmp_path: Path, utm_parent: object) -> None:
    import geopandas as gpd
    from shapely import LineString

    cg = ChildGrid(utm_parent, 10)
    diag = _write(tmp_path / "diag.geojson", [LineString([(LEFT, TOP), (LEFT + 3000, TOP - 3000)])])
    # A line in EPSG:4326 with three vertices, inside the grid.
    ll = gpd.GeoSeries([LineString([(LEFT + 1234, TOP - 567), (LEFT + 7321, TOP - 4890), (LEFT + 2000, TOP - 5900)])],
                       crs="EPSG:32632").to_crs("EPSG:4326")
    wgs = _write(tmp_path / "wgs.gpkg", list(ll.values), crs="EPSG:4326")
    with AuxStack(discover_aux([diag, wgs]), cg, ["2020"]) as stack:
        assert stack.names == ["diag:length", "wgs:length"]
        got = stack.read(Window(0, 0, cg.width, cg.height))[:, 0]
        expected = np.zeros((cg.height, cg.width))
        idx = np.arange(30)
        expected[idx, idx] = 100.0 * np.sqrt(2.0)
        np.testing.assert_allclose(got[0], expected, atol=1e-3)
        # Reprojected back to UTM the vertices are the same; each piece is straight in UTM.
        length_utm = float(ll.to_crs("EPSG:32632").length.iloc[0])
        assert abs(float(got[1].sum(dtype=np.float64)) - length_utm) < 1e-3 * length_utm
        assert got[1].max() <= 2 * 100.0 * np.sqrt(2.0) + 1e-3  # a cell with a vertex holds two pieces
        # Tiled reading sums to the same total (no piece lost or doubled at window borders).
        tiled = sum(
            float(stack.read(Window(c, r, 20, 30))[1].sum(dtype=np.float64)) for r in (0, 30) for c in (0, 20, 40, 60)
        )
        assert abs(tiled - float(got[1].sum(dtype=np.float64))) < 1e-2


def test_line_length_on_geographic_grid_is_geodesic(tmp_path: Path) -> None:
    from pyproj import Geod
    from shapely import LineString

    pg = parent_grid("EPSG:4326", (10.0, 50.0), 1 / 120, (6, 8))
    cg = ChildGrid(pg, 10)
    lat = 50.0 - 2.5 / 1200  # centre of child row 2
    path = _write(tmp_path / "lat.gpkg", [LineString([(9.99, lat), (10.2, lat)])], crs="EPSG:4326")
    with AuxStack(discover_aux([path]), cg, ["2020"]) as stack:
        got = stack.read(Window(0, 0, cg.width, cg.height))[0, 0]
    _, _, cell_m = Geod(ellps="WGS84").inv(10.0, lat, 10.0 + 1 / 1200, lat)
    assert 55.0 < cell_m < 65.0  # 3 arc-seconds of longitude at 50 N
    np.testing.assert_allclose(got[2], cell_m, rtol=1e-4)
    assert np.all(got[np.arange(cg.height) != 2] == 0.0)


def test_polygon_cover_and_point_count(tmp_path: Path, utm_parent: object) -> None:
    from shapely import Point, box

    cg = ChildGrid(utm_parent, 10)
    polys = _write(
        tmp_path / "parks.gpkg",
        [box(LEFT + 1000, TOP - 1500, LEFT + 2000, TOP - 500), box(LEFT + 5050, TOP - 300, LEFT + 5150, TOP - 200)],
    )
    pts = _write(
        tmp_path / "plants.gpkg",
        [Point(LEFT + 10, TOP - 10), Point(LEFT + 20, TOP - 30), Point(LEFT + 90, TOP - 90), Point(LEFT + 450, TOP - 150),
         Point(LEFT - 50, TOP - 50)],
    )
    with AuxStack(discover_aux([polys, pts]), cg, ["2020"]) as stack:
        assert stack.names == ["parks:cover", "plants:count"]
        got = stack.read(Window(0, 0, cg.width, cg.height))[:, 0]
        cover = got[0]
        assert np.all(cover[5:15, 10:20] == 1.0)
        np.testing.assert_allclose(cover[2, 50:52], [0.5, 0.5])
        assert cover.sum() == pytest.approx(100 + 1.0)
        counts = got[1]
        assert counts[0, 0] == 3 and counts[1, 4] == 1 and counts.sum() == 4  # the 5th point is outside
        assert stack.coverage()[0].nodata == 0.0


def test_clip_segments_pieces_sum_to_clipped_length() -> None:
    rng = np.random.default_rng(0)
    c0, r0, c1, r1 = (rng.uniform(-5, 25, 200) for _ in range(4))
    si, row, col, dt = clip_segments_to_grid(c0, r0, c1, r1, 20, 20)
    assert np.all((row >= 0) & (row < 20) & (col >= 0) & (col < 20)) and np.all(dt > 0)
    # Compare with a brute-force clip by dense sampling along each segment.
    t = (np.arange(20000) + 0.5) / 20000
    for s in range(0, 200, 17):
        x = c0[s] + t * (c1[s] - c0[s])
        y = r0[s] + t * (r1[s] - r0[s])
        inside = (x >= 0) & (x < 20) & (y >= 0) & (y < 20)
        assert abs(dt[si == s].sum() - inside.mean()) < 1e-3


def test_vector_not_overlapping_is_error(tmp_path: Path, utm_parent: object) -> None:
    from shapely import LineString

    path = _write(tmp_path / "elsewhere.gpkg", [LineString([(0, 0), (1000, 1000)])])
    with pytest.raises(InputDataError, match=r"elsewhere\.gpkg: does not overlap"):
        AuxStack(discover_aux([path]), ChildGrid(utm_parent, 10), ["2020"], fill_missing=True)


def test_line_length_channels_are_the_sums_of_one_float64_accumulation(utm_parent: object) -> None:
    """Each channel (total, then every class) holds exactly what one float64 ``bincount`` over
    all segments in order would give, cast to float32: lines of an unlisted class count only in
    the total, and a cell crossed by many segments sums them in the same order."""
    import geopandas as gpd
    import shapely
    from shapely import LineString

    from carbonsr_cli.aux.vector import VectorData, rasterize_window
    from carbonsr_cli.aux.warp import _subgrid

    cg = ChildGrid(utm_parent, 10)
    rng = np.random.default_rng(3)
    lines, kinds = [], []
    for _ in range(300):
        pts = np.c_[LEFT + rng.uniform(-500, 6500, 6), TOP - rng.uniform(-500, 6500, 6)]
        lines.append(LineString(pts))
        kinds.append(rng.choice(["primary", "track", "path"]))  # "path" is not a listed class
    gdf = gpd.GeoDataFrame({"class": kinds}, geometry=lines, crs="EPSG:32632")
    data = VectorData.build(gdf, cg.crs, ("primary", "track"), "class")
    h, w = 40, 50
    got = rasterize_window(data, "line_length", _subgrid(cg.transform, 5, 7), h, w)
    assert got.shape == (3, h, w) and got.dtype == np.float32

    # the reference: every segment clipped to cells, one accumulation of total and class bins
    transform = _subgrid(cg.transform, 5, 7)
    seg, seg_m, cls = data.segments_in(shapely.box(-1e9, -1e9, 1e9, 1e9))
    c0, r0 = (seg[:, 0] - transform.c) / transform.a, (seg[:, 1] - transform.f) / transform.e
    c1, r1 = (seg[:, 2] - transform.c) / transform.a, (seg[:, 3] - transform.f) / transform.e
    si, row, col, dt = clip_segments_to_grid(c0, r0, c1, r1, h, w)
    length, cell, k = dt * seg_m[si], row * w + col, cls[si]
    has = k >= 0
    idx = np.concatenate([cell, (k[has] + 1) * h * w + cell[has]])
    ref = np.bincount(idx, weights=np.concatenate([length, length[has]]), minlength=3 * h * w)
    assert np.array_equal(got, ref.astype(np.float32).reshape(3, h, w))
    assert (got[0] > got[1] + got[2]).any()  # the unlisted class is in the total only
