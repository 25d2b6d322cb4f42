"""Exact continuation: a run killed mid-epoch and resumed ends with bitwise the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import small_config  # noqa: E402

from carbonsr_cli import checkpoints as ck  # noqa: E402

_CHILD = """
import json, sys
from carbonsr_cli.train.config import TrainConfig
from carbonsr_cli.train.loop import train
train(TrainConfig.from_dict(json.loads(sys.argv[1])))
"""

#: The child for the SIGKILL test: once ``autosave_step_<N>.pth`` is completely written, it writes
#: ``PAUSED`` next to it and blocks, so the kill always lands mid-run (never after the run finished).
_CHILD_PAUSING = """
import json, sys, time
from pathlib import Path
from carbonsr_cli import checkpoints
from carbonsr_cli.train.config import TrainConfig
from carbonsr_cli.train.loop import train
pause_at = sys.argv[2]
save = checkpoints.save_checkpoint
def save_then_pause(path, payload):
    save(path, payload)
    if Path(path).name == pause_at:
        (Path(path).parent / "PAUSED").write_text("paused")
        time.sleep(3600)
checkpoints.save_checkpoint = save_then_pause
train(TrainConfig.from_dict(json.loads(sys.argv[1])))
"""


def _spawn(cfg, pause_at: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", _CHILD_PAUSING, json.dumps(cfg.to_dict()), pause_at], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            pytest.fail(f"training process ended (rc {proc.returncode}) before {path.name} appeared:\n{out[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.02)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return ck.load_checkpoint(path)["model_state"]


def test_sigkill_then_resume_is_bitwise_identical(sample_dir: Path, tmp_path: Path) -> None:
    from carbonsr_cli.train.loop import train

    common = dict(epochs=2, steps_per_epoch=4, autosave_every=2, max_val_windows=2)
    full = train(small_config(sample_dir, tmp_path, name="full", **common))
    assert full.stopped == "completed" and full.global_step == 8
    common["stats"] = str(full.run_dir / "stats.json")  # same statistics, computed once

    killed_cfg = small_config(sample_dir, tmp_path, name="killed", **common)
    proc = _spawn(killed_cfg, pause_at="autosave_step_6.pth")
    run = tmp_path / "killed"
    _wait_for(run / "PAUSED", proc)  # mid-epoch 2 (global steps 5..8): the child blocks right after step 6's autosave
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert ck.load_checkpoint(run / "autosave_step_6.pth")["global_step"] == 6
    assert not (run / "latest.pth").exists() or ck.load_checkpoint(run / "latest.pth")["global_step"] < 8

    resumed = train(small_config(sample_dir, tmp_path, name="killed", resume="latest", **common))
    assert resumed.stopped == "completed" and resumed.global_step == 8
    a, b = _weights(full.run_dir / "latest.pth"), _weights(run / "latest.pth")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # the optimiser state and metric history continue exactly too
    fa, fb = ck.load_checkpoint(full.run_dir / "latest.pth"), ck.load_checkpoint(run / "latest.pth")
    for k, v in fa["optimizer_state"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], fb["optimizer_state"]["state"][k]["exp_avg_sq"])
    assert [h["val_score"] for h in fa["metric_history"]] == [h["val_score"] for h in fb["metric_history"]]


def test_sigint_saves_autosave_and_raises_keyboardinterrupt(sample_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C: the step in progress finishes, autosave_latest.pth is written, KeyboardInterrupt propagates
    (the CLI maps it to exit code 130)."""
    cfg = small_config(sample_dir, tmp_path, name="ctrlc", epochs=50, steps_per_epoch=1000, autosave_every=1000,
                       max_val_windows=1)
    script = _CHILD.replace("train(TrainConfig", "try:\n    train(TrainConfig") + (
        "except KeyboardInterrupt:\n    print('KeyboardInterrupt raised'); sys.exit(130)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(cfg.to_dict())], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for(tmp_path / "ctrlc" / "config.json", proc)  # setup done, training starts
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    text = out.decode(errors="replace")
    assert proc.returncode == 130, text[-2000:]
    assert "KeyboardInterrupt raised" in text and "carbonsr resume" in text
    saved = ck.load_checkpoint(tmp_path / "ctrlc" / "autosave_latest.pth")
    assert saved["global_step"] >= 1 and saved["epoch"] == 0 and saved["step"] == saved["global_step"]


def test_a_run_from_before_fit_buffer_resumes_with_its_own_fit_area(tmp_path: Path) -> None:
    """Checkpoints written before ``fit_buffer`` existed fitted their layer mix outside the split's
    buffer; a resume refits the mix, so it must keep that area (None), not the new default (0)."""
    from carbonsr_cli.train.config import TrainConfig
    from carbonsr_cli.train.loop import _merge_resume_config

    cfg = TrainConfig(main=["m.tif"], aux=["a.tif"])
    old = {k: v for k, v in cfg.to_dict().items() if k != "fit_buffer"}
    path = tmp_path / "runs" / "r" / "latest.pth"
    assert _merge_resume_config(cfg, {"train_config": old}, path).fit_buffer is None
    assert _merge_resume_config(cfg, {"train_config": {**old, "fit_buffer": 3}}, path).fit_buffer == 3
    assert _merge_resume_config(cfg, {"train_config": cfg.to_dict()}, path).fit_buffer == 0
