"""Training under torchrun with 2 CPU ranks (gloo) equals one process with the same global batch."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "train"))
from dist_helpers import run_spec  # noqa: E402
from helpers import small_config  # noqa: E402

from carbonsr_cli.distributed import DistContext, share_bounds  # noqa: E402
from carbonsr_cli import checkpoints as ck  # noqa: E402

#: Relative tolerance on validation metrics and weights (float rounding of the gradient sums
#: over differently split batches; measured differences are ~1e-7).
RTOL = 1e-5

#: One epoch of 3 steps, then a second epoch; global batch 4 (2 patches per rank). The MoE
#: balancing term is computed per rank share (not on the global batch), so it is switched off
#: here to test exact equivalence; with it the runs differ by that term's gradient.
CHANGES = dict(batch_size=4, threads=1, moe_weight=0.0, epochs=2, steps_per_epoch=3, autosave_every=3, workers=0,
               val_batch_size=2)  # several validation batches: the ranks score shares of them


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in ck.load_checkpoint(path)["model_state"].items()}


def _predict(path: Path | None, config_from: Path | None = None) -> np.ndarray:
    """Raw model output on a fixed random input; ``path=None``: the seed-0 initial weights."""
    from models.config import ModelConfig
    from models.network import DSTCarbonFormer

    ckpt = ck.load_checkpoint(path if path is not None else config_from)
    torch.manual_seed(0)
    model = DSTCarbonFormer(ModelConfig.from_dict(ckpt["model_config"]))
    if path is not None:
        model.load_state_dict(ckpt["model_state"])
    model.eval()
    g = torch.Generator().manual_seed(1)
    c = int(ckpt["model_config"]["aux_channels"])
    with torch.no_grad():
        raw, _ = model(torch.randn(2, c, 1, 60, 60, generator=g), torch.rand(2, 1, 1, 60, 60, generator=g) * 3)
    return raw.double().numpy()


def test_share_bounds_cover_batch_in_order() -> None:
    for n in range(1, 9):
        for world in (1, 2, 3):
            idx = [i for r in range(world) for i in range(*share_bounds(n, r, world))]
            assert idx == list(range(n))
    assert DistContext().shard_spec("unchanged") == "unchanged"  # one process: no-op


@pytest.fixture(scope="module")
def single_run(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The single-process reference run (one CPU thread, like each rank)."""
    from carbonsr_cli.train.loop import train

    old = torch.get_num_threads()
    try:
        return train(small_config(sample_dir, tmp_path_factory.mktemp("runs1"), name="single", **CHANGES))
    finally:
        torch.set_num_threads(old)


def _assert_same_history(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) == 2
    for hs, hd in zip(want, got):
        assert hd["val_score"] == pytest.approx(hs["val_score"], rel=RTOL)
        for key, v in hs.items():
            if key.startswith("s") and "_model_" in key:
                assert hd[key] == pytest.approx(v, rel=RTOL), key


def test_two_ranks_match_single_process(sample_dir: Path, single_run, tmp_path: Path) -> None:
    single = single_run
    res = run_spec("train", {"sample": str(sample_dir), "runs": str(tmp_path / "runs"), "changes": dict(CHANGES, name="ddp")}, tmp_path / "train.json")
    assert res["world_size"] == 2 and res["global_step"] == single.global_step == 6
    ddp_dir = Path(res["run_dir"])
    _assert_same_history(res["history"], single.history)
    for hs, hd in zip(single.history, res["history"]):
        assert hd["train_loss"] == pytest.approx(hs["train_loss"], rel=RTOL)
    ws, wd = _weights(single.run_dir / "latest.pth"), _weights(ddp_dir / "latest.pth")
    assert ws.keys() == wd.keys()
    # Convolution / linear weights agree elementwise. Biases are compared through the model
    # output only: many sit before a normalisation, have an exactly zero gradient, and Adam
    # turns the rounding noise of that zero into +-lr steps that do not change the output.
    for k in ws:
        if ws[k].ndim > 1:
            scale = max(float(np.abs(ws[k]).max()), 1e-3)
            np.testing.assert_allclose(wd[k], ws[k], rtol=0, atol=RTOL * scale, err_msg=k)
    out_s, out_d, out_0 = (_predict(single.run_dir / "latest.pth"), _predict(ddp_dir / "latest.pth"), _predict(None, single.run_dir / "latest.pth"))
    np.testing.assert_allclose(out_d, out_s, rtol=RTOL, atol=RTOL * float(np.abs(out_s).max()))
    assert float(np.abs(out_s - out_0).max()) > 100 * RTOL * float(np.abs(out_s).max()), "training did not change the model"
    # rank 0 alone wrote the run files: no per-rank copies, no temporaries
    names = {p.name for p in ddp_dir.iterdir()}
    assert {"latest.pth", "best_model.pth", "metrics.csv", "train.log", "config.json", "stats.json", "split.json"} <= names
    assert not [n for n in names if "rank" in n or n.endswith(".tmp")], names
    ck_ddp = ck.load_checkpoint(ddp_dir / "latest.pth")
    assert ck_ddp["global_step"] == 6 and ck_ddp["train_config"]["batch_size"] == 4


@pytest.mark.slow  # about 18 s on 2 cores (the directory's default tests take about 40 s)
def test_resume_single_process_run_on_two_ranks(sample_dir: Path, single_run, tmp_path: Path) -> None:
    """A run stopped after 4 of 6 steps in one process, resumed on 2 ranks, ends like the uninterrupted one."""
    from carbonsr_cli.train.loop import train

    old = torch.get_num_threads()
    try:
        part = train(small_config(sample_dir, tmp_path / "runs", name="r", max_steps=4, **CHANGES))
    finally:
        torch.set_num_threads(old)
    assert part.stopped == "max_steps" and part.global_step == 4
    changes = dict(CHANGES, name="r", resume="latest")
    res = run_spec("train", {"sample": str(sample_dir), "runs": str(tmp_path / "runs"), "changes": changes}, tmp_path / "resume.json")
    assert res["global_step"] == 6 and Path(res["run_dir"]) == part.run_dir
    _assert_same_history(res["history"], single_run.history)
    out_s, out_d = _predict(single_run.run_dir / "latest.pth"), _predict(part.run_dir / "latest.pth")
    np.testing.assert_allclose(out_d, out_s, rtol=RTOL, atol=RTOL * float(np.abs(out_s).max()))


@pytest.mark.slow  # about 8 s on 2 cores; the schedule itself is unit-tested (tests/train/test_step_layout.py)
def test_ranks_stop_together_at_the_next_agreement(sample_dir: Path, tmp_path: Path) -> None:
    """``max_time`` is seen after the first step on both ranks; they stop together at the next
    agreement (here the epoch's last step, before HALT_AGREE_EVERY), not after the step where
    each saw it (the old per-step agreement stopped at step 1)."""
    from carbonsr_cli.distributed import HALT_AGREE_EVERY

    assert HALT_AGREE_EVERY > 6
    changes = dict(CHANGES, name="halt", batch_size=2, epochs=2, steps_per_epoch=6, max_time_s=1e-6)
    res = run_spec("train", {"sample": str(sample_dir), "runs": str(tmp_path / "runs"), "changes": changes}, tmp_path / "t.json")
    assert res["world_size"] == 2 and res["stopped"] == "max_time"
    assert res["global_step"] == 6
