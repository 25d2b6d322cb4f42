"""Every registered method through ``downscale()`` on a small region: the written file keeps the
physics contract, and METHOD names what ran (``auto`` names what it chose)."""

from __future__ import annotations

from pathlib import Path

import pytest
import rasterio
from ds_helpers import assert_conserves, make_checkpoint

from carbonsr_cli.downscale import downscale
from carbonsr_cli.errors import CheckpointError, UsageError
from carbonsr_cli.methods import REGISTRY


@pytest.fixture(scope="module")
def plants(small_region: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Three listed point sources (``co2_t_yr``) inside the region, as ``file:attribute``."""
    import geopandas as gpd
    from shapely.geometry import Point

    path = tmp_path_factory.mktemp("plants") / "plants.gpkg"
    pts = [Point(503_450.0, 4_996_550.0), Point(510_050.0, 4_990_050.0), Point(518_950.0, 4_983_150.0)]
    gpd.GeoDataFrame({"co2_t_yr": [5e4, 1e3, 2e5]}, geometry=pts, crs="EPSG:32633").to_file(path, driver="GPKG")
    return f"{path}:co2_t_yr"


@pytest.fixture(scope="module")
def fitted_ckpt(small_region: dict, plants: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint with a fitted layer mix and a selection record (as ``train`` writes them)."""
    names = [*small_region["names"], "plants:co2_t_yr"]
    return make_checkpoint(tmp_path_factory.mktemp("fit") / "fit.pth", names, prior_coef=[0.0, 1.0, 2.0],
                           selection={"method": "fitted", "reason": "test"})


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_downscales_and_conserves(name: str, small_region: dict, plants: str, fitted_ckpt: Path,
                                               tmp_path: Path) -> None:
    method = REGISTRY[name]
    aux = [str(small_region["aux"] / "*.tif"), plants]
    out = tmp_path / f"{name}.tif"
    kw = {"checkpoint": fitted_ckpt} if method.needs_checkpoint else {}
    summary = downscale(small_region["main"], aux, out, method=name, progress=False, device="cpu", **kw)
    assert summary.conservation is not None and summary.conservation.ok
    assert_conserves(out, small_region["main"], 10)
    with rasterio.open(out) as ds:
        tag = ds.tags().get("CARBONSR_METHOD", "")
    want = "fitted" if name == "auto" else name
    assert tag.split(":")[0] == want, tag
    if name == "auto":
        assert any("auto chose fitted" in n for n in summary.notes)


def test_points_without_a_point_layer_is_a_usage_error(small_region: dict, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="point layer"):
        downscale(small_region["main"], [str(small_region["aux"])], tmp_path / "x.tif", method="points", progress=False)
    assert not (tmp_path / "x.tif").exists()


def test_fitted_and_auto_need_the_records(small_region: dict, small_ckpt: Path, tmp_path: Path) -> None:
    for name, text in (("fitted", "no fitted layer mix"), ("auto", "no validation record")):
        with pytest.raises(CheckpointError, match=text):
            downscale(small_region["main"], [str(small_region["aux"])], tmp_path / "x.tif", method=name,
                      checkpoint=small_ckpt, progress=False, device="cpu")
    assert not (tmp_path / "x.tif").exists()
