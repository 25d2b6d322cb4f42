"""Published inventory layouts as main input (built here, small): EDGAR-like netCDF, ODIAC-like
monthly GeoTIFFs, a Vulcan-like projected netCDF; and the output conventions (band units,
per-band time tags, CARBONSR_* tags, --co, --overviews) read back by rasterio and rioxarray.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from typer.testing import CliRunner

from carbonsr_cli.cli import app

xr = pytest.importorskip("xarray")
pytest.importorskip("scipy")  # xarray writes the netCDF-3 test files with scipy

ARCSEC30 = 1.0 / 120.0


def _cli(args: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.stderr


def _edgar_nc(path: Path, data: np.ndarray, *, units: str = "kg m-2 s-1", times=("2019-01-01", "2020-01-01"),
              var: str = "emi_co2", extra_var: bool = False) -> Path:
    """EDGAR-like file: ``var(time, lat, lon)`` on CF lat/lon (ascending lat: south-up), no grid mapping."""
    nt, ny, nx = data.shape
    lat = 40.0 + 0.1 * (np.arange(ny) + 0.5)  # cell centres, south to north
    lon = 10.0 + 0.1 * (np.arange(nx) + 0.5)
    ds = xr.Dataset(
        {var: (("time", "lat", "lon"), data.astype("float32"), {"units": units, "long_name": "Emissions of CO2"})},
        coords={
            "time": ("time", np.array(times, dtype="datetime64[ns]")),
            "lat": ("lat", lat, {"units": "degrees_north", "standard_name": "latitude"}),
            "lon": ("lon", lon, {"units": "degrees_east", "standard_name": "longitude"}),
        },
    )
    if extra_var:
        ds["emi_ch4"] = ds[var] * 0.01
    ds.to_netcdf(path, engine="scipy")
    return path


def _cell_area_m2(lat0: float, lat1: float, lon0: float, lon1: float) -> float:
    from pyproj import Geod

    area, _ = Geod(ellps="WGS84").polygon_area_perimeter([lon0, lon1, lon1, lon0], [lat0, lat0, lat1, lat1])
    return abs(area)


def _block_sums(path: Path, f: int = 10) -> np.ndarray:
    with rasterio.open(path) as ds:
        kids = ds.read(out_dtype="float64")
        nd = ds.nodata
    if nd is not None:
        kids = np.where(np.isnan(kids) if np.isnan(nd) else kids == nd, 0.0, kids)
    b, h, w = kids.shape
    return kids.reshape(b, h // f, f, w // f, f).sum(axis=(2, 4))


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# -- EDGAR-like netCDF ----------------------------------------------------------------------


def test_edgar_netcdf_no_crs_units_from_file(tmp_path: Path) -> None:
    """kg m-2 s-1 from the CF units attribute, lat/lon read as EPSG:4326, south-up flipped, time
    -> band names; a hand-computed cell; blocks sum to the converted totals; rio/rioxarray units."""
    rng = np.random.default_rng(1)
    data = rng.random((2, 5, 6)) * 1e-9  # kg m-2 s-1
    nc = _edgar_nc(tmp_path / "edgar.nc", data)
    out = tmp_path / "out.tif"
    code, err = _cli(["downscale", nc, "--method", "uniform", "-q", "-o", out])
    assert code == 0, err
    assert _listing(tmp_path) == ["edgar.nc", "out.tif"]  # the temp totals file is gone
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 4326
        assert ds.descriptions == ("2019", "2020")
        assert ds.units == ("t / cell / yr", "t / cell / yr")
        assert ds.tags(1)["YEAR"] == "2019" and ds.tags(2)["CARBONSR_PERIOD"] == "2020"
        assert ds.tags()["CARBONSR_SOURCE"] == "edgar.nc"
        assert ds.transform.e < 0 and abs(ds.transform.f - 40.5) < 1e-9  # north-up, top at 40.5 N
    sums = _block_sums(out)
    # Hand-computed: file row j=1 (lat 40.1-40.2), col i=2 (lon 10.2-10.3), year 2020 (366 days).
    j, i = 1, 2
    area = _cell_area_m2(40.1, 40.2, 10.2, 10.3)
    expect = data[1, j, i].astype(np.float32).astype(np.float64) * 1e-3 * area * 366 * 86400.0
    assert sums[1, 5 - 1 - j, i] == pytest.approx(expect, rel=1e-6)
    # Conservation against every converted total (rows flipped: the file is south-up).
    from carbonsr_cli.units import row_areas_m2

    class G:  # the parent grid as written
        crs = rasterio.crs.CRS.from_epsg(4326)
        transform = Affine(0.1, 0, 10.0, 0, -0.1, 40.5)

    areas = row_areas_m2(G, 0, 5)[:, None]
    days = np.array([365.0, 366.0])[:, None, None]
    totals = data[:, ::-1].astype(np.float32).astype(np.float64) * 1e-3 * areas[None] * days * 86400.0
    assert np.allclose(sums, totals, rtol=1e-6, atol=0)
    # rioxarray reads the band units and names.
    rxr = pytest.importorskip("rioxarray")
    da = rxr.open_rasterio(out)
    assert tuple(da.attrs["units"]) == ("t / cell / yr",) * 2 and tuple(da.attrs["long_name"]) == ("2019", "2020")


def test_edgar_variable_choice_and_bad_units(tmp_path: Path) -> None:
    data = np.full((1, 3, 3), 1e-9)
    two = _edgar_nc(tmp_path / "two.nc", data, times=("2019-01-01",), extra_var=True)
    code, err = _cli(["downscale", two, "--method", "uniform", "-q", "-o", tmp_path / "a.tif"])
    assert code == 2 and "several variables (emi_co2, emi_ch4); choose one with --variable" in err
    assert err.startswith("error: ") and err.count("\n") == 1
    code, err = _cli(["downscale", two, "--variable", "emi_ch4", "--method", "uniform", "-q", "-o", tmp_path / "a.tif"])
    assert code == 0, err
    code, err = _cli(["downscale", two, "--variable", "nox", "--method", "uniform", "-q", "-o", tmp_path / "b.tif"])
    assert code == 2 and "no variable 'nox'" in err
    bad = _edgar_nc(tmp_path / "bad.nc", data, units="furlongs", times=("2019-01-01",))
    code, err = _cli(["downscale", bad, "--method", "uniform", "-q", "-o", tmp_path / "c.tif"])
    assert code == 1 and err.startswith(f"error: {bad}: units 'furlongs' in the file are not understood")
    assert not (tmp_path / "b.tif").exists() and not (tmp_path / "c.tif").exists()
    assert _listing(tmp_path) == ["a.tif", "bad.nc", "two.nc"]


def test_edgar_tonnes_monthly_time_axis(tmp_path: Path) -> None:
    """EDGAR v8 'Tonnes' per cell: a total over each band's period (here months), no area."""
    data = np.random.default_rng(2).random((3, 4, 4)) * 100
    nc = _edgar_nc(tmp_path / "m.nc", data, units="Tonnes", times=("2021-01-01", "2021-02-01", "2021-03-01"))
    out = tmp_path / "m.tif"
    code, err = _cli(["downscale", nc, "--method", "uniform", "-q", "-o", out])
    assert code == 0, err
    with rasterio.open(out) as ds:
        assert ds.descriptions == ("2021-01", "2021-02", "2021-03") and ds.units[0] == "t / cell / month"
        assert ds.tags(2)["MONTH"] == "2" and ds.tags(2)["YEAR"] == "2021"
    assert np.allclose(_block_sums(out), data[:, ::-1].astype(np.float32), rtol=1e-6)


# -- ODIAC-like monthly GeoTIFFs -------------------------------------------------------------


def _odiac_months(d: Path, months=range(1, 13)) -> np.ndarray:
    """ODIAC-like files ``odiac2023_1km_excl_intl_19MM.tif``: t C / cell / month, 30'' EPSG:4326."""
    d.mkdir()
    rng = np.random.default_rng(3)
    arr = rng.random((12, 4, 5)) * 50.0
    arr[:, 0, 0] = 0.0
    t = Affine(ARCSEC30, 0, 139.5, 0, -ARCSEC30, 35.75)
    for m in months:
        with rasterio.open(d / f"odiac2023_1km_excl_intl_19{m:02d}.tif", "w", driver="GTiff", width=5, height=4,
                           count=1, dtype="float32", crs="EPSG:4326", transform=t) as ds:
            ds.write(arr[m - 1].astype("float32"), 1)
    return arr.astype(np.float32).astype(np.float64)


def test_odiac_monthly_bands(tmp_path: Path) -> None:
    arr = _odiac_months(tmp_path / "odiac")
    out = tmp_path / "monthly.tif"
    code, err = _cli(["downscale", str(tmp_path / "odiac" / "odiac2023_1km_excl_intl_19??.tif"), "--months",
                      "--units", "t C/cell/month", "--method", "uniform", "-q", "-o", out])
    assert code == 0, err
    with rasterio.open(out) as ds:
        assert ds.descriptions == tuple(f"2019-{m:02d}" for m in range(1, 13))
        assert set(ds.units) == {"t C / cell / month"}
        assert ds.tags(12)["MONTH"] == "12"
    assert np.allclose(_block_sums(out), arr, rtol=1e-6, atol=0)
    assert _listing(tmp_path) == ["monthly.tif", "odiac"]


def test_odiac_annual_co2(tmp_path: Path) -> None:
    arr = _odiac_months(tmp_path / "odiac")
    out = tmp_path / "annual.tif"
    code, err = _cli(["downscale", str(tmp_path / "odiac" / "*.tif"), "--months", "--units", "t C/cell/month",
                      "--annual", "--co2", "--method", "uniform", "-q", "-o", out])
    assert code == 0, err
    with rasterio.open(out) as ds:
        assert ds.descriptions == ("2019",) and ds.units == ("t CO2 / cell / yr",)
        assert "t CO2 / cell / yr" in ds.tags()["CARBONSR_UNITS"]
    sums = _block_sums(out)[0]
    assert np.allclose(sums, arr.sum(axis=0) * 44.0 / 12.0, rtol=1e-6)
    # Hand-computed cell: (1, 2) = 44/12 x the sum of its 12 monthly values.
    assert sums[1, 2] == pytest.approx(float(arr[:, 1, 2].sum()) * 44 / 12, rel=1e-6)


def test_odiac_bad_inputs(tmp_path: Path) -> None:
    _odiac_months(tmp_path / "odiac", months=[m for m in range(1, 13) if m != 7])
    pat = str(tmp_path / "odiac" / "*.tif")
    out = tmp_path / "o.tif"
    code, err = _cli(["downscale", pat, "--months", "--units", "t C/cell/month", "--annual", "--method", "uniform",
                      "-q", "-o", out])
    assert code == 1 and "--annual needs the 12 months of 2019; missing 2019-07" in err and err.count("\n") == 1
    # Without --months, 1901.. are years, and a per-month unit does not fit them.
    code, err = _cli(["downscale", pat, "--units", "t C/cell/month", "--method", "uniform", "-q", "-o", out])
    assert code == 1 and "are per month, but not every band is a month" in err
    # --co2 needs carbon.
    code, err = _cli(["downscale", pat, "--months", "--co2", "--method", "uniform", "-q", "-o", out])
    assert code == 2 and "do not say carbon" in err
    assert not out.exists() and _listing(tmp_path) == ["odiac"]


# -- Vulcan-like projected netCDF, south-up GeoTIFF ----------------------------------------


def test_vulcan_like_projected_netcdf(tmp_path: Path) -> None:
    """x/y in a Lambert conformal CRS (grid mapping written by rioxarray), tC km-2 yr-1, years."""
    pytest.importorskip("rioxarray")
    data = np.random.default_rng(4).random((2, 3, 4)) * 10  # t C km-2 yr-1
    x = 1_000_000.0 + 1000.0 * (np.arange(4) + 0.5)
    y = 500_000.0 - 1000.0 * (np.arange(3) + 0.5)
    da = xr.DataArray(data.astype("float32"), dims=("time", "y", "x"),
                      coords={"time": np.array(["2014-01-01", "2015-01-01"], dtype="datetime64[ns]"),
                              "y": ("y", y, {"standard_name": "projection_y_coordinate", "units": "m"}),
                              "x": ("x", x, {"standard_name": "projection_x_coordinate", "units": "m"})},
                      name="carbon_emissions", attrs={"units": "tC km-2 yr-1"})
    crs = "+proj=lcc +lat_1=33 +lat_2=45 +lat_0=40 +lon_0=-97 +x_0=0 +y_0=0 +datum=WGS84 +units=m"
    da = da.rio.write_crs(crs)
    nc = tmp_path / "vulcan.nc"
    da.to_dataset().to_netcdf(nc, engine="scipy")
    out = tmp_path / "v.tif"
    code, err = _cli(["downscale", nc, "--co2", "--method", "uniform", "-q", "-o", out])
    assert code == 0, err
    with rasterio.open(out) as ds:
        assert ds.crs.is_projected and ds.descriptions == ("2014", "2015") and ds.units[0] == "t CO2 / cell / yr"
    # 1 km2 cells: t C km-2 yr-1 x 1 km2 x 44/12.
    assert np.allclose(_block_sums(out), data.astype(np.float32) * 44 / 12, rtol=1e-6)


def test_south_up_geotiff_flipped(tmp_path: Path, make_raster) -> None:
    vals = np.arange(12, dtype="float32").reshape(3, 4) + 1
    src = make_raster("up_2019.tif", vals, transform=Affine(1000.0, 0, 500000.0, 0, 1000.0, 3_990_000.0), nodata=-1.0)
    out = tmp_path / "n.tif"
    code, err = _cli(["downscale", src, "--method", "uniform", "-q", "-o", out])
    assert code == 0, err
    with rasterio.open(out) as ds:
        assert ds.transform.e < 0 and ds.transform.f == pytest.approx(3_993_000.0) and ds.descriptions == ("2019",)
    assert np.allclose(_block_sums(out)[0], vals[::-1], rtol=1e-6)


# -- GDAL creation options and overviews ------------------------------------------------------


def test_creation_options_and_overviews(tmp_path: Path, make_raster) -> None:
    src = make_raster("e_2019.tif", np.random.default_rng(5).random((30, 30)).astype("float32"), nodata=-1.0)
    out = tmp_path / "co.tif"
    code, err = _cli(["downscale", src, "--method", "uniform", "-q", "--co", "BLOCKXSIZE=256", "--co", "blockysize=256",
                      "--co", "COMPRESS=LZW", "--overviews", "-o", out])
    assert code == 0, err
    with rasterio.open(out) as ds:
        assert ds.block_shapes[0] == (256, 256) and ds.compression.name.lower() == "lzw"
        assert ds.overviews(1) == [2]
        assert ds.tags()["TIFFTAG_SOFTWARE"].startswith("carbonsr ") and ds.tags()["TIFFTAG_DATETIME"]
    code, err = _cli(["downscale", src, "--method", "uniform", "-q", "--co", "ZLEVEL", "-o", tmp_path / "x.tif"])
    assert code == 2 and "expected KEY=VALUE" in err and not (tmp_path / "x.tif").exists()
