"""Baselines (uniform, dasymetric) through the downscale pipeline: conservation and output format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from ds_helpers import assert_conserves, no_temp_files, synthetic_totals, write_tif

from carbonsr_cli.downscale import downscale
from carbonsr_cli.tiling import TileLayout


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", ["uniform", "dasymetric"])
def test_sample_data_conserves(sample_dir: Path, tmp_path: Path, method: str, dtype: str) -> None:
    main = sample_dir / "emissions_1km.tif"
    out = tmp_path / f"{method}_{dtype}.tif"
    s = downscale(main, [sample_dir / "aux"], out, method=method, dtype=dtype, progress=False)
    figures = assert_conserves(out, main, 10)
    assert figures["zeros"] > 0 and figures["nodata"] > 0  # the sample exercises both
    assert s.conservation.ok and s.conservation.blocks == figures["blocks"]
    with rasterio.open(out) as ds:
        assert ds.dtypes == (dtype,) * 3
        assert ds.descriptions == ("2019", "2020", "2021")
        assert ds.nodata == -9999.0
        tags = ds.tags()
        assert tags["CARBONSR_FACTOR"] == "10" and tags["CARBONSR_METHOD"].startswith(method)
        assert tags["CARBONSR_VERSION"] and tags["CARBONSR_SOURCE"] == "emissions_1km.tif"
        assert "t CO2 / cell / yr" in tags["CARBONSR_UNITS"] and ds.units[0] == "t CO2 / cell / yr"
        assert ds.tags(1)["YEAR"] == "2019"
        assert ds.profile["tiled"] and ds.profile["compress"] == "deflate"
    assert no_temp_files(tmp_path) == []


def test_uniform_values_and_dasymetric_pattern(sample_dir: Path, tmp_path: Path) -> None:
    """Uniform children are S/100 exactly; dasymetric follows the aux layer inside blocks."""
    main = sample_dir / "emissions_1km.tif"
    downscale(main, [], tmp_path / "u.tif", method="uniform", dtype="float64", progress=False, years=["2020"])
    downscale(main, [sample_dir / "aux"], tmp_path / "d.tif", method="dasymetric:population_100m",
              dtype="float64", progress=False, years=["2020"])
    with rasterio.open(main) as m:
        tot = m.read(2).astype(np.float64)
        nd = tot == m.nodata
    with rasterio.open(tmp_path / "u.tif") as u, rasterio.open(tmp_path / "d.tif") as d:
        uv, dv = u.read(1), d.read(1)
        assert d.tags()["CARBONSR_METHOD"] == "dasymetric:population_100m"
    expect = np.repeat(np.repeat(np.where(nd, np.nan, tot / 100.0), 10, 0), 10, 1)
    valid = ~np.isnan(expect)
    assert np.allclose(uv[valid], expect[valid], rtol=1e-12)
    # Dasymetric differs from uniform inside blocks with a nonzero total.
    assert np.abs(dv[valid] - uv[valid]).max() > 1e-3 * np.nanmax(expect)


@pytest.mark.parametrize("factor", [5, 10])
def test_factor_and_tile_borders(small_region: dict, tmp_path: Path, factor: int) -> None:
    """Factor 5 and 10 on rasters spanning several tile rows/cols (tile borders and edges)."""
    rows, cols = (44, 46) if factor == 5 else small_region["shape"]
    main = small_region["main"]
    if factor == 5:  # 120-child tiles are 24 parent cells: use a larger raster for several tiles
        main = write_tif(tmp_path / "big.tif", synthetic_totals(rows, cols, 1, seed=9), res=1000.0,
                         origin=(500_000.0, 5_000_000.0), crs="EPSG:32633")
    lay = TileLayout(rows, cols, factor, 120)
    assert lay.n_rows >= 2 and lay.n_cols >= 2
    out = tmp_path / f"uniform_{factor}.tif"
    downscale(main, [], out, method="uniform", factor=factor, progress=False)
    assert_conserves(out, main, factor)
    with rasterio.open(out) as ds:
        assert (ds.height, ds.width) == (rows * factor, cols * factor)
    out = tmp_path / f"dasy_{factor}.tif"
    downscale(small_region["main"], [small_region["aux"]], out, method="dasymetric:pop", factor=factor, progress=False)
    assert_conserves(out, small_region["main"], factor)


def test_geographic_parent(geo_region: dict, tmp_path: Path) -> None:
    """30 arc-second EPSG:4326 parent; aux in EPSG:3857; children are 3 arc-seconds."""
    out = tmp_path / "geo.tif"
    s = downscale(geo_region["main"], [geo_region["aux"]], out, method="dasymetric", progress=False)
    assert_conserves(out, geo_region["main"], 10)
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 4326
        assert ds.res[0] == pytest.approx(1 / 1200)
    # Geodesic area: 14 x 18 cells of 30" near 45.5 N is about 0.65 km2 each.
    assert 100 < s.area_km2 < 200


def test_aoi(small_region: dict, tmp_path: Path) -> None:
    """Only the AOI window is written; parent cells not touching the polygon are nodata."""
    import geopandas as gpd
    from shapely.geometry import Polygon

    from carbonsr_cli.aoi import aoi_parent_window
    from carbonsr_cli.grids import ParentGrid

    poly = Polygon([(503_500, 4_996_500), (512_200, 4_994_000), (508_000, 4_986_300), (503_500, 4_990_000)])
    aoi = tmp_path / "aoi.gpkg"
    gpd.GeoDataFrame(geometry=[poly], crs="EPSG:32633").to_crs("EPSG:4326").to_file(aoi)
    out = tmp_path / "aoi.tif"
    downscale(small_region["main"], [], out, method="uniform", aoi=aoi, progress=False)
    win, mask = aoi_parent_window(aoi, ParentGrid.from_raster(small_region["main"], warn=False))
    assert not mask.all()  # the polygon is not a rectangle: some cells are masked out
    with rasterio.open(out) as ds:
        assert (ds.height, ds.width) == (int(win.height) * 10, int(win.width) * 10)
    assert_conserves(out, small_region["main"], 10, window=win, mask=mask)


def test_year_and_band_selection(small_region: dict, tmp_path: Path) -> None:
    out = tmp_path / "y.tif"
    downscale(small_region["main"], [], out, method="uniform", years=["2020"], progress=False)
    assert_conserves(out, small_region["main"], 10, bands=[2])
    with rasterio.open(out) as ds:
        assert ds.count == 1 and ds.descriptions == ("2020",)
    out2 = tmp_path / "b.tif"
    downscale(small_region["main"], [], out2, method="uniform", bands=[1], progress=False)
    assert_conserves(out2, small_region["main"], 10, bands=[1])


def test_nan_nodata_and_cog(tmp_path: Path) -> None:
    """A NaN-nodata parent keeps NaN as output nodata; --cog writes a valid COG layout."""
    t = synthetic_totals(13, 17, 1, seed=7, nodata=np.nan)
    main = write_tif(tmp_path / "nan.tif", t, res=1000.0, origin=(300_000.0, 4_000_000.0), crs="EPSG:32631", nodata=np.nan)
    out = tmp_path / "nan_out.tif"
    s = downscale(main, [], out, method="uniform", cog=True, progress=False)
    assert np.isnan(s.nodata)
    assert_conserves(out, main, 10)
    with rasterio.open(out) as ds:
        assert np.isnan(ds.nodata)
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"


def test_density_units_round_trip(geo_region: dict, tmp_path: Path) -> None:
    """Density input (t km-2 yr-1, geographic grid) is written back as density; area-weighted
    child densities reproduce each parent's total."""
    from carbonsr_cli import units
    from carbonsr_cli.grids import ParentGrid

    out = tmp_path / "dens.tif"
    s = downscale(geo_region["main"], [geo_region["aux"]], out, method="dasymetric", units="t km-2 yr-1",
                  dtype="float64", progress=False)
    assert s.units == "t km-2 yr-1" and s.conservation.ok
    grid = ParentGrid.from_raster(geo_region["main"], warn=False)
    with rasterio.open(geo_region["main"]) as m, rasterio.open(out) as o:
        dens = m.read(1).astype(np.float64)
        nd = dens == m.nodata
        kids = o.read(1)
        assert o.tags()["CARBONSR_UNITS"] == "t km-2 yr-1" and o.units[0] == "t km-2 yr-1"
    p_tot = dens * units.cell_areas_m2(grid) / 1e6
    k_tot = kids * units.cell_areas_m2(grid.child(10)) / 1e6
    sums = k_tot.reshape(grid.height, 10, grid.width, 10).sum(axis=(1, 3))
    ok = ~nd & (p_tot > 0)
    assert np.allclose(sums[ok], p_tot[ok], rtol=1e-9)


def test_partial_aux_needs_fill_missing(sample_dir: Path, tmp_path: Path) -> None:
    """An aux layer covering only part of the extent is an error naming it, unless --fill-missing."""
    from typer.testing import CliRunner

    from carbonsr_cli.cli import app
    from carbonsr_cli.errors import InputDataError

    main = sample_dir / "emissions_1km.tif"
    src = sample_dir / "aux" / "population_100m.tif"
    part = tmp_path / "population_west.tif"
    with rasterio.open(src) as ds:
        half = rasterio.windows.Window(0, 0, ds.width // 2, ds.height)
        profile = ds.profile | {"width": half.width, "height": half.height, "transform": ds.window_transform(half)}
        with rasterio.open(part, "w", **profile) as dst:
            dst.write(ds.read(window=half))
    out = tmp_path / "out.tif"
    with pytest.raises(InputDataError, match="--fill-missing") as info:
        downscale(main, [part], out, method="dasymetric", progress=False)
    assert str(part) in str(info.value)
    assert not out.exists() and no_temp_files(tmp_path) == []
    result = CliRunner().invoke(app, ["downscale", str(main), "--aux", str(part), "--method", "dasymetric", "-o", str(out), "-q"])
    assert result.exit_code == 1 and "--fill-missing" in result.output and not out.exists()
    result = CliRunner().invoke(
        app, ["downscale", str(main), "--aux", str(part), "--method", "dasymetric", "-o", str(out), "-q", "--fill-missing"]
    )
    assert result.exit_code == 0, result.output
    assert_conserves(out, main, 10)


def test_conservation_check_in_bands_finds_violations(
    small_region: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-read check gives the same figures in many bands (threads) as in one, and finds a
    negative child and a broken block sum wherever they are."""
    import dataclasses

    from rasterio.windows import Window

    from carbonsr_cli.downscale import api as ds_mod

    plans = []
    real = ds_mod.check_written_conservation
    monkeypatch.setattr(ds_mod, "check_written_conservation", lambda p, plan: plans.append(plan) or real(p, plan))
    out = tmp_path / "u.tif"
    s = downscale(small_region["main"], [], out, method="uniform", progress=False)
    (plan,) = plans
    one = real(out, plan)
    banded = real(out, plan, rows_per_band=3)  # 20 parent rows: 7 bands
    assert one.ok and banded.ok and dataclasses.asdict(one) == dataclasses.asdict(banded) == dataclasses.asdict(s.conservation)
    with rasterio.open(out, "r+") as dst:  # break two blocks in different bands
        dst.write(np.full((1, 1), -1.0, np.float32), 1, window=Window(35, 175, 1, 1))  # parent row 17
        v = dst.read(2, window=Window(100, 40, 1, 1))
        dst.write(v + 1000.0, 2, window=Window(100, 40, 1, 1))  # parent row 4
    bad = real(out, plan, rows_per_band=3)
    assert not bad.ok and bad.negatives == 1 and bad.max_rel_error > 1e-3
    assert dataclasses.asdict(bad) == dataclasses.asdict(real(out, plan))
