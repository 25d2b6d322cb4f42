"""Two CUDA GPUs under torchrun (NCCL): training follows one GPU with the same global batch, and
distributed downscaling writes the one-GPU result (issue 21).

Marked ``gpu`` (skipped by default; ``pytest -m gpu tests/distributed``) and skipped unless two
CUDA devices are visible. GPU kernels are not bitwise reproducible (reduction order, cuDNN
algorithms), so the comparisons allow float rounding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "train"))
sys.path.insert(0, str(Path(__file__).parent.parent / "downscale"))
from dist_helpers import run_spec  # noqa: E402
from helpers import small_config  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

#: As the CPU test (tests/distributed/test_distributed_train.py), on the GPUs in float32, the
#: U-Net not compiled; the loop's CUDA path (pinned float16 batches, deferred loss checks) runs.
CHANGES = dict(batch_size=4, moe_weight=0.0, epochs=2, steps_per_epoch=3, autosave_every=3, workers=1,
               device="cuda", precision="fp32", compile="off", threads=None)
RTOL = 2e-3


def test_two_gpus_follow_one_gpu(sample_dir: Path, tmp_path: Path) -> None:
    from carbonsr_cli.train.loop import train

    single = train(small_config(sample_dir, tmp_path / "runs1", name="single", **CHANGES))
    res = run_spec("train", {"sample": str(sample_dir), "runs": str(tmp_path / "runs2"), "changes": dict(CHANGES, name="nccl")},
                   tmp_path / "train.json")
    assert res["world_size"] == 2 and res["global_step"] == single.global_step == 6
    for hs, hd in zip(single.history, res["history"]):
        assert hd["val_score"] == pytest.approx(hs["val_score"], rel=RTOL)
        assert hd["train_loss"] == pytest.approx(hs["train_loss"], rel=RTOL)


def _region(tmp_path: Path, rows: int, cols: int, seed: int) -> tuple[Path, Path, Path]:
    """A projected 1 km main raster, one 100 m aux layer and an untrained tiny checkpoint."""
    from ds_helpers import make_checkpoint, synthetic_totals, write_tif

    origin = (500_000.0, 5_000_000.0)
    main = write_tif(tmp_path / "main.tif", synthetic_totals(rows, cols, 1, seed=seed), res=1000.0, origin=origin,
                     crs="EPSG:32633", descriptions=["2019"])
    aux = tmp_path / "aux"
    aux.mkdir()
    yy, xx = np.mgrid[0 : rows * 10, 0 : cols * 10]
    write_tif(aux / "built.tif", 10 + 5 * np.sin(xx / 9.0) * np.cos(yy / 13.0), res=100.0, origin=origin,
              crs="EPSG:32633", nodata=None)
    return main, aux, make_checkpoint(tmp_path / "tiny.pth", ["built"])


def _assert_close(one: Path, two: Path) -> None:
    import rasterio

    with rasterio.open(one) as a, rasterio.open(two) as b:
        x, y = a.read(1), b.read(1)
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6 * float(np.nanmax(np.abs(x))))


def test_two_gpus_downscale_like_one(tmp_path: Path) -> None:
    from carbonsr_cli.downscale import downscale

    main, aux, ckpt = _region(tmp_path, 192, 8, seed=4)
    job = dict(main_path=str(main), aux_paths=[str(aux)], device="cuda", checkpoint=str(ckpt), dst=str(tmp_path / "two.tif"))
    res = run_spec("downscale", {"jobs": [job]}, tmp_path / "ds.json")
    assert res["world_size"] == 2 and res[job["dst"]]["ok"]
    one = downscale(progress=False, **dict(job, dst=str(tmp_path / "one.tif")))
    assert one.conservation.ok
    _assert_close(tmp_path / "one.tif", tmp_path / "two.tif")


def test_two_gpus_in_one_process_downscale_like_one(tmp_path: Path) -> None:
    """``--device cuda:0,cuda:1``: the model's copy on the second GPU takes every second batch;
    the file equals the one-GPU file within rounding and conserves every block."""
    from carbonsr_cli.downscale import downscale

    main, aux, ckpt = _region(tmp_path, 96, 40, seed=5)
    kw = dict(main_path=str(main), aux_paths=[str(aux)], checkpoint=str(ckpt), batch_size=16, progress=False)
    one = downscale(dst=str(tmp_path / "one.tif"), device="cuda:0", **kw)
    two = downscale(dst=str(tmp_path / "two.tif"), device="cuda:0,cuda:1", **kw)
    assert one.conservation.ok and two.conservation.ok
    assert two.device == "cuda:0,cuda:1" and two.tiles == one.tiles
    _assert_close(tmp_path / "one.tif", tmp_path / "two.tif")
