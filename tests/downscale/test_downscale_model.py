"""The model path of ``downscale`` with tiny untrained checkpoints (no training needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.windows
from ds_helpers import assert_conserves, make_checkpoint, no_temp_files

from carbonsr_cli.downscale import downscale
from carbonsr_cli.downscale.plan import year_window
from carbonsr_cli.downscale.predict import unique_windows


#: Issue 18 item 10c: warnings raised from carbonsr's own code (deprecated affine ``*``, matplotlib
#: ``set_bad``, torch on read-only arrays) fail these tests; carbonsr's own user warnings do not.
pytestmark = pytest.mark.filterwarnings(
    "error::PendingDeprecationWarning:carbonsr_cli", "error::DeprecationWarning:carbonsr_cli",
    "error::UserWarning:carbonsr_cli", "default::carbonsr_cli.errors.CarbonSRWarning",
)


def test_model_conserves_with_aux_in_other_crs(
    small_region: dict, small_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Main in UTM, aux in EPSG:4326 and EPSG:3857; 2 years; 3 x 3 tiles; float32 and float64.

    The float64 run splits every tile row into chunks of 2 tiles (as a very wide raster would)
    and must give the same values as the float32 run with whole-row chunks.
    """
    from carbonsr_cli.downscale import engine

    outs = {}
    for dtype in ("float32", "float64"):
        if dtype == "float64":
            monkeypatch.setattr(engine, "CHUNK_BYTES", 1)
        out = outs[dtype] = tmp_path / f"m_{dtype}.tif"
        s = downscale(small_region["main"], [small_region["aux"]], out, checkpoint=small_ckpt, device="cpu",
                      dtype=dtype, progress=False, batch_size=6 if dtype == "float32" else 4)
        figures = assert_conserves(out, small_region["main"], 10)
        assert figures["zeros"] > 0 and figures["nodata"] > 0
        assert s.method == "model" and s.conservation.ok and s.tiles == 3 * 3 * 2
        with rasterio.open(out) as ds:
            assert ds.dtypes == (dtype, dtype)
            tags = ds.tags()
            assert tags["CARBONSR_METHOD"] == "model" and tags["CARBONSR_AUX_LAYERS"] == "lights,pop"
            assert len(tags["CARBONSR_MODEL_SHA256"]) == 64 and tags["CARBONSR_MODEL_SHA256"] == s.model_sha256
    with rasterio.open(outs["float32"]) as a, rasterio.open(outs["float64"]) as b:
        va, vb = a.read(masked=True), b.read(masked=True)
    assert np.array_equal(va.mask, vb.mask)
    assert np.allclose(va.filled(0), vb.filled(0), rtol=1e-4, atol=1e-6)
    # The model does something other than the uniform split inside blocks.
    with rasterio.open(small_region["main"]) as m:
        tot = m.read(masked=True).astype(np.float64)
    uni = np.repeat(np.repeat(tot / 100.0, 10, 1), 10, 2)
    assert np.abs(vb - uni).max() > 1e-3
    assert no_temp_files(tmp_path) == []


def _corner_aoi(path: Path, main: Path, cells: int) -> Path:
    """A square AOI of ``cells`` x ``cells`` parent cells at the top-left corner (one tile)."""
    import geopandas as gpd
    from shapely.geometry import box

    from carbonsr_cli.grids import ParentGrid

    g = ParentGrid.from_raster(main, warn=False)
    left, _, _, top = g.bounds
    rx, ry = g.res
    eps = 0.01
    geom = box(left + eps * rx, top - (cells - eps) * ry, left + (cells - eps) * rx, top - eps * ry)
    gpd.GeoDataFrame(geometry=[geom], crs=g.crs).to_file(path)
    return path


def test_aux_order_does_not_matter(small_region: dict, small_ckpt: Path, tmp_path: Path) -> None:
    """Aux files given in another order are matched to the checkpoint by name: same output."""
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    aux = small_region["aux"]
    aoi = _corner_aoi(tmp_path / "aoi.gpkg", small_region["main"], 6)
    downscale(small_region["main"], [aux / "lights.tif", aux / "pop.tif"], a, checkpoint=small_ckpt,
              device="cpu", years=["2019"], aoi=aoi, progress=False)
    downscale(small_region["main"], [aux / "pop.tif", aux / "lights.tif"], b, checkpoint=small_ckpt,
              device="cpu", years=["2019"], aoi=aoi, progress=False)
    with rasterio.open(a) as da, rasterio.open(b) as db:
        assert da.shape == (60, 60)
        va = da.read()
        assert np.array_equal(va, db.read())
    assert_conserves(a, small_region["main"], 10, bands=[1], window=rasterio.windows.Window(0, 0, 6, 6))


def test_temporal_window_rules() -> None:
    assert year_window(0, 5, 3) == ([0, 1, 2], 0)  # first year: window shifted right
    assert year_window(2, 5, 3) == ([1, 2, 3], 1)  # centred
    assert year_window(4, 5, 3) == ([2, 3, 4], 2)  # last year: shifted left
    assert year_window(1, 4, 4) == ([0, 1, 2, 3], 1)
    assert year_window(0, 2, 3) == ([0, 0, 1], 1)  # fewer years than T: nearest repeated
    assert year_window(0, 1, 3) == ([0, 0, 0], 1)
    assert year_window(0, 3, 1) == ([0], 0)
    with pytest.raises(ValueError):
        year_window(3, 3, 1)
    # Years with the same window share one model evaluation.
    uniq, src = unique_windows([year_window(k, 4, 3) for k in range(4)])
    assert uniq == [[0, 1, 2], [1, 2, 3]] and src == [(0, 0), (0, 1), (1, 1), (1, 2)]


def test_model_multi_year_window_and_year_selection(small_region: dict, tmp_path: Path) -> None:
    """T = 3 on a 2-year raster (nearest year repeated), output only --year 2020."""
    ckpt = make_checkpoint(tmp_path / "t3.pth", small_region["names"], years_window=3)
    out = tmp_path / "t3.tif"
    downscale(small_region["main"], [small_region["aux"]], out, checkpoint=ckpt, device="cpu",
              years=["2020"], progress=False)
    assert_conserves(out, small_region["main"], 10, bands=[2])
    with rasterio.open(out) as ds:
        assert ds.descriptions == ("2020",)
    # T = 2 on 2 years: both output years come from one evaluation per tile.
    ck2 = make_checkpoint(tmp_path / "t2.pth", small_region["names"], years_window=2)
    aoi = _corner_aoi(tmp_path / "aoi.gpkg", small_region["main"], 7)
    s = downscale(small_region["main"], [small_region["aux"]], tmp_path / "t2.tif", checkpoint=ck2, device="cpu",
                  aoi=aoi, progress=False)
    assert s.tiles == 1
    assert_conserves(tmp_path / "t2.tif", small_region["main"], 10, window=rasterio.windows.Window(0, 0, 7, 7))


def test_model_factor5_and_geographic(small_region: dict, geo_region: dict, tmp_path: Path) -> None:
    """A factor-5 checkpoint sets the factor; a 30 arc-second geographic parent works too."""
    ck5 = make_checkpoint(tmp_path / "f5.pth", small_region["names"], factor=5)
    out5 = tmp_path / "f5.tif"
    s = downscale(small_region["main"], [small_region["aux"]], out5, checkpoint=ck5, device="cpu",
                  years=["2019"], progress=False)
    assert s.factor == 5
    assert_conserves(out5, small_region["main"], 5, bands=[1])

    ckg = make_checkpoint(tmp_path / "geo.pth", geo_region["names"])
    outg = tmp_path / "geo.tif"
    downscale(geo_region["main"], [geo_region["aux"]], outg, checkpoint=ckg, device="cpu", progress=False)
    assert_conserves(outg, geo_region["main"], 10)


def test_model_on_sample_data_with_aoi(sample_dir: Path, tmp_path: Path) -> None:
    """The sample's 14 aux layers (rasters in 2 CRSs, categorical, vector roads) through the model."""
    import geopandas as gpd
    from shapely.geometry import box

    from carbonsr_cli.aoi import aoi_parent_window
    from carbonsr_cli.aux import discover_aux, layer_names
    from carbonsr_cli.grids import ParentGrid

    main = sample_dir / "emissions_1km.tif"
    names = layer_names(discover_aux([sample_dir / "aux"]))
    ckpt = make_checkpoint(tmp_path / "s.pth", names, years_window=3)
    grid = ParentGrid.from_raster(main, warn=False)
    left, bottom, right, top = grid.bounds
    aoi = tmp_path / "aoi.geojson"
    gpd.GeoDataFrame(geometry=[box(left + 500, top - 14_500, left + 14_500, top - 500)], crs=grid.crs).to_file(aoi)
    out = tmp_path / "sample_model.tif"
    downscale(main, [sample_dir / "aux"], out, checkpoint=ckpt, device="cpu", years=["2021"], aoi=aoi, progress=False)
    win, mask = aoi_parent_window(aoi, grid)
    assert (int(win.col_off), int(win.row_off)) == (0, 0)  # raster corner: edge padding is used
    assert_conserves(out, main, 10, bands=[3], window=win, mask=mask)


def test_uncertainty_output(geo_region: dict, tmp_path: Path) -> None:
    """--uncertainty: std over 8 dihedral views; the main output matches a run without it."""
    ck = make_checkpoint(tmp_path / "u.pth", geo_region["names"])
    aoi = _corner_aoi(tmp_path / "aoi.gpkg", geo_region["main"], 8)
    out, unc, ref = tmp_path / "o.tif", tmp_path / "o_std.tif", tmp_path / "ref.tif"
    s = downscale(geo_region["main"], [geo_region["aux"]], out, checkpoint=ck, device="cpu", uncertainty=unc,
                  aoi=aoi, progress=False)
    downscale(geo_region["main"], [geo_region["aux"]], ref, checkpoint=ck, device="cpu", aoi=aoi, progress=False)
    assert s.uncertainty == str(unc) and s.tiles == 8 * 1 * 1
    assert_conserves(out, geo_region["main"], 10, window=rasterio.windows.Window(0, 0, 8, 8))
    with rasterio.open(out) as o, rasterio.open(ref) as r, rasterio.open(unc) as u:
        # Same prediction up to float32 rounding (the views share a batch with it).
        assert np.allclose(o.read(), r.read(), rtol=1e-5, atol=1e-7)
        assert u.tags()["CARBONSR_UNITS"].endswith("(standard deviation over 8 flips/rotations)")
        assert u.tags()["CARBONSR_QUANTITY"].startswith("standard deviation")
        assert u.tags()["CARBONSR_METHOD"] == "model (standard deviation over 8 flips/rotations)"
        assert all(d.endswith(" std") for d in u.descriptions) and "CARBONSR_UNCERTAINTY" not in u.tags()
        std = u.read(1)
        nd_o = o.read(1) == o.nodata
        assert nd_o.any()  # the corner parent cell is nodata
        assert np.array_equal(std == u.nodata, nd_o)
        assert (std[~nd_o] >= 0).all() and std[~nd_o].max() > 0


def test_dihedral_roundtrip() -> None:
    import torch

    from carbonsr_cli.downscale.predict import dihedral, dihedral_inverse

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    seen = set()
    for d in range(8):
        y = dihedral(x, d)
        seen.add(tuple(y[0, 0].flatten().tolist()))
        assert torch.equal(dihedral_inverse(y, d), x)
    assert len(seen) == 8  # eight distinct transforms


def test_interrupt_leaves_no_output(small_region: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the middle of the run (second row band) leaves neither output nor temp file."""
    from carbonsr_cli.downscale import bands

    monkeypatch.setattr(bands, "BASELINE_BAND_ROWS", 50)  # 4 bands
    calls = {"n": 0}
    real = bands.baseline_fill

    def flaky(*args, **kwargs):  # noqa: ANN002, ANN003
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bands, "baseline_fill", flaky)
    out = tmp_path / "int.tif"
    with pytest.raises(KeyboardInterrupt):
        downscale(small_region["main"], [], out, method="uniform", progress=False)
    assert calls["n"] >= 2  # preparing threads may have started the next bands meanwhile
    assert not out.exists() and no_temp_files(tmp_path) == []


@pytest.mark.gpu
def test_cuda_bf16_conserves(small_region: dict, small_ckpt: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = tmp_path / "cuda.tif"
    s = downscale(small_region["main"], [small_region["aux"]], out, checkpoint=small_ckpt, device="cuda", progress=False)
    assert s.precision in ("bf16", "fp32")
    assert_conserves(out, small_region["main"], 10)


@pytest.mark.parametrize("overlap", [0, 1, 3])
def test_model_conserves_for_every_tile_overlap(small_region: dict, small_ckpt: Path, tmp_path: Path, overlap: int) -> None:
    """--overlap changes how tiles are laid out and blended, never the block sums."""
    out = tmp_path / f"ov{overlap}.tif"
    s = downscale(small_region["main"], [small_region["aux"]], out, checkpoint=small_ckpt, device="cpu",
                  progress=False, overlap=overlap)
    assert s.conservation.ok
    assert_conserves(out, small_region["main"], 10)


def test_overlap_too_large_is_a_usage_error(small_region: dict, small_ckpt: Path, tmp_path: Path) -> None:
    from carbonsr_cli.errors import UsageError

    out = tmp_path / "big.tif"
    with pytest.raises(UsageError, match="overlap"):
        downscale(small_region["main"], [small_region["aux"]], out, checkpoint=small_ckpt, device="cpu",
                  progress=False, overlap=6)
    assert not out.exists()


def test_temporal_window_tag_reads_singular_and_plural(small_region: dict, small_ckpt: Path, tmp_path: Path) -> None:
    """Issue 18 item 10b: '1 band: each output band alone', '2 bands centred ...' (never '1 bands')."""
    ck2 = make_checkpoint(tmp_path / "t2.pth", small_region["names"], years_window=2)
    aoi = _corner_aoi(tmp_path / "aoi.gpkg", small_region["main"], 7)
    for ckpt, expected in ((small_ckpt, "1 band: each output band alone"),
                           (ck2, "2 bands centred on each output band (shifted at the ends)")):
        out = tmp_path / f"{ckpt.stem}.tif"
        downscale(small_region["main"], [small_region["aux"]], out, checkpoint=ckpt, device="cpu", aoi=aoi,
                  progress=False)
        with rasterio.open(out) as ds:
            assert ds.tags()["CARBONSR_TEMPORAL_WINDOW"] == expected
