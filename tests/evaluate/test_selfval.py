"""Scale-shift self-validation (``carbonsr evaluate --model``) on a small sample region.

No training: the checkpoint holds an untrained, narrow ``tiny`` model. The baselines are checked
against an independent numpy computation; the model row is checked for consistency.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from carbonsr_cli.cli import app
from carbonsr_cli.errors import UsageError
from carbonsr_cli.evaluate import self_validate

runner = CliRunner()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 24 x 24 km sample region and a checkpoint of an untrained narrow tiny model."""
    import torch

    from carbonsr_cli.sample_data import generate_sample_data
    from carbonsr_cli.stats import compute_stats
    from carbonsr_cli.checkpoints import save_checkpoint
    from models.config import preset
    from models.network import DSTCarbonFormer

    root = tmp_path_factory.mktemp("selfval")
    s = generate_sample_data(root / "data", size_km=24, seed=1)
    aux = [str(p) for p in s.aux_paths]
    st = compute_stats(s.emissions, aux, aux_max_tiles=8)
    names = [a["name"] for a in st["aux"]]
    torch.manual_seed(0)
    cfg = preset("tiny", aux_channels=len(names), base_width=4, widths=(4, 4, 4, 4))
    model = DSTCarbonFormer(cfg)
    ck = root / "ck.pth"
    save_checkpoint(ck, {"model_config": cfg.to_dict(), "model_state": model.state_dict(), "aux_names": names,
                         "stats": st, "factor": 10, "years_window": 1, "train_config": {"patch": 12}})
    return {"sample": s, "aux": aux, "ck": ck}


def _main(path: Path) -> tuple[np.ndarray, Any]:
    import rasterio

    with rasterio.open(path) as ds:
        a = ds.read().astype(np.float64)
        a[a == ds.nodata] = np.nan
        return a, ds.transform


def _uniform_parent(main: np.ndarray, s: int) -> np.ndarray:
    """Independent uniform baseline at parent level: coarse s x s sums (nodata as 0) spread evenly."""
    y, h, w = main.shape
    coarse = np.nan_to_num(main).reshape(y, h // s, s, w // s, s).sum(axis=(2, 4))
    return np.repeat(np.repeat(coarse / s**2, s, axis=1), s, axis=2)


def test_baselines_match_numpy_and_ratio(small: dict[str, Any]) -> None:
    s = small["sample"]
    main, _ = _main(s.emissions)
    res = self_validate(small["ck"], s.emissions, small["aux"], scales=(4,))
    rows = {r["method"]: r for r in res.rows}
    assert set(rows) >= {"model", "uniform"} and len(rows) == 3
    valid = np.isfinite(main)
    t = main[valid]
    u = _uniform_parent(main, 4)[valid]
    nz = t > 0
    assert rows["uniform"]["cells"] == int(valid.sum())
    assert rows["uniform"]["nonzero-mae"] == pytest.approx(np.abs(u - t)[nz].mean(), rel=1e-9)
    assert rows["uniform"]["rmse"] == pytest.approx(np.sqrt(((u - t) ** 2).mean()), rel=1e-9)
    # the model is scored on the same cells, and the ratio is model / best baseline
    assert rows["model"]["cells"] == rows["uniform"]["cells"]
    assert np.isfinite(rows["model"]["nonzero-mae"])
    best = min(r["nonzero-mae"] for m, r in rows.items() if m != "model")
    assert res.ratio_to_best_baseline(4) == pytest.approx(rows["model"]["nonzero-mae"] / best)
    dasy = [m for m in rows if m.startswith("dasymetric:")][0]
    assert rows[dasy]["nonzero-mae"] == min(v["nonzero-mae"] for k, v in res.details["4"].items() if k.startswith("dasy"))


def test_region_restricts_cells(small: dict[str, Any]) -> None:
    s = small["sample"]
    main, tr = _main(s.emissions)
    # the top-left 12 x 12 km (cell centres inside)
    region = (tr.c, tr.f - 12_000.0, tr.c + 12_000.0, tr.f)
    res = self_validate(small["ck"], s.emissions, small["aux"], scales=(12,), region=region)
    want = int(np.isfinite(main[:, :12, :12]).sum())
    assert {r["cells"] for r in res.rows} == {want}
    u = _uniform_parent(main[:, :12, :12], 12)
    v = np.isfinite(main[:, :12, :12])
    t = main[:, :12, :12]
    uni = [r for r in res.rows if r["method"] == "uniform"][0]
    assert uni["rmse"] == pytest.approx(np.sqrt(((u[v] - t[v]) ** 2).mean()), rel=1e-9)


def test_bad_scale_and_cli(small: dict[str, Any]) -> None:
    s = small["sample"]
    with pytest.raises(UsageError, match="divisors"):
        self_validate(small["ck"], s.emissions, small["aux"], scales=(5,))
    args = ["evaluate", "--model", str(small["ck"]), "--main", str(s.emissions), "--scales", "12",
            "--metric", "nonzero-mae", "--json", "-"]
    for a in small["aux"]:
        args += ["--aux", a]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout[res.stdout.index("{"):])["self_validation"]
    assert data["scales"] == [12]
    assert [r["method"] for r in data["rows"]][:2] == ["model", "uniform"]
    assert "12" in data["ratio_to_best_baseline"]


def test_baselines_conserve_on_unaligned_raster(tmp_path: Path) -> None:
    """Uniform and dasymetric rows have no bias when the raster is not a multiple of the patch.

    30 x 30 parent cells: the last window of each axis is shifted back (to row/col 18), so it
    is not aligned with the 12 x 12 blocks; a region cuts blocks as well.
    """
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent / "downscale"))
    from ds_helpers import make_checkpoint, write_tif

    rng = np.random.default_rng(3)
    n, f = 30, 2
    main = rng.gamma(0.7, 50.0, size=(1, n, n)).astype(np.float32)
    aux = rng.gamma(1.0, 1.0, size=(1, n * f, n * f)).astype(np.float32)
    origin, crs = (500_000.0, 4_000_000.0), "EPSG:32633"
    mp = write_tif(tmp_path / "main.tif", main, res=1000.0, origin=origin, crs=crs)
    ap = write_tif(tmp_path / "pop.tif", aux, res=500.0, origin=origin, crs=crs)
    ck = make_checkpoint(tmp_path / "ck.pth", ["pop"], factor=f)
    regions = [None, (origin[0] + 1000.0, origin[1] - 29_000.0, origin[0] + 27_000.0, origin[1] - 3000.0)]
    for region in regions:
        res = self_validate(ck, mp, [str(ap)], scales=(2, 12), region=region, metrics=["bias"])
        assert res.scales == [2, 12]
        for r in res.rows:
            if r["method"] != "model":
                assert abs(r["bias"]) < 1e-9, (region, r)
