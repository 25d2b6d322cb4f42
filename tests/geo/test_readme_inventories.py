"""Every command of the README section "Starting from EDGAR / ODIAC / Vulcan" runs (on small
inventory-like files built here under the names the README uses) and conserves."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

from carbonsr_cli.cli import app

xr = pytest.importorskip("xarray")
pytest.importorskip("scipy")
pytest.importorskip("rioxarray")

from test_inventories import _block_sums, _edgar_nc, _odiac_months  # noqa: E402

README = Path(__file__).resolve().parents[2] / "README.md"


def _commands() -> list[str]:
    text = README.read_text()
    start = text.index("## Starting from EDGAR / ODIAC / Vulcan")
    end = text.index("\n## ", start + 10)
    return [ln.strip() for ln in text[start:end].splitlines() if ln.strip().startswith("carbonsr ")]


def _inputs(d: Path) -> None:
    rng = np.random.default_rng(7)
    _edgar_nc(d / "v8.0_FT2022_GHG_CO2_2022_TOTALS_flx.nc", rng.random((1, 4, 5)) * 1e-9, times=("2022-01-01",))
    _edgar_nc(d / "edgar_two_species.nc", rng.random((1, 4, 5)) * 1e-9, times=("2022-01-01",), extra_var=True)
    _odiac_months(d / "odiac")
    data = rng.random((2, 3, 4)) * 10
    x = 1_000_000.0 + 1000.0 * (np.arange(4) + 0.5)
    y = 500_000.0 - 1000.0 * (np.arange(3) + 0.5)
    da = xr.DataArray(data.astype("float32"), dims=("time", "y", "x"), name="carbon_emissions",
                      attrs={"units": "tC km-2 yr-1"},
                      coords={"time": np.array(["2014-01-01", "2015-01-01"], dtype="datetime64[ns]"),
                              "y": ("y", y, {"standard_name": "projection_y_coordinate", "units": "m"}),
                              "x": ("x", x, {"standard_name": "projection_x_coordinate", "units": "m"})})
    da = da.rio.write_crs("+proj=lcc +lat_1=33 +lat_2=45 +lat_0=40 +lon_0=-97 +datum=WGS84 +units=m")
    da.to_dataset().to_netcdf(d / "Vulcan_v3_US_annual_1km_total_mn.nc4", engine="scipy")


def test_readme_inventory_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cmds = _commands()
    assert len(cmds) == 5
    _inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    expect_units = {
        "edgar_100m.tif": "t / cell / yr",
        "edgar_co2_100m.tif": "t / cell / yr",
        "odiac_2019_monthly.tif": "t C / cell / month",
        "odiac_2019_co2.tif": "t CO2 / cell / yr",
        "vulcan_100m.tif": "t CO2 / cell / yr",
    }
    for cmd in cmds:
        args = shlex.split(cmd)[1:] + ["-q"]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, f"{cmd}: {res.stderr}"
        out = tmp_path / args[args.index("-o") + 1]
        with rasterio.open(out) as ds:
            assert ds.units[0] == expect_units[out.name]
        assert np.isfinite(_block_sums(out)).all()
    with rasterio.open(tmp_path / "odiac_2019_monthly.tif") as ds:
        assert ds.count == 12 and ds.descriptions[0] == "2019-01"
    with rasterio.open(tmp_path / "odiac_2019_co2.tif") as ds:
        assert ds.descriptions == ("2019",)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
