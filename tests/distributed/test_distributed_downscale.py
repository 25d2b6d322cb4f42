"""Downscaling under torchrun with 2 CPU ranks (gloo) writes the single-process file exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "downscale"))
from dist_helpers import run_spec  # noqa: E402
from ds_helpers import make_checkpoint, synthetic_totals, write_tif  # noqa: E402

from carbonsr_cli.downscale.distributed import align_rows, context_rows, part_extent, row_parts  # noqa: E402
from carbonsr_cli.tiling import TileLayout  # noqa: E402

#: 192 x 8 parent cells (model) and the 192 km sample region (baselines): 24 tile rows
#: (stride 8); rank 0 owns rows 0-96 and computes 0-128, rank 1 owns 96-192 and computes
#: 64-192: both part grids are cut inside the raster (the border case is exercised). On the
#: sample region GDAL's warp of ``ndvi_4326`` depends on the 128-row VRT block a pixel falls
#: in: without the 64-row alignment of the part grids (``CARBONSR_DIST_ALIGN_VRT=0``)
#: ``dasymetric:ndvi_4326`` differs from one process by up to 1.6 t (checked by hand).
ROWS, COLS = 192, 8


@pytest.fixture(scope="module")
def tall_region(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("dist_region")
    origin = (500_000.0, 5_000_000.0)
    totals = synthetic_totals(ROWS, COLS, 2, seed=4)
    main = write_tif(d / "main.tif", totals, res=1000.0, origin=origin, crs="EPSG:32633", descriptions=["2019", "2020"])
    rng = np.random.default_rng(5)
    aux = d / "aux"
    aux.mkdir()
    # same CRS at 100 m, and another CRS (warped onto the child grid)
    yy, xx = np.mgrid[0 : ROWS * 10, 0 : COLS * 10]
    write_tif(aux / "built.tif", 10 + 5 * np.sin(xx / 9.0) * np.cos(yy / 13.0) + rng.gamma(1.0, 2.0, xx.shape), res=100.0, origin=origin, crs="EPSG:32633", nodata=None)
    from rasterio.warp import transform_bounds

    left, bottom, right, top = transform_bounds("EPSG:32633", "EPSG:4326", origin[0], origin[1] - ROWS * 1000.0, origin[0] + COLS * 1000.0, origin[1])
    res = 0.001
    h, w = int((top - bottom) / res) + 6, int((right - left) / res) + 6
    yy, xx = np.mgrid[0:h, 0:w]
    lights = 30 + 20 * np.sin(xx / 3.0 + yy / 7.0) + rng.gamma(1.0, 3.0, xx.shape)
    write_tif(aux / "ndvi.tif", lights, res=res, origin=(left - 3 * res, top + 3 * res), crs="EPSG:4326", nodata=-9999.0)
    ckpt = make_checkpoint(d / "tiny.pth", ["built", "ndvi"])
    from carbonsr_cli.sample_data import generate_sample_data

    sample = d / "sample192"
    generate_sample_data(sample, seed=0, size_km=ROWS, years=(2019,))
    return {"main": main, "aux": aux, "ckpt": ckpt, "wide": sample / "emissions_1km.tif", "ndvi": sample / "aux" / "ndvi_4326.tif"}


def test_parts_partition_rows_on_tile_borders() -> None:
    lay = TileLayout(ROWS, COLS, 10, 120, 2)
    parts = row_parts(lay, 2)
    assert parts == [(0, 96), (96, 192)]
    assert [part_extent(lay, *p) for p in parts] == [(0, 128), (64, 192)]
    assert context_rows(lay) % lay.stride_parent == 0 and context_rows(lay) > lay.tile_parent + lay.stride_parent
    assert align_rows(lay) == 64  # 8-row stride and 128-child-row VRT blocks at factor 10
    for world in (1, 2, 3, 5, 9):
        ps = row_parts(TileLayout(37, 5, 10, 120, 2), world)
        assert ps[0][0] == 0 and ps[-1][1] == 37 and all(ps[k][1] == ps[k + 1][0] for k in range(world - 1))


def _read(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as ds:
        tags = {k: v for k, v in ds.tags().items() if k != "TIFFTAG_DATETIME"}  # written at different times
        meta = {"profile": {k: v for k, v in ds.profile.items() if k != "blockysize"}, "tags": tags, "desc": ds.descriptions,
                "units": ds.units, "band_tags": [ds.tags(b) for b in range(1, ds.count + 1)]}
        return ds.read(), meta


def test_two_ranks_write_the_single_process_file(tall_region: dict, tmp_path: Path) -> None:
    import torch

    from carbonsr_cli.downscale import downscale

    common = dict(main_path=str(tall_region["main"]), aux_paths=[str(tall_region["aux"])], device="cpu", batch_size=4)
    wide = dict(common, main_path=str(tall_region["wide"]), aux_paths=[str(tall_region["ndvi"])])
    jobs = [
        dict(wide, dst=str(tmp_path / "dist_uniform.tif"), method="uniform"),
        dict(wide, dst=str(tmp_path / "dist_dasy.tif"), method="dasymetric:ndvi_4326"),
        dict(common, dst=str(tmp_path / "dist_model.tif"), checkpoint=str(tall_region["ckpt"])),
    ]
    res = run_spec("downscale", {"jobs": jobs}, tmp_path / "ds.json")
    assert res["world_size"] == 2
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks ran with one thread each: same CPU kernels
    try:
        for job in jobs:
            ref = tmp_path / ("single_" + Path(job["dst"]).name)
            downscale(progress=False, **dict(job, dst=str(ref)))
            got = res[job["dst"]]
            assert got["ok"], got
            assert any("distributed over 2 processes" in n for n in got["notes"]), got["notes"]
            a, meta_a = _read(Path(job["dst"]))
            b, meta_b = _read(ref)
            assert meta_a == meta_b
            assert a.dtype == b.dtype and a.shape == b.shape and a.shape[1] == ROWS * 10
            assert np.array_equal(a, b), f"{job['dst']}: max |diff| {np.nanmax(np.abs(a - b))}"
    finally:
        torch.set_num_threads(old)
    leftovers = [p.name for p in tmp_path.iterdir() if ".part" in p.name or p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def test_gpu_ranks_on_one_machine_are_pointed_to_the_one_process_way(monkeypatch: pytest.MonkeyPatch) -> None:
    from carbonsr_cli.downscale.distributed import one_machine_hint

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert "--device cuda:0,cuda:1" in one_machine_hint(2, torch.device("cuda", 0))
    assert one_machine_hint(2, torch.device("cpu")) is None  # CPU ranks: nothing to say
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # 2 nodes of 1 GPU each
    assert one_machine_hint(2, torch.device("cuda", 0)) is None
