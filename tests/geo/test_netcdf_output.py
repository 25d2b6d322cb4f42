"""``downscale -o out.nc``: a CF netCDF with a time axis, units, CRS; conserving; no leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from raster_files import write_north_up

from carbonsr_cli.netcdf_out import time_axis

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "carbonsr_cli.cli", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def main_tif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(3)
    t = rng.gamma(0.7, 50.0, size=(2, 6, 7)).astype(np.float32)
    t[:, 0, 0] = -9999.0
    t[0, 2, 3] = 0.0
    d = tmp_path_factory.mktemp("nc")
    return write_north_up(d / "main.tif", t, res=1000.0, crs="EPSG:3035", origin=(4_000_000.0, 3_000_000.0),
                          descriptions=["2019", "2020"])


def test_netcdf_output(main_tif: Path, tmp_path: Path) -> None:
    import rasterio
    import rioxarray
    import xarray as xr

    out = tmp_path / "out.nc"
    res = _cli("downscale", str(main_tif), "--method", "uniform", "-o", str(out), "-q")
    assert res.returncode == 0, res.stderr + res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nc"]  # the temp GeoTIFF is gone

    ds = xr.open_dataset(out, engine="rasterio", decode_times=False)  # the netcdf4 engine may be absent
    assert "time" in ds.coords and ds.sizes["time"] == 2
    var = ds["emissions"]
    assert var.dims == ("time", "y", "x") and var.attrs.get("units")
    assert ds["time"].attrs.get("units") == "days since 1970-01-01"
    try:  # the plain CF reader, where a netCDF-4 engine is installed
        plain = xr.open_dataset(out, decode_times=False)
    except ValueError:
        pass
    else:
        assert plain["time"].size == 2 and plain["emissions"].attrs["units"] and "_FillValue" in plain["emissions"].encoding
    assert rioxarray.open_rasterio(out, decode_times=False).rio.crs.to_epsg() == 3035

    with rasterio.open(main_tif) as m, rasterio.open(out) as o:
        parent = m.read().astype(np.float64)
        kids = o.read().astype(np.float64)
        assert o.crs.to_epsg() == 3035 and o.nodata == -9999.0
        assert o.transform.a == pytest.approx(100.0) and o.transform.c == pytest.approx(4_000_000.0)
    assert kids.shape == (2, 60, 70)
    nd = parent == -9999.0
    sums = np.where(kids == -9999.0, 0.0, kids).reshape(2, 6, 10, 7, 10).sum(axis=(2, 4))
    np.testing.assert_allclose(sums[~nd], parent[~nd], rtol=1e-6)
    assert (kids.reshape(2, 6, 10, 7, 10) == -9999.0).all(axis=(2, 4))[nd].all()


def test_netcdf_refuses_geotiff_options(main_tif: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.nc"
    res = _cli("downscale", str(main_tif), "--method", "uniform", "-o", str(out), "--cog", "-q")
    assert res.returncode == 2, res.stderr + res.stdout
    assert "--cog" in res.stderr + res.stdout
    assert list(tmp_path.iterdir()) == []


def test_time_axis() -> None:
    dim, vals, attrs = time_axis(["2019", "2020"])
    assert dim == "time" and vals == [18078.0, 18444.0] and attrs["units"] == "days since 1970-01-01"
    assert time_axis(["2019-03", "201904"])[1] == [17970.0, 18001.0]  # the 15th of each month
    assert time_axis(["a", "b"])[0] == "band"
