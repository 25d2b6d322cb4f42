"""open_raster / read_window / read_years: one-line errors naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine
from rasterio.windows import Window

from carbonsr_cli.errors import CarbonSRError, InputDataError, MissingInputError, UsageError
from carbonsr_cli.rasters import open_raster, read_window, read_years, year_in_name


def _assert_one_line(exc: CarbonSRError, path) -> None:
    text = str(exc)
    assert str(path) in text
    assert "\n" not in text


def test_open_valid(make_raster) -> None:
    p = make_raster("ok.tif", np.ones((2, 4, 5), "float32"), descriptions=["2019", "2020"])
    with open_raster(p) as ds:
        assert (ds.count, ds.height, ds.width) == (2, 4, 5)
        assert read_years(ds) == ["2019", "2020"]


def test_missing_file(tmp_path) -> None:
    p = tmp_path / "nope.tif"
    with pytest.raises(MissingInputError) as ei:
        open_raster(p)
    assert ei.value.exit_code == 1
    _assert_one_line(ei.value, p)


def test_text_file_named_tif(tmp_path) -> None:
    p = tmp_path / "fake.tif"
    p.write_text("this is not a GeoTIFF\n" * 10)
    with pytest.raises(InputDataError, match="not a raster") as ei:
        open_raster(p)
    assert ei.value.exit_code == 1
    _assert_one_line(ei.value, p)


def test_empty_file(tmp_path) -> None:
    p = tmp_path / "empty.tif"
    p.write_bytes(b"")
    with pytest.raises(InputDataError, match="empty"):
        open_raster(p)


@pytest.mark.parametrize("tiled,compress", [(False, None), (True, "deflate")])
def test_truncated_geotiff(make_raster, tiled, compress) -> None:
    rng = np.random.default_rng(0)
    p = make_raster("full.tif", rng.random((64, 64)).astype("float32"), tiled=tiled, compress=compress)
    data = p.read_bytes()
    bad = p.with_name("truncated.tif")
    bad.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputDataError, match="truncated") as ei:
        with open_raster(bad) as ds:  # detected on open, or at the latest on the first read
            read_window(ds)
    _assert_one_line(ei.value, bad)


def test_read_window_wraps_gdal_errors(make_raster, monkeypatch) -> None:
    from rasterio.errors import RasterioIOError

    p = make_raster("r.tif", np.ones((8, 8), "float32"))
    with open_raster(p) as ds:

        def boom(*a, **k):
            raise RasterioIOError("Read failed: TIFFReadEncodedStrip")

        monkeypatch.setattr(type(ds), "read", boom)
        with pytest.raises(InputDataError, match="truncated or corrupt") as ei:
            read_window(ds, Window(0, 0, 4, 4))
    _assert_one_line(ei.value, p)


def test_no_crs(make_raster) -> None:
    p = make_raster("nocrs.tif", np.ones((4, 4), "float32"), crs=None)
    with pytest.raises(InputDataError, match="no CRS") as ei:
        open_raster(p)
    _assert_one_line(ei.value, p)
    with open_raster(p, require_crs=False) as ds:  # aux-style opening can opt out
        assert ds.crs is None


def test_rotated_transform(make_raster) -> None:
    t = Affine(1000.0, 50.0, 500000.0, 50.0, -1000.0, 4000000.0)
    p = make_raster("rot.tif", np.ones((4, 4), "float32"), transform=t)
    with pytest.raises(InputDataError, match="rotated or sheared") as ei:
        open_raster(p)
    _assert_one_line(ei.value, p)


def test_south_up_transform(make_raster) -> None:
    t = Affine(1000.0, 0.0, 500000.0, 0.0, 1000.0, 4000000.0)
    p = make_raster("southup.tif", np.ones((4, 4), "float32"), transform=t)
    with pytest.raises(InputDataError, match="north-up"):
        open_raster(p)


def test_read_window_boundless_fills_nodata(make_raster) -> None:
    p = make_raster("b.tif", np.arange(16, dtype="float32").reshape(4, 4), nodata=-9.0)
    with open_raster(p) as ds:
        a = read_window(ds, Window(-1, -1, 3, 3), bands=1, boundless=True)
    assert a.shape == (3, 3)
    assert a[0, 0] == -9.0 and a[1, 1] == 0.0 and a[2, 2] == 5.0


def test_read_years_rules(make_raster) -> None:
    one = make_raster("odiac_2019_co2.tif", np.ones((3, 3), "float32"))
    with open_raster(one) as ds:
        assert read_years(ds) == ["2019"]
    multi = make_raster("stack_2019.tif", np.ones((2, 3, 3), "float32"))  # no descriptions: not per file name
    with open_raster(multi) as ds:
        assert read_years(ds) == ["band1", "band2"]
    dup = make_raster("dup.tif", np.ones((2, 3, 3), "float32"), descriptions=["x", "x"])
    with open_raster(dup) as ds:
        assert read_years(ds) == ["band1", "band2"]


def test_year_in_name() -> None:
    assert year_in_name("edgar_v8_2021_CO2") == "2021"
    assert year_in_name("tile_120190") is None
    assert year_in_name("v2018_to_2020") == "2020"
