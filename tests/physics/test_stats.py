"""Tests of carbonsr_cli/stats.py and the ``carbonsr stats`` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from typer.testing import CliRunner

from carbonsr_cli import stats as stats_mod
from carbonsr_cli.cli import app
from carbonsr_cli.errors import InputDataError, MissingInputError, OutputError, UsageError
from carbonsr_cli.stats import AuxNormalizer, compute_stats, load_stats, save_stats


def independent_main_stats(values: np.ndarray) -> dict[str, float]:
    """Numpy reference of the main-raster numbers over valid values (any shape)."""
    v = values[np.isfinite(values)].astype(np.float64)
    nz = v[v > 0]
    lg = np.log1p(nz)
    return {
        "sum": v.sum(),
        "cells": v.size,
        "n_zero": int((v == 0).sum()),
        "n_nonzero": nz.size,
        "log_nz_over_nnz": math.log((v <= 0).sum() / nz.size),
        "mean_log": lg.mean(),
        "cv_log": lg.std() / lg.mean(),
        "p50": np.quantile(nz, 0.5),
        "p99": np.quantile(nz, 0.99),
        "max": v.max(),
    }


def check_main(got: dict, ref: dict) -> None:
    for k in ("sum", "log_nz_over_nnz", "mean_log", "cv_log", "max"):
        assert got[k] == pytest.approx(ref[k], rel=1e-9), k
    for k in ("cells", "n_zero", "n_nonzero"):
        assert got[k] == ref[k], k
    for k in ("p50", "p99"):
        assert got["quantiles"][k] == pytest.approx(ref[k], rel=1e-12), k


@pytest.fixture(scope="module")
def sample_stats(sample_dir: Path) -> dict:
    return compute_stats(sample_dir / "emissions_1km.tif", [sample_dir / "aux"])


def test_sample_main_matches_numpy(sample_dir: Path, sample_stats: dict) -> None:
    with rasterio.open(sample_dir / "emissions_1km.tif") as ds:
        arr = ds.read().astype(np.float64)
        nodata = ds.nodata
    arr[arr == nodata] = np.nan
    check_main(sample_stats["main"], independent_main_stats(arr))
    for b, band in enumerate(sample_stats["bands"]):
        check_main(band, independent_main_stats(arr[b]))
        assert band["n_nodata"] == int(np.isnan(arr[b]).sum())
    assert sample_stats["grid"]["width"] == arr.shape[2]
    assert [b["name"] for b in sample_stats["bands"]] == ["2019", "2020", "2021"]


def test_sample_aux_normalisation(sample_dir: Path, sample_stats: dict) -> None:
    from carbonsr_cli.aux import AuxStack, discover_aux
    from carbonsr_cli.grids import ParentGrid
    from rasterio.windows import Window

    aux = {e["name"]: e for e in sample_stats["aux"]}
    assert aux["population_100m"]["transform"] == "log1p"  # heavy tailed
    assert aux["ndvi_4326"]["transform"] == "identity"  # negative values, not heavy tailed
    # the whole grid is small: every tile is read, so raw mean/max are exact over the stack
    grid = ParentGrid.from_raster(sample_dir / "emissions_1km.tif", warn=False).child(10)
    with AuxStack(discover_aux([sample_dir / "aux"]), grid, ["2019", "2020", "2021"]) as st:
        names = st.names
        full = st.read(Window(0, 0, grid.width, grid.height)).astype(np.float64)
    assert [e["name"] for e in sample_stats["aux"]] == names
    for c, name in enumerate(names):
        e = aux[name]
        # (rel 1e-5: warped layers differ by ~1e-6 between tile-wise and whole-grid reads)
        assert e["raw_mean"] == pytest.approx(full[c].mean(), rel=1e-5), name
        assert e["raw_max"] == pytest.approx(full[c].max()), name
        # normalisation recomputed from the stored sample rule (within sampling error)
        z = np.log1p(full[c]) if e["transform"] == "log1p" else full[c]
        zc = np.clip(z, e["clip_lo"], e["clip_hi"])
        assert e["mean"] == pytest.approx(zc.mean(), abs=0.02 * max(zc.std(), 1e-3)), name
    norm = AuxNormalizer.from_stats(sample_stats, names)
    out = norm.apply(full.astype(np.float32))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    pop = names.index("population_100m")
    assert abs(float(out[pop].mean())) < 0.05 and float(out[pop].std()) == pytest.approx(1.0, abs=0.05)


def test_aux_normalizer_numpy_and_torch() -> None:
    stats = {"aux": [
        {"name": "a", "transform": "log1p", "mean": 1.0, "std": 2.0, "clip_lo": 0.0, "clip_hi": 3.0},
        {"name": "b", "transform": "identity", "mean": -1.0, "std": 0.5, "clip_lo": -2.0, "clip_hi": 2.0},
    ]}
    x = np.array([[0.0, math.e - 1, 1000.0], [-5.0, 0.0, float("nan")]], dtype=np.float32).reshape(2, 1, 1, 3)
    expect = np.array([[-0.5, 0.0, 1.0], [-2.0, 2.0, 0.0]], dtype=np.float32).reshape(2, 1, 1, 3)
    norm = AuxNormalizer.from_stats(stats)
    np.testing.assert_allclose(norm.apply(x), expect, rtol=1e-6, atol=1e-6)
    tb = norm.apply(torch.from_numpy(x)[None].repeat(2, 1, 1, 1, 1))
    assert tb.shape == (2, 2, 1, 1, 3)
    np.testing.assert_allclose(tb[1].numpy(), expect, rtol=1e-6, atol=1e-6)
    # reorder by name; unknown names are an error
    assert AuxNormalizer.from_stats(stats, ["b", "a"]).mean == (-1.0, 1.0)
    with pytest.raises(InputDataError, match="not in the statistics"):
        AuxNormalizer.from_stats(stats, ["c"])
    with pytest.raises(ValueError):
        norm.apply(np.zeros((3, 1, 2, 2)))


def test_synthetic_raster_multi_file_and_histogram(make_raster, tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    a = np.where(rng.random((2, 150, 120)) < 0.3, rng.lognormal(3, 2, (2, 150, 120)), 0.0).astype(np.float32)
    a[0, :3, :3] = -9999.0
    b = np.where(rng.random((1, 25, 20)) < 0.5, rng.lognormal(1, 1, (1, 25, 20)), 0.0).astype(np.float32)
    b[0, 0, 0] = np.nan
    pa = make_raster("a.tif", a, nodata=-9999.0, descriptions=["2019", "2020"])
    pb = make_raster("b_2020.tif", b)
    st = compute_stats([pa, pb])
    both = np.concatenate([np.where(a == -9999.0, np.nan, a).ravel(), b.ravel()]).astype(np.float64)
    check_main(st["main"], independent_main_stats(both))
    assert st["main"]["n_nodata"] == 9 + 1
    assert [x["name"] for x in st["bands"]] == ["2019", "2020", "2020"]
    # histogram quantiles (forced) are within the bin resolution of the exact ones
    monkeypatch.setattr(stats_mod, "_WINDOW_CELLS", 2000)  # many windows
    hist = compute_stats([pa, pb], exact_quantile_limit=10)
    assert hist["main"]["quantile_method"] == "histogram"
    assert hist["main"]["sum"] == pytest.approx(st["main"]["sum"], rel=1e-12)
    for k in ("p5", "p50", "p99"):
        assert hist["main"]["quantiles"][k] == pytest.approx(st["main"]["quantiles"][k], rel=0.02), k


def test_save_load_roundtrip_and_errors(tmp_path: Path) -> None:
    st = {"format": "carbonsr-stats", "main": {"x": float("nan"), "n": np.int64(3)}, "aux": []}
    p = save_stats(st, tmp_path / "s.json")
    loaded = load_stats(p)
    assert loaded["main"] == {"x": None, "n": 3}
    with pytest.raises(OutputError):
        save_stats(st, p, overwrite=False)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputDataError):
        load_stats(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(InputDataError):
        load_stats(tmp_path / "other.json")
    with pytest.raises(MissingInputError):
        load_stats(tmp_path / "missing.json")


def test_cli_stats(make_raster, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = np.where(rng.random((1, 20, 20)) < 0.4, rng.lognormal(2, 1, (1, 20, 20)), 0.0).astype(np.float32)
    src = make_raster("e.tif", a)
    out = tmp_path / "stats.json"
    runner = CliRunner()
    res = runner.invoke(app, ["stats", str(src), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "log(Nz/Nnz)" in res.output and "CV log1p" in res.output
    data = json.loads(out.read_text())
    check_main(data["main"], independent_main_stats(a))
    # existing output without --overwrite, missing input, not a raster: one-line errors
    res = runner.invoke(app, ["stats", str(src), "-o", str(out)])
    assert res.exit_code == 1 and "already exists" in res.output
    res = runner.invoke(app, ["stats", str(tmp_path / "nope.tif")])
    assert res.exit_code == 1 and "file not found" in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.tif"
    bad.write_text("not a tiff")
    res = runner.invoke(app, ["stats", str(bad)])
    assert res.exit_code == 1 and "not a raster" in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
    empty = make_raster("empty.tif", np.full((1, 5, 5), -1.0, dtype=np.float32), nodata=-1.0)
    res = runner.invoke(app, ["stats", str(empty)])
    assert res.exit_code == 1 and "no valid cells" in res.output
