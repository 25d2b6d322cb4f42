"""Issue 18 item 11c: a run cut by --max-time says so in a plain sentence (steps done of planned, how to go on)."""

from __future__ import annotations

import json

import sys
from pathlib import Path

from cli_run import run_cli

from carbonsr_cli.checkpoints import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from helpers import small_config  # noqa: E402


def test_max_time_stop_is_explained(sample_dir: Path, tmp_path: Path) -> None:
    from carbonsr_cli.train.loop import train

    first = train(small_config(sample_dir, tmp_path, name="r", epochs=1))  # 3 steps, a tiny model
    proc = run_cli("train", sample_dir / "emissions_1km.tif", "--resume", first.run_dir / "latest.pth",
                   "--epochs", "1000", "--max-time", "1", "--device", "cpu", "-q", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "(max_time," in text
    steps = int(text.split("Stopped by --max-time after ", 1)[1].split(" ", 1)[0])
    assert 3 < steps < 3000
    assert f"after {steps} of 3000 steps; the learning-rate schedule was not finished; " \
           f"continue with `carbonsr resume {first.run_dir}` or give more time." in text


def test_seeds_train_one_run_per_seed_and_report_the_spread(sample_dir: Path, tmp_path: Path) -> None:
    proc = run_cli("train", sample_dir / "emissions_1km.tif", "--aux", sample_dir / "aux", "--preset", "prior",
                   "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--seed", "4", "--seeds", "2",
                   "--split-seed", "7", "--fit-buffer", "2", "--name", "multi", "--runs-dir", tmp_path / "runs", "--device", "cpu", "-q",
                   cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert (tmp_path / "runs" / "multi-seed4" / "best_model.pth").exists()
    assert (tmp_path / "runs" / "multi-seed5" / "best_model.pth").exists()
    splits = [json.loads((tmp_path / "runs" / f"multi-seed{k}" / "split.json").read_text()) for k in (4, 5)]
    assert splits[0]["seed"] == splits[1]["seed"] == 7  # --split-seed: both runs hold out the same blocks
    assert splits[0]["val_windows"] == splits[1]["val_windows"]
    assert json.loads((tmp_path / "runs" / "multi-seed4" / "config.json").read_text())["train_config"]["fit_buffer"] == 2
    chosen = load_checkpoint(tmp_path / "runs" / "multi-seed5" / "best_model.pth")["selection"]
    assert f"`carbonsr downscale --method auto` will use {chosen['method']}: " in text  # what auto uses, and why
    lines = [ln for ln in text.split("seed ")[1:] if ln.startswith(("4:", "5:"))]
    assert len(lines) == 2 and all("best validation score" in ln for ln in lines), text
    assert "Spread over 2 seeds: " in text and "(max - min) / mean = " in text


def test_seeds_refuse_resume(sample_dir: Path, tmp_path: Path) -> None:
    proc = run_cli("train", sample_dir / "emissions_1km.tif", "--aux", sample_dir / "aux", "--seeds", "2",
                   "--resume", "latest", "--device", "cpu", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "--seeds starts new runs" in proc.stderr + proc.stdout
