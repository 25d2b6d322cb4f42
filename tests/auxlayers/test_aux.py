"""Tests of carbonsr_cli.aux: discovery, names, alignment in several CRSs, years, coverage."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from aux_helpers import child_centres, coordinate_raster, parent_grid, write_raster
from rasterio.transform import from_origin
from rasterio.windows import Window

from carbonsr_cli.aux import AuxStack, discover_aux, split_year
from carbonsr_cli.errors import AuxFillWarning, InputDataError, MissingInputError, UsageError
from carbonsr_cli.grids import ChildGrid

# (parent CRS, parent origin, parent res, aux CRS, aux res): aux finer (average) and coarser
# (bilinear) than the child cells, in a UTM zone, EPSG:4326 at 30" and a national Lambert (3035).
ALIGN_CASES = [
    ("EPSG:32632", (500_000.0, 5_600_000.0), 1000.0, "EPSG:4326", 0.0005, "average"),
    ("EPSG:32632", (500_000.0, 5_600_000.0), 1000.0, "EPSG:3035", 250.0, "bilinear"),
    ("EPSG:4326", (10.0, 50.0), 1 / 120, "EPSG:32632", 200.0, "bilinear"),
    ("EPSG:4326", (10.0, 50.0), 1 / 120, "EPSG:3035", 40.0, "average"),
    ("EPSG:3035", (4_300_000.0, 2_900_000.0), 1000.0, "EPSG:32633", 50.0, "average"),
    ("EPSG:3035", (4_300_000.0, 2_900_000.0), 1000.0, "EPSG:4326", 0.005, "bilinear"),
]


def _cell_func(origin: tuple[float, float], child_res: float):
    """f(X, Y) = column + 2 * row of the point in child cells: a one-cell shift changes f by >= 1."""
    return lambda x, y: (x - origin[0]) / child_res + 2.0 * (origin[1] - y) / child_res


@pytest.mark.parametrize(("pcrs", "origin", "res", "acrs", "ares", "expected_resampling"), ALIGN_CASES)
def test_alignment_values_encode_coordinates(
    tmp_path: Path, pcrs: str, origin: tuple[float, float], res: float, acrs: str, ares: float, expected_resampling: str
) -> None:
    pg = parent_grid(pcrs, origin, res, (6, 8))
    cg = ChildGrid(pg, 10)
    f = _cell_func(origin, res / 10)
    path = coordinate_raster(
        tmp_path / "coords.tif", target_crs=pcrs, func=f, aux_crs=acrs, bounds_target=tuple(pg.bounds), aux_res=ares
    )
    with AuxStack(discover_aux([path]), cg, ["2020"]) as stack:
        assert stack.names == ["coords"]
        assert stack._groups[0].per_t[0].resampling == expected_resampling
        win = Window(0, 0, cg.width, cg.height)
        got = stack.read(win)
        assert got.shape == (1, 1, cg.height, cg.width) and got.dtype == np.float32
        x, y = child_centres(cg, win)
        err = np.abs(got[0, 0] - f(x, y))
        # f changes by 1 per child cell in x and 2 per cell in y: 0.25 = a quarter cell.
        assert err.max() < 0.25, err.max()
        # A window in the middle reads the same values as the full read.
        sub = stack.read(Window(13, 7, 30, 20))
        np.testing.assert_allclose(sub[0, 0], got[0, 0, 7:27, 13:43], atol=1e-4)


def test_boundless_window_at_edge_uses_fill_value(tmp_path: Path, utm_parent: object) -> None:
    cg = ChildGrid(utm_parent, 10)
    origin = (500_000.0, 5_600_000.0)
    f = _cell_func(origin, 100.0)
    path = coordinate_raster(
        tmp_path / "edge.tif", target_crs="EPSG:32632", func=f, aux_crs="EPSG:32632",
        bounds_target=tuple(utm_parent.bounds), aux_res=100.0, margin=0.0,
    )
    with AuxStack(discover_aux([path]), cg, ["2020"]) as stack:
        fill = stack.coverage()[0].fill_value
        # Window sticking out by 5 cells left/top and 7 right/bottom.
        win = Window(-5, -5, cg.width + 12, cg.height + 12)
        got = stack.read(win)[0, 0]
        assert got.shape == (cg.height + 12, cg.width + 12)
        x, y = child_centres(cg, Window(0, 0, cg.width, cg.height))
        np.testing.assert_allclose(got[5 : 5 + cg.height, 5 : 5 + cg.width], f(x, y), atol=1e-3)
        assert np.all(got[:5] == np.float32(fill)) and np.all(got[:, -7:] == np.float32(fill))
        # Fill is the valid mean of the layer over the extent.
        assert abs(fill - float(f(x, y).mean())) < 1.0
        # Entirely outside: all fill.
        assert np.all(stack.read(Window(-50, -50, 10, 10)) == np.float32(fill))


def test_nodata_filled_with_valid_mean_and_counted(tmp_path: Path, utm_parent: object) -> None:
    cg = ChildGrid(utm_parent, 10)
    data = np.full((60, 80), 3.0, dtype=np.float32)
    data[:, :40] = 5.0
    data[:30, :40] = -1.0  # nodata: a quarter of the extent
    path = write_raster(
        tmp_path / "pop.tif", data, transform=from_origin(500_000, 5_600_000, 100, 100), crs="EPSG:32632", nodata=-1.0
    )
    with AuxStack(discover_aux([path]), cg, ["2020"]) as stack:
        cov = stack.coverage()[0]
        assert cov.covered == 1.0
        assert abs(cov.nodata - 0.25) < 0.01
        assert abs(cov.fill_value - (5 * 0.25 + 3 * 0.5) / 0.75) < 1e-3
        got = stack.read(Window(0, 0, 80, 60))[0, 0]
        np.testing.assert_allclose(got[:30, :40], cov.fill_value, rtol=1e-6)
        assert np.all(got[30:, :40] == 5.0) and np.all(got[:, 40:] == 3.0)


def _landcover(tmp_path: Path, name: str = "landcover_50m.tif", tags: dict[str, str] | None = None) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    codes = rng.choice(np.array([1, 5, 7], dtype=np.uint8), size=(120, 160))
    codes[:10, :10] = 255  # nodata corner
    path = write_raster(
        tmp_path / name, codes, transform=from_origin(500_000, 5_600_000, 50, 50), crs="EPSG:32632", nodata=255, tags=tags
    )
    return path, codes


def test_categorical_fractions_exact_on_aligned_grid(tmp_path: Path, utm_parent: object) -> None:
    cg = ChildGrid(utm_parent, 10)
    path, codes = _landcover(tmp_path)
    src = discover_aux([path])
    assert src[0].kind == "categorical"
    with AuxStack(src, cg, ["2020"]) as stack:
        assert stack.names == ["landcover_50m:class1", "landcover_50m:class5", "landcover_50m:class7"]
        got = stack.read(Window(0, 0, 80, 60))[:, 0]
        blocks = codes.reshape(60, 2, 80, 2)
        valid = (blocks != 255).sum(axis=(1, 3))
        for i, c in enumerate((1, 5, 7)):
            expected = np.where(valid > 0, (blocks == c).sum(axis=(1, 3)) / np.maximum(valid, 1), 0.0)
            np.testing.assert_allclose(got[i], expected, atol=1e-6)
        s = got.sum(axis=0)
        np.testing.assert_allclose(s[valid > 0], 1.0, atol=1e-6)
        assert np.all(s[valid == 0] == 0.0)


def test_categorical_reprojected_fractions_and_no_interpolated_codes(tmp_path: Path) -> None:
    pg = parent_grid("EPSG:4326", (10.0, 50.0), 1 / 120, (6, 8))
    cg = ChildGrid(pg, 10)
    path, _ = _landcover(tmp_path, "lc_utm.tif", tags={"CARBONSR_KIND": "categorical"})
    # Make the landcover raster cover the 4326 parent: rewrite it around the parent in UTM 32N.
    from rasterio.warp import transform_bounds

    left, bottom, right, top = transform_bounds("EPSG:4326", "EPSG:32632", *pg.bounds)
    rng = np.random.default_rng(1)
    codes = rng.choice(np.array([2, 9], dtype=np.int16), size=(int((top - bottom) / 30) + 20, int((right - left) / 30) + 20))
    write_raster(path, codes, transform=from_origin(left - 300, top + 300, 30, 30), crs="EPSG:32632",
                 tags={"CARBONSR_KIND": "categorical"})
    with AuxStack(discover_aux([path]), cg, ["2020"]) as stack:
        assert stack.names == ["lc_utm:class2", "lc_utm:class9"]
        got = stack.read(Window(-3, 0, cg.width + 3, cg.height))[:, 0]
        inside = got[:, :, 3:]
        assert np.all((inside >= 0) & (inside <= 1))
        np.testing.assert_allclose(inside.sum(axis=0), 1.0, atol=1e-6)
        # Mixed cells exist (fractions, not a single code per cell).
        assert np.any((inside[0] > 0.05) & (inside[0] < 0.95))
        assert np.all(got[:, :, :3] == 0.0)  # outside the grid: fractions filled with 0
    with AuxStack(discover_aux([path]), cg, ["2020"], resampling={"lc_utm": "nearest"}) as stack:
        assert stack.names == ["lc_utm"]
        codes_out = stack.read(Window(0, 0, cg.width, cg.height))[0, 0]
        assert set(np.unique(codes_out).tolist()) <= {2.0, 9.0}
    with pytest.raises(UsageError, match="interpolate class codes"):
        AuxStack(discover_aux([path]), cg, ["2020"], resampling={"lc_utm": "bilinear"})


def test_kind_override_and_name_hint(tmp_path: Path) -> None:
    p1 = write_raster(tmp_path / "lulc.tif", np.ones((4, 4), np.uint8), transform=from_origin(0, 4, 1, 1), crs="EPSG:32632")
    p2 = write_raster(tmp_path / "counts.tif", np.ones((4, 4), np.uint8), transform=from_origin(0, 4, 1, 1), crs="EPSG:32632")
    kinds = [s.kind for s in discover_aux([p1, p2])]
    assert kinds == ["categorical", "continuous"]
    kinds = [s.kind for s in discover_aux([p1, p2], kinds={"lulc": "continuous", "counts.tif": "categorical"})]
    assert kinds == ["continuous", "categorical"]
    with pytest.raises(UsageError):
        discover_aux([p1], kinds={"lulc": "fuzzy"})


def test_discovery_globs_directories_and_stable_names(tmp_path: Path) -> None:
    tr = from_origin(500_000, 5_600_000, 100, 100)
    d = tmp_path / "aux"
    d.mkdir()
    write_raster(d / "b_lights.tif", np.ones((60, 80), np.float32), transform=tr, crs="EPSG:32632")
    write_raster(d / "a_s2.tif", np.ones((3, 60, 80), np.float32), transform=tr, crs="EPSG:32632",
                 descriptions=["red", "", "nir"])
    (d / "notes.txt").write_text("not aux")
    sources = discover_aux([d])
    assert [s.path.name for s in sources] == ["a_s2.tif", "b_lights.tif"]
    assert [n for s in sources for n in s.layers] == ["a_s2:red", "a_s2:b2", "a_s2:nir", "b_lights"]
    assert [s.path.name for s in discover_aux([str(d / "*.tif")])] == ["a_s2.tif", "b_lights.tif"]
    # Argument order is kept; duplicates are dropped.
    assert [s.path.name for s in discover_aux([d / "b_lights.tif", d])] == ["b_lights.tif", "a_s2.tif"]
    with pytest.raises(MissingInputError, match="missing.tif"):
        discover_aux([d / "missing.tif"])
    with pytest.raises(MissingInputError, match=r"nothing\*\.tif"):
        discover_aux([str(d / "nothing*.tif")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingInputError):
        discover_aux([empty])


def test_split_year() -> None:
    assert split_year("ntl_2019") == ("ntl", 2019)
    assert split_year("2020-viirs") == ("viirs", 2020)
    assert split_year("pop_2019_100m") == ("pop_100m", 2019)
    assert split_year("ndvi_4326") == ("ndvi_4326", None)
    assert split_year("s2_20190615") == ("s2_20190615", None)
    assert split_year("x2100") == ("x", 2100)


def test_per_year_layers_static_broadcast_and_nearest_year(tmp_path: Path, utm_parent: object) -> None:
    cg = ChildGrid(utm_parent, 10)
    tr = from_origin(500_000, 5_600_000, 100, 100)
    for year in (2019, 2020):
        write_raster(tmp_path / f"ntl_{year}.tif", np.full((60, 80), year - 2000, np.float32), transform=tr, crs="EPSG:32632")
    write_raster(tmp_path / "pop.tif", np.full((60, 80), 7.0, np.float32), transform=tr, crs="EPSG:32632")
    # Multi-band file with one year per band description.
    write_raster(tmp_path / "ndvi.tif", np.stack([np.full((60, 80), v, np.float32) for v in (0.1, 0.2)]),
                 transform=tr, crs="EPSG:32632", descriptions=["2019", "2020"])
    sources = discover_aux([tmp_path / "ndvi.tif", tmp_path / "ntl_*.tif", tmp_path / "pop.tif"])
    with pytest.warns(AuxFillWarning, match="using 2020"):
        stack = AuxStack(sources, cg, ["2019", "2020", "2021"])
    with stack:
        assert stack.names == ["ndvi", "ntl", "pop"]
        got = stack.read(Window(10, 10, 12, 12))
        assert got.shape == (3, 3, 12, 12)
        np.testing.assert_allclose(got[0, :, 0, 0], [0.1, 0.2, 0.2], rtol=1e-6)
        np.testing.assert_allclose(got[1, :, 0, 0], [19, 20, 20])
        np.testing.assert_allclose(got[2, :, 0, 0], [7, 7, 7])
        assert {(c.name, c.year) for c in stack.coverage()} == {
            ("ndvi", 2019), ("ndvi", 2020), ("ntl", 2019), ("ntl", 2020), ("pop", None)
        }
    # T = 1 with a year present: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with AuxStack(sources, cg, ["2019"]) as stack:
            np.testing.assert_allclose(stack.read(Window(0, 0, 2, 2))[:, 0, 0, 0], [0.1, 19, 7], rtol=1e-6)


def test_duplicate_layer_year_is_usage_error(tmp_path: Path, utm_parent: object) -> None:
    tr = from_origin(500_000, 5_600_000, 100, 100)
    write_raster(tmp_path / "ntl_2019.tif", np.ones((60, 80), np.float32), transform=tr, crs="EPSG:32632")
    write_raster(tmp_path / "ntl-2019.tif", np.ones((60, 80), np.float32), transform=tr, crs="EPSG:32632")
    with pytest.raises(UsageError, match="given twice"):
        AuxStack(discover_aux([tmp_path]), ChildGrid(utm_parent, 10), ["2019"])


def test_non_overlapping_aux_is_an_error_naming_the_file(tmp_path: Path, utm_parent: object) -> None:
    path = write_raster(tmp_path / "far_away.tif", np.ones((10, 10), np.float32),
                        transform=from_origin(100_000, 1_000_000, 100, 100), crs="EPSG:32632")
    for fill in (False, True):
        with pytest.raises(InputDataError) as info:
            AuxStack(discover_aux([path]), ChildGrid(utm_parent, 10), ["2020"], fill_missing=fill)
        msg = str(info.value)
        assert "far_away.tif" in msg and "does not overlap" in msg and "\n" not in msg


def test_partial_and_all_nodata_aux(tmp_path: Path, utm_parent: object) -> None:
    cg = ChildGrid(utm_parent, 10)
    # Covers the left half of the parent extent only.
    half = write_raster(tmp_path / "half.tif", np.full((60, 40), 4.0, np.float32),
                        transform=from_origin(500_000, 5_600_000, 100, 100), crs="EPSG:32632")
    with pytest.raises(InputDataError, match=r"half\.tif: covers only 50\.0%.*--fill-missing"):
        AuxStack(discover_aux([half]), cg, ["2020"])
    with pytest.warns(AuxFillWarning, match="half.tif"):
        stack = AuxStack(discover_aux([half]), cg, ["2020"], fill_missing=True)
    with stack:
        cov = stack.coverage()[0]
        assert abs(cov.covered - 0.5) < 0.01 and abs(cov.nodata - 0.5) < 0.01
        got = stack.read(Window(0, 0, 80, 60))[0, 0]
        assert np.all(got == 4.0)  # outside filled with the valid mean (4)

    empty = write_raster(tmp_path / "empty.tif", np.full((60, 80), -9999.0, np.float32),
                         transform=from_origin(500_000, 5_600_000, 100, 100), crs="EPSG:32632", nodata=-9999.0)
    with pytest.raises(InputDataError) as info:
        AuxStack(discover_aux([empty]), cg, ["2020"])
    assert "empty.tif" in str(info.value) and "all nodata" in str(info.value) and "\n" not in str(info.value)
    with pytest.warns(AuxFillWarning):
        stack = AuxStack(discover_aux([empty]), cg, ["2020"], fill_missing=True)
    with stack:
        assert np.all(stack.read(Window(0, 0, 10, 10)) == 0.0)
        assert stack.coverage()[0].nodata == 1.0


def test_read_rows_matches_windows_and_close(tmp_path: Path, utm_parent: object) -> None:
    cg = ChildGrid(utm_parent, 10)
    f = _cell_func((500_000.0, 5_600_000.0), 100.0)
    path = coordinate_raster(tmp_path / "v.tif", target_crs="EPSG:32632", func=f, aux_crs="EPSG:3035",
                             bounds_target=tuple(utm_parent.bounds), aux_res=60.0)
    stack = AuxStack(discover_aux([path]), cg, ["2020"])
    rows = stack.read_rows(Window(0, 20, 1, 20))
    assert rows.shape == (1, 1, 20, cg.width)
    np.testing.assert_allclose(rows[..., 30:50], stack.read(Window(30, 20, 20, 20)), atol=1e-4)
    stack.close()
    stack.close()
    assert stack._vrts == {} and stack._datasets == {}


def test_unknown_override_is_usage_error(tmp_path: Path, utm_parent: object) -> None:
    path = write_raster(tmp_path / "x.tif", np.ones((60, 80), np.float32),
                        transform=from_origin(500_000, 5_600_000, 100, 100), crs="EPSG:32632")
    with pytest.raises(UsageError, match="unknown aux layer"):
        AuxStack(discover_aux([path]), ChildGrid(utm_parent, 10), ["2020"], resampling={"y": "nearest"})
    with pytest.raises(UsageError, match="unknown resampling"):
        AuxStack(discover_aux([path]), ChildGrid(utm_parent, 10), ["2020"], resampling={"x": "smooth"})
    with AuxStack(discover_aux([path]), ChildGrid(utm_parent, 10), ["2020"], resampling={"x": "nearest"}) as s:
        assert s._groups[0].per_t[0].resampling == "nearest"


def test_pickled_stack_reads_the_same(tmp_path: Path, utm_parent: object) -> None:
    import pickle

    cg = ChildGrid(utm_parent, 10)
    f = _cell_func((500_000.0, 5_600_000.0), 100.0)
    path = coordinate_raster(tmp_path / "v.tif", target_crs="EPSG:32632", func=f, aux_crs="EPSG:4326",
                             bounds_target=tuple(utm_parent.bounds), aux_res=0.002)
    with AuxStack(discover_aux([path]), cg, ["2020"]) as stack:
        before = stack.read(Window(5, 5, 30, 30))
        clone = pickle.loads(pickle.dumps(stack))
    with clone:
        np.testing.assert_array_equal(clone.read(Window(5, 5, 30, 30)), before)


def test_sample_data_aux_folder(sample_dir: Path) -> None:
    from carbonsr_cli.grids import ParentGrid

    grid = ParentGrid.from_raster(sample_dir / "emissions_1km.tif", warn=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AuxFillWarning)
        stack = AuxStack(discover_aux([sample_dir / "aux"]), grid.child(10), list(grid.band_names))
    with stack:
        names = stack.names
        assert names[0] == "builtup_100m" and "lights_500m" in names and "ndvi_4326" in names
        assert "roads:length" in names and any(n.startswith("landcover_100m:class") for n in names)
        assert all(c.covered == 1.0 for c in stack.coverage())
        got = stack.read(Window(-20, -20, 160, 160))
        assert got.shape == (len(names), len(grid.band_names), 160, 160)
        assert np.isfinite(got).all()
        lc = [i for i, n in enumerate(names) if n.startswith("landcover_100m:class")]
        np.testing.assert_allclose(got[lc, :, 20:, 20:].sum(axis=0), 1.0, atol=1e-5)


def test_too_many_classes_keeps_most_frequent_with_warning(tmp_path: Path) -> None:
    codes = np.repeat(np.arange(1, 21, dtype=np.uint8), 10)[None, :].repeat(4, axis=0)  # 20 classes, 10 px each
    codes[:, :5] = 1  # class 1 most frequent, class 2 rarest
    codes[:, 10:15] = 3
    path = write_raster(tmp_path / "lulc_many.tif", codes, transform=from_origin(0, 4, 1, 1), crs="EPSG:32632")
    with pytest.warns(AuxFillWarning, match="20 classes"):
        (src,) = discover_aux([path])
    assert len(src.layers) == 16
    assert "lulc_many:class1" in src.layers and "lulc_many:class2" not in src.layers


def test_unreadable_aux_files_are_one_line_errors(tmp_path: Path) -> None:
    fake = tmp_path / "lights.tif"
    fake.write_text("this is not a GeoTIFF\n")
    with pytest.raises(InputDataError) as info:
        discover_aux([fake])
    assert "lights.tif" in str(info.value) and "\n" not in str(info.value)
    bad_vec = tmp_path / "roads.geojson"
    bad_vec.write_text("{not json")
    with pytest.raises(InputDataError, match="roads.geojson"):
        discover_aux([bad_vec])
    odd = tmp_path / "notes.csv"
    odd.write_text("a,b\n")
    with pytest.raises(UsageError, match="unsupported aux file type"):
        discover_aux([odd])


def test_prewarp_in_parallel_bands_matches_window_reads(utm_parent: object, tmp_path: Path) -> None:
    """materialize_warps (several row bands at once, each in its own thread and dataset handle)
    gives the per-window warp's values; nothing warns (e.g. a source read without its
    georeferencing would warn NotGeoreferencedWarning and put the values in the wrong place)."""

    def f(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x - 500_000.0) / 1000.0 + 3.0 * (y - 5_594_000.0) / 1000.0

    cg = ChildGrid(utm_parent, 10)
    path = coordinate_raster(tmp_path / "ll.tif", target_crs="EPSG:32632", func=f, aux_crs="EPSG:4326",
                             bounds_target=tuple(utm_parent.bounds), aux_res=0.0005)
    win = Window(0, 0, cg.width, cg.height)
    with AuxStack(discover_aux([path]), cg, ["2020"]) as ref_stack:
        ref = ref_stack.read(win)
    work = tmp_path / "warp"
    work.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # NotGeoreferencedWarning is one
        with AuxStack(discover_aux([path]), cg, ["2020"]) as stack:
            assert list(stack.warp_targets()) == [path]
            written = stack.materialize_warps(work, threads=4, rows_per_band=8)  # 60 rows: 8 bands
            assert [p.parent for p in written] == [work]
            assert stack.warp_targets() == {}  # now read from the pre-warped file
            got = stack.read(win)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    xs, ys = child_centres(cg, win)
    # both within a fraction of an aux pixel (~50 m, i.e. ~0.2 units of f) of the true field
    np.testing.assert_allclose(got[0, 0], f(xs, ys), atol=0.5)
    np.testing.assert_allclose(got, ref, atol=0.2)  # the same WarpedVRT as window reads: equal here
