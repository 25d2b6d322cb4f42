"""Tests of the synthetic sample region (carbonsr_cli.sample_data) and ``carbonsr sample-data``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from typer.testing import CliRunner

from carbonsr_cli import sample_data as sd
from carbonsr_cli.cli import app
from carbonsr_cli.commands.sample_data import EXAMPLE, expand_years
from carbonsr_cli.errors import OutputError, UsageError

NODATA = -9999.0


def from_origin(west: float, north: float, xsize: float, ysize: float) -> Affine:
    return Affine(xsize, 0.0, west, 0.0, -ysize, north)

YEARS = ("2019", "2020", "2021")


@pytest.fixture(scope="module")
def arrays(sample_dir: Path) -> dict[str, np.ndarray]:
    with rasterio.open(sample_dir / "emissions_1km.tif") as e, rasterio.open(sample_dir / "truth_100m.tif") as t:
        return {"parent": e.read(), "child": t.read()}


def _block_sum64(child: np.ndarray, f: int = 10) -> np.ndarray:
    h, w = child.shape
    return child.astype(np.float64).reshape(h // f, f, w // f, f).sum(axis=(1, 3))


def _read_all(root: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(root.rglob("*.tif")):
        with rasterio.open(p) as ds:
            out[str(p.relative_to(root))] = ds.read()
    import geopandas as gpd

    roads = gpd.read_file(root / "aux" / "roads.gpkg")
    out["roads.wkb"] = np.array(roads.geometry.to_wkb().tolist(), dtype=object)
    out["roads.class"] = roads["class"].to_numpy()
    return out


# ----------------------------------------------------------------------------- content


def test_parent_is_exact_block_sum_of_truth(arrays: dict[str, np.ndarray]) -> None:
    parent, child = arrays["parent"], arrays["child"]
    assert parent.dtype == np.float32 and child.dtype == np.float32
    assert child.shape == (3, parent.shape[1] * 10, parent.shape[2] * 10)
    for b in range(parent.shape[0]):
        sea = parent[b] == NODATA
        child_sea = child[b] == NODATA
        # nodata children exactly under nodata parents
        np.testing.assert_array_equal(child_sea, np.kron(sea, np.ones((10, 10), dtype=bool)))
        sums = _block_sum64(np.where(child_sea, 0, child[b]))
        land = ~sea
        p = parent[b][land].astype(np.float64)
        s = sums[land]
        assert np.all(np.abs(s - p) <= 1e-6 * np.abs(p)), np.max(np.abs(s - p) / np.maximum(np.abs(p), 1e-30))
        np.testing.assert_array_equal(s == 0, p == 0)  # exact zeros
        assert child[b][~child_sea].min() >= 0
        assert np.isfinite(child[b]).all()


def test_zero_fraction_sea_and_heavy_tail(arrays: dict[str, np.ndarray]) -> None:
    parent = arrays["parent"]
    for b in range(parent.shape[0]):
        v = parent[b]
        land = v != NODATA
        assert 0.01 < 1 - land.mean() < 0.3  # a few sea cells
        assert (v[land] == 0).mean() > 0.60
        nz = v[land & (v > 0)]
        median = np.median(nz)
        assert v.max() / median >= 1000
        assert (nz >= 1000 * median).sum() <= 10  # a few, not many


def test_year_to_year_change(arrays: dict[str, np.ndarray]) -> None:
    e = arrays["parent"].astype(np.float64)
    land = e[0] != NODATA
    first, last = e[0][land], e[-1][land]
    median = np.median(first[first > 0])
    assert not np.array_equal(first, last)
    # a plant closes: a very large cell loses almost everything
    assert np.any((first > 300 * median) & (last < 0.1 * first))
    # a new plant appears: a very large cell where there was little before
    assert np.any((last > 300 * median) & (first < 0.1 * last))
    # ordinary cells change moderately (growth + noise), and zeros stay zero outside plants
    both = (first > 0) & (last > 0)
    ratio = np.median(last[both] / first[both])
    assert 0.8 < ratio < 1.3


def test_no_single_aux_layer_explains_emissions(sample_dir: Path, arrays: dict[str, np.ndarray]) -> None:
    e = arrays["parent"][0]
    with rasterio.open(sample_dir / "aux" / "population_100m.tif") as ds:
        pop = ds.read(1)[30:-30, 30:-30]  # the 3 km margin
    pop1k = _block_sum64(pop)
    land = e != NODATA
    r = np.corrcoef(np.log1p(e[land]), np.log1p(pop1k[land]))[0, 1]
    assert 0.2 < r < 0.95


def test_grids_crs_nodata_and_tags(sample_dir: Path) -> None:
    parent_tf = from_origin(452_000.0, 3_600_000.0, 1000.0, 1000.0)
    with rasterio.open(sample_dir / "emissions_1km.tif") as e:
        assert e.crs.to_epsg() == 32650
        assert e.transform == parent_tf
        assert (e.height, e.width, e.count) == (96, 96, 3)
        assert e.dtypes == ("float32",) * 3
        assert e.nodata == NODATA
        assert e.descriptions == YEARS
        assert e.tags()["UNITS"] == "t CO2 / cell / yr"
        bounds = e.bounds
    with rasterio.open(sample_dir / "truth_100m.tif") as t:
        assert t.crs.to_epsg() == 32650
        assert t.transform == from_origin(452_000.0, 3_600_000.0, 100.0, 100.0)
        assert (t.height, t.width) == (960, 960)
        assert t.nodata == NODATA and t.descriptions == YEARS
    aux = sample_dir / "aux"
    assert not list(aux.glob("truth*"))  # truth lives outside aux/
    for name, res in (("population_100m.tif", 100.0), ("builtup_100m.tif", 100.0), ("landcover_100m.tif", 100.0), ("lights_500m.tif", 500.0)):
        with rasterio.open(aux / name) as ds:
            assert ds.crs.to_epsg() == 32650, name
            assert ds.res == (res, res), name
            b = ds.bounds
            assert b.left < bounds.left and b.right > bounds.right and b.bottom < bounds.bottom and b.top > bounds.top, name
            if res == 100.0:  # aligned with the child grid
                assert (b.left - bounds.left) % 100 == 0 and (b.top - bounds.top) % 100 == 0
            else:  # lights: a 500 m grid not aligned with the parent grid
                assert (b.left - bounds.left) % 500 != 0
    with rasterio.open(aux / "landcover_100m.tif") as ds:
        assert ds.dtypes == ("uint8",)
        assert ds.tags()["CARBONSR_KIND"] == "categorical"
        assert set(np.unique(ds.read(1)).tolist()) <= {10, 20, 50, 80, 90}
        assert ds.nodata == 0
    with rasterio.open(aux / "builtup_100m.tif") as ds:
        a = ds.read(1)
        assert a.min() >= 0 and a.max() <= 1
    with rasterio.open(aux / "lights_500m.tif") as ds:
        a = ds.read(1)
        assert a.min() >= 0 and a.max() == 63  # saturating
        assert (a == 63).mean() < 0.05


def test_ndvi_is_geographic_and_covers_region(sample_dir: Path) -> None:
    from rasterio.warp import transform as warp_transform

    with rasterio.open(sample_dir / "aux" / "ndvi_4326.tif") as ds:
        assert ds.crs.to_epsg() == 4326
        assert ds.res == pytest.approx((0.001, 0.001))
        a = ds.read(1)
        # every parent cell centre of the region falls on valid NDVI
        xs, ys = np.meshgrid(452_500.0 + 1000.0 * np.arange(96), 3_599_500.0 - 1000.0 * np.arange(96))
        lon, lat = warp_transform("EPSG:32650", "EPSG:4326", xs.ravel(), ys.ravel())
        rows, cols = rasterio.transform.rowcol(ds.transform, lon, lat)
        vals = a[np.asarray(rows), np.asarray(cols)]
        assert vals.min() >= -0.2 and vals.max() <= 0.9
        valid = a[a != ds.nodata]
        assert valid.min() >= -0.2 - 1e-6 and valid.max() <= 0.9 + 1e-6


def test_roads_and_readme(sample_dir: Path) -> None:
    import geopandas as gpd

    roads = gpd.read_file(sample_dir / "aux" / "roads.gpkg")
    assert roads.crs.to_epsg() == 32650
    assert len(roads) > 100
    assert set(roads["class"]) == {"motorway", "primary", "secondary", "residential"}
    assert set(roads.geom_type) == {"LineString"}
    text = (sample_dir / "README.txt").read_text()
    assert "t CO2 / cell / yr" in text and "categorical" in text.lower() and "evaluation" in text.lower()


# ----------------------------------------------------------------------------- determinism


def test_same_seed_identical_different_seed_differs(tmp_path: Path) -> None:
    a = sd.generate_sample_data(tmp_path / "a", seed=3, size_km=24, years=(2019, 2020))
    b = sd.generate_sample_data(tmp_path / "b", seed=3, size_km=24, years=(2019, 2020))
    c = sd.generate_sample_data(tmp_path / "c", seed=4, size_km=24, years=(2019, 2020))
    ra, rb, rc = _read_all(a.root), _read_all(b.root), _read_all(c.root)
    assert ra.keys() == rb.keys()
    for k in ra:
        np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)
    assert not np.array_equal(ra["emissions_1km.tif"], rc["emissions_1km.tif"])
    assert not np.array_equal(ra["aux/population_100m.tif"], rc["aux/population_100m.tif"])
    assert a.files == [a.root / f.relative_to(a.root) for f in a.files] and all(f.exists() for f in a.files)


def test_noise_free_twin_differs_only_by_the_per_cell_noise(tmp_path: Path) -> None:
    """The twin (benchmarks' floor) has the same aux, zeros and nodata; its cells differ from the
    noisy truth by the lognormal factor alone (sigma 0.15: within exp(+-6 sigma))."""
    a = sd.generate_sample_data(tmp_path / "a", seed=3, size_km=24, years=(2019, 2020))
    b = sd.generate_sample_data(tmp_path / "b", seed=3, size_km=24, years=(2019, 2020), noise_free=True)
    ra, rb = _read_all(a.root), _read_all(b.root)
    for k in ra:
        if k not in ("truth_100m.tif", "emissions_1km.tif"):
            np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)
    noisy, clean = ra["truth_100m.tif"].astype(np.float64), rb["truth_100m.tif"].astype(np.float64)
    np.testing.assert_array_equal(noisy > 0, clean > 0)
    np.testing.assert_array_equal(noisy == NODATA, clean == NODATA)
    pos = clean > 0
    ratio = noisy[pos] / clean[pos]
    assert ratio.min() > np.exp(-6 * 0.15) and ratio.max() < np.exp(6 * 0.15)
    assert 0.1 < np.std(np.log(ratio)) < 0.16  # plants' cells (no per-cell noise) pull it below 0.15


def test_twin_without_unlisted_plants_zeroes_only_their_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``unlisted_plants=False`` (benchmarks' reachable floor): the noise-free twin with every plant
    that plants.gpkg leaves out set to 0 on its footprint; every other cell and file unchanged."""
    with pytest.raises(ValueError, match="noise_free"):
        sd.generate_sample_data(tmp_path / "x", seed=2, size_km=24, kind="points", unlisted_plants=False)
    assert not (tmp_path / "x").exists()
    made: list[list] = []

    def make_plants(*args, **kwargs):  # records the generator's plants (footprints, extended grid)
        plants = real(*args, **kwargs)
        made.append(plants)
        return plants

    real = sd._make_plants
    monkeypatch.setattr(sd, "_make_plants", make_plants)
    kw = dict(seed=2, size_km=24, years=(2019, 2020, 2021), kind="points", noise_free=True)
    a = sd.generate_sample_data(tmp_path / "a", **kw)
    b = sd.generate_sample_data(tmp_path / "b", **kw, unlisted_plants=False)
    assert len(made) == 2 and len(made[0]) == len(made[1])
    for fa, fb in zip(a.files, b.files, strict=True):
        if fa.name != "truth_100m.tif":
            assert fa.read_bytes() == fb.read_bytes(), fa.name

    import geopandas as gpd

    listed = {int(name.split()[1]) - 1 for name in gpd.read_file(a.plants)["name"]}
    plants = made[0]
    unlisted = sorted(set(range(len(plants))) - listed)
    assert listed and unlisted  # points regions have >= 8 plants: both kinds are there
    with rasterio.open(a.truth) as da, rasterio.open(b.truth) as db:
        ta, tb = da.read(), db.read()
    m = sd._MARGIN

    def cells(idx: list[int]) -> np.ndarray:
        mask = np.zeros(ta.shape[1:], dtype=bool)
        for i in idx:
            mask[plants[i].rows - m, plants[i].cols - m] = True
        return mask

    gone, kept = cells(unlisted), cells(sorted(listed))
    assert (ta[:, gone] > 0).any(axis=0).all() and (ta[:, kept] > 0).any(axis=0).all()  # every plant emits in some year
    assert (tb[:, gone] == 0).all()
    np.testing.assert_array_equal(tb[:, kept], ta[:, kept])
    np.testing.assert_array_equal(tb[:, ~gone], ta[:, ~gone])
    # the default twin is the same with the argument spelled out
    c = sd.generate_sample_data(tmp_path / "c", **kw, unlisted_plants=True)
    for fa, fc in zip(a.files, c.files, strict=True):
        assert fa.read_bytes() == fc.read_bytes(), fa.name


# ----------------------------------------------------------------------------- safety and CLI


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith("." + path.name))


def test_cli_refuses_non_empty_dir_then_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    runner = CliRunner()
    res = runner.invoke(app, ["sample-data", str(out), "--size-km", "12"])
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(out) in lines[0], res.output
    assert (out / "keep.txt").read_text() == "old" and not (out / "emissions_1km.tif").exists()

    # --overwrite replaces only an earlier sample region, never a folder with other files (issue 18)
    res = runner.invoke(app, ["sample-data", str(out), "--size-km", "12", "--overwrite"])
    assert res.exit_code == 1 and "not a carbonsr sample region" in res.output
    assert (out / "keep.txt").read_text() == "old"
    (out / "keep.txt").unlink()
    assert runner.invoke(app, ["sample-data", str(out), "--size-km", "12"]).exit_code == 0
    res = runner.invoke(app, ["sample-data", str(out), "--size-km", "12", "--years", "2020", "2021", "--overwrite"])
    assert res.exit_code == 0, res.output
    with rasterio.open(out / "emissions_1km.tif") as ds:
        assert ds.descriptions == ("2020", "2021") and ds.shape == (12, 12)
    assert "emissions_1km.tif" in res.output and "EPSG:4326" in res.output
    assert _siblings(out) == []  # no temp or old directories left


def test_empty_existing_dir_is_fine(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    res = sd.generate_sample_data(out, size_km=12, years=(2020,))
    with rasterio.open(res.emissions) as ds:
        assert ds.count == 1 and ds.descriptions == ("2020",)


def test_cli_unwritable_dir_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    res = CliRunner().invoke(app, ["sample-data", str(blocker / "sub"), "--size-km", "12"])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {blocker}:"), res.output


def test_permission_error_becomes_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def deny(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", deny)
    with pytest.raises(OutputError, match="permission denied") as info:
        sd.generate_sample_data(tmp_path / "new", size_km=12)
    assert info.value.path == str(tmp_path)


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "data"

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sd, "_write_readme", boom)
    with pytest.raises(KeyboardInterrupt):
        sd.generate_sample_data(out, size_km=12)
    assert not out.exists() and _siblings(out) == []
    # with --overwrite, the old directory survives an interrupted run
    out.mkdir()
    (out / "README.txt").write_text("old")  # an earlier sample region (--overwrite replaces only those)
    with pytest.raises(KeyboardInterrupt):
        sd.generate_sample_data(out, size_km=12, overwrite=True)
    assert (out / "README.txt").read_text() == "old" and _siblings(out) == []


def test_cli_help_has_example() -> None:
    res = CliRunner().invoke(app, ["sample-data", "--help"])
    assert res.exit_code == 0, res.output
    assert EXAMPLE in " ".join(res.output.split())


@pytest.mark.parametrize(
    ("args", "years"),
    [
        (["--years", "2019", "2020", "2021"], ["2019", "2020", "2021"]),
        (["--years", "2019,2020", "2021"], ["2019", "2020", "2021"]),
        (["--years=2019,2020"], ["2019", "2020"]),
        (["--years", "2019", "--years", "2020"], ["2019", "2020"]),
    ],
)
def test_expand_years(args: list[str], years: list[str]) -> None:
    expanded = expand_years(["out", *args, "--seed", "1"])
    assert expanded[0] == "out" and expanded[-2:] == ["--seed", "1"]
    assert expanded[1:-2] == [tok for y in years for tok in ("--years", y)]


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="duplicates"):
        sd.generate_sample_data(tmp_path / "x", years=(2019, 2019))
    with pytest.raises(UsageError, match="4-digit"):
        sd.generate_sample_data(tmp_path / "x", years=(19,))
    with pytest.raises(UsageError, match="size-km"):
        sd.generate_sample_data(tmp_path / "x", size_km=5)
    res = CliRunner().invoke(app, ["sample-data", str(tmp_path / "y"), "--years", "2019", "2019"])
    assert res.exit_code == 2 and "duplicates" in res.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
