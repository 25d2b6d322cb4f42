"""Tests of the sample region kinds (``kind=``/``--kind``) and the plant catalogue ``plants.gpkg``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window
from typer.testing import CliRunner

from carbonsr_cli import sample_data as sd
from carbonsr_cli.cli import app

KINDS = ("mixed", "points", "traffic", "urban")


@pytest.fixture(scope="module")
def regions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, sd.SampleData]:
    """One 36 km region per kind, same seed, two years."""
    root = tmp_path_factory.mktemp("kinds")
    return {k: sd.generate_sample_data(root / k, seed=0, size_km=36, years=(2019, 2020), kind=k) for k in KINDS}


def _truth(s: sd.SampleData) -> np.ndarray:
    """Truth ``[years, h, w]`` float64 with the sea (nodata) as 0."""
    with rasterio.open(s.truth) as ds:
        a = ds.read().astype(np.float64)
    return np.where(a == sd.NODATA, 0.0, a)


def _catalogue_cells(s: sd.SampleData) -> tuple[object, np.ndarray, np.ndarray]:
    import geopandas as gpd

    cat = gpd.read_file(s.plants)
    with rasterio.open(s.truth) as ds:
        rows, cols = rasterio.transform.rowcol(ds.transform, cat.geometry.x.to_numpy(), cat.geometry.y.to_numpy())
    return cat, np.asarray(rows), np.asarray(cols)


def _plant_counts(s: sd.SampleData) -> tuple[int, int]:
    m = re.search(r"(\d+) industrial point sources.*?catalogue lists (\d+)", s.readme.read_text(), re.S)
    assert m is not None
    return int(m.group(1)), int(m.group(2))


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_and_kind_give_identical_files(tmp_path: Path, kind: str) -> None:
    a = sd.generate_sample_data(tmp_path / "a", seed=5, size_km=24, years=(2020,), kind=kind)
    b = sd.generate_sample_data(tmp_path / "b", seed=5, size_km=24, years=(2020,), kind=kind)
    assert a.kind == kind and a.plants in a.files and a.plants not in a.aux_paths
    assert a.plants.parent == a.root  # not in aux/: --aux aux/* leaves it out
    for fa, fb in zip(a.files, b.files, strict=True):
        assert fa.read_bytes() == fb.read_bytes(), fa.name


def test_kinds_differ_from_each_other(regions: dict[str, sd.SampleData]) -> None:
    truths = {k: _truth(s) for k, s in regions.items()}
    for i, k in enumerate(KINDS):
        for other in KINDS[i + 1 :]:
            assert not np.array_equal(truths[k], truths[other]), (k, other)


def test_catalogue_is_an_incomplete_list_of_true_plants(regions: dict[str, sd.SampleData]) -> None:
    for kind, s in regions.items():
        cat, rows, cols = _catalogue_cells(s)
        assert cat.crs.to_epsg() == 32650 and set(cat.geom_type) == {"Point"}
        assert {"name", "co2_t_yr"} <= set(cat.columns) and cat["co2_t_yr"].dtype.kind == "f"
        n_plants, n_listed = _plant_counts(s)
        assert n_listed == len(cat) >= 1
        if n_plants >= 3:
            assert n_listed < n_plants, kind
        assert cat["name"].is_unique and (cat["co2_t_yr"] > 0).all()
        truth = _truth(s)
        peak = truth.max(axis=0)  # a plant opening later emits only in later years
        land = peak[peak > 0]
        for r, c, value in zip(rows, cols, cat["co2_t_yr"], strict=True):
            assert peak[r, c] > np.quantile(land, 0.99), (kind, r, c)
            first = truth[0, r - 1 : r + 2, c - 1 : c + 2].sum()  # the plant's footprint is within 1 cell
            if truth[0, r, c] > 0:  # operating in the first year (plant cells hold nothing else)
                assert 0.2 < value / first < 5.0, (kind, value, first)


def test_kinds_shift_emissions_in_the_intended_direction(regions: dict[str, sd.SampleData]) -> None:
    from carbonsr_cli.aux import AuxStack, discover_aux
    from carbonsr_cli.grids import ParentGrid

    top_share, road_share = {}, {}
    for kind, s in regions.items():
        truth = _truth(s)[0]
        k = max(1, int(truth.size * 0.002))  # plant footprints are a few cells each
        top = np.zeros(truth.size, dtype=bool)
        top[np.argsort(truth.ravel(), kind="stable")[-k:]] = True
        top = top.reshape(truth.shape)
        top_share[kind] = truth[top].sum() / truth.sum()
        child = ParentGrid.from_raster(s.emissions, warn=False).child(sd.FACTOR)
        with AuxStack(discover_aux([s.roads]), child, ["2019"]) as stack:
            road = stack.read(Window(0, 0, child.width, child.height))[0, 0] > 0
        near = road.copy()  # traffic is spread over a 3 x 3 road buffer
        near[1:] |= road[:-1]
        near[:-1] |= road[1:]
        near2 = near.copy()
        near2[:, 1:] |= near[:, :-1]
        near2[:, :-1] |= near[:, 1:]
        rest = np.where(top, 0.0, truth)  # the distributed emissions (without the point sources)
        road_share[kind] = rest[near2].sum() / rest.sum()
    assert max(top_share, key=top_share.get) == "points", top_share
    assert top_share["urban"] < 0.5 * top_share["mixed"], top_share  # smooth: no dominant point sources
    assert max(road_share, key=road_share.get) == "traffic", road_share


def test_catalogue_as_point_sum_aux_layer(regions: dict[str, sd.SampleData]) -> None:
    from carbonsr_cli.aux import AuxStack, discover_aux
    from carbonsr_cli.grids import ParentGrid

    s = regions["points"]
    cat, rows, cols = _catalogue_cells(s)
    child = ParentGrid.from_raster(s.emissions, warn=False).child(sd.FACTOR)
    with AuxStack(discover_aux([*sorted(s.aux_dir.iterdir()), f"{s.plants}:co2_t_yr"]), child, ["2019"]) as stack:
        assert stack.names[-1] == "plants:co2_t_yr" and "plants:count" not in stack.names
        layer = stack.read(Window(0, 0, child.width, child.height))[-1, 0]
    expected = np.zeros_like(layer, dtype=np.float64)
    np.add.at(expected, (rows, cols), cat["co2_t_yr"].to_numpy())
    np.testing.assert_allclose(layer, expected, rtol=1e-6)


def test_small_regions_of_every_kind(tmp_path: Path) -> None:
    for size in (12, 24):
        for kind in KINDS:
            s = sd.generate_sample_data(tmp_path / f"{kind}{size}", seed=1, size_km=size, years=(2019, 2020, 2021), kind=kind)
            with rasterio.open(s.emissions) as ds:
                assert ds.shape == (size, size) and float(ds.read().max()) > 0
            assert _plant_counts(s)[1] >= 1


def test_cli_kind_option(tmp_path: Path) -> None:
    runner = CliRunner()
    # a wide terminal: with a long temporary path (pytest-xdist's) the text wraps inside the names
    res = runner.invoke(app, ["sample-data", str(tmp_path / "u"), "--size-km", "12", "--years", "2020", "--kind", "urban"],
                        env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "plants.gpkg" in text and "kind urban" in text
    assert "kind=urban" in (tmp_path / "u" / "README.txt").read_text()
    res = runner.invoke(app, ["sample-data", str(tmp_path / "v"), "--size-km", "12", "--kind", "rural"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--kind" in lines[0], res.output
