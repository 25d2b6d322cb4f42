"""``--categorical NAME``: a uint8 land-cover raster without a name hint is read as classes.

Without the option ``lc.tif`` is one continuous layer ``lc``; with it, one cover-fraction
layer per class (``lc:class1`` ...). A checkpoint trained with it records the setting, and
``downscale --model`` uses it when the option is not repeated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raster_files import write_north_up

ROOT = Path(__file__).resolve().parents[2]
ORIGIN = (500_000.0, 4_000_000.0)


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    """A 12 x 12 km main raster and a 500 m uint8 land cover ``lc.tif`` (classes 1..3)."""
    rng = np.random.default_rng(0)
    main = rng.gamma(0.7, 50.0, size=(1, 12, 12)).astype(np.float32)
    lc = rng.integers(1, 4, size=(24, 24)).astype(np.uint8)
    mp = write_north_up(tmp_path / "main.tif", main, res=1000.0)
    lp = write_north_up(tmp_path / "lc.tif", lc, res=500.0, nodata=None, dtype="uint8")
    return {"main": mp, "lc": lp}


def _stats_names(files: dict[str, Path], *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "carbonsr_cli.cli", "stats", str(files["main"]), "--aux", str(files["lc"]),
           "--factor", "2", *extra, "-o", "-"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    return [a["name"] for a in json.loads(res.stdout)["aux"]]


def test_stats_layer_names(files: dict[str, Path]) -> None:
    assert _stats_names(files) == ["lc"]
    assert _stats_names(files, "--categorical", "lc") == ["lc:class1", "lc:class2", "lc:class3"]
    assert _stats_names(files, "--categorical", "lc.tif") == ["lc:class1", "lc:class2", "lc:class3"]


def test_downscale_uses_checkpoint_setting(files: dict[str, Path], tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent.parent / "downscale"))
    from ds_helpers import make_checkpoint

    from carbonsr_cli.downscale import downscale
    from carbonsr_cli.errors import CheckpointError
    from carbonsr_cli.checkpoints import load_checkpoint, save_checkpoint

    names = ["lc:class1", "lc:class2", "lc:class3"]
    plain = make_checkpoint(tmp_path / "plain.pth", names, factor=2)
    # without the setting the raster gives one layer "lc": the model refuses it
    with pytest.raises(CheckpointError):
        downscale(files["main"], [files["lc"]], tmp_path / "a.tif", checkpoint=plain, device="cpu", progress=False)
    # given on the command line
    downscale(files["main"], [files["lc"]], tmp_path / "b.tif", checkpoint=plain, device="cpu", progress=False,
              categorical=["lc"])
    # recorded in the checkpoint (train_config.categorical), not repeated
    ck = load_checkpoint(plain)
    ck["train_config"] = {"patch": 12, "categorical": ["lc"]}
    trained = save_checkpoint(tmp_path / "trained.pth", ck) or tmp_path / "trained.pth"
    s = downscale(files["main"], [files["lc"]], tmp_path / "c.tif", checkpoint=trained, device="cpu", progress=False)
    assert Path(s.output).exists()
    # self-validation: the same rule (option, else the checkpoint's setting)
    from carbonsr_cli.evaluate import self_validate

    with pytest.raises(CheckpointError):
        self_validate(plain, files["main"], [str(files["lc"])], scales=(12,))
    for ckp, cat in ((plain, ["lc"]), (trained, None)):
        res = self_validate(ckp, files["main"], [str(files["lc"])], scales=(12,), categorical=cat)
        assert {r["method"] for r in res.rows} >= {"model", "uniform"}


def test_train_config_records_categorical() -> None:
    from carbonsr_cli.train.config import TrainConfig

    cfg = TrainConfig(main=["m.tif"], aux=["lc.tif"], categorical=["lc"])
    assert TrainConfig.from_dict(cfg.to_dict()).categorical == ["lc"]
