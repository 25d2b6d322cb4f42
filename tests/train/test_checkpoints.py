"""Checkpoint files: atomic writes, safe loading, compatibility checks, RNG state."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from carbonsr_cli.errors import CheckpointError
from carbonsr_cli import checkpoints as ck


def _payload(value: float = 1.0) -> dict:
    return {
        "model_config": {"preset": "tiny", "width": 8},
        "model_state": {"w": torch.full((3, 3), value), "b": torch.arange(3)},
        "aux_names": ["lights_500m", "population_100m"],
        "stats": {"main": {"n_zero": 3, "n_nonzero": 5}, "aux": []},
        "factor": 10,
        "years_window": 1,
        "train_config": {"runs_dir": Path("runs"), "scales": (12, 4)},
        "epoch": 2,
        "step": 5,
        "global_step": 25,
        "rng_state": ck.capture_rng_state(),
        "metric_history": [{"epoch": 1, "val_nonzero_mae": np.float32(1.5)}],
    }


def test_roundtrip_weights_only(tmp_path: Path) -> None:
    dest = tmp_path / "a.pth"
    ck.save_checkpoint(dest, _payload(2.0))
    raw = torch.load(dest, weights_only=True, map_location="cpu")
    assert raw["format"] == ck.FORMAT and raw["format_version"] == ck.FORMAT_VERSION
    got = ck.load_checkpoint(dest)
    assert torch.equal(got["model_state"]["w"], torch.full((3, 3), 2.0))
    assert got["train_config"] == {"runs_dir": "runs", "scales": [12, 4]}
    assert got["metric_history"][0]["val_nonzero_mae"] == pytest.approx(1.5)
    assert not [p for p in tmp_path.iterdir() if p.name != "a.pth"], "temporary file left behind"


def test_refuses_pickled_code_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: D105
            return (Path.touch, (marker,))

    bad = tmp_path / "evil.pth"
    torch.save({"format": ck.FORMAT, "x": Evil()}, bad)
    with pytest.raises(CheckpointError, match="evil.pth") as info:
        ck.load_checkpoint(bad)
    assert "not a carbonsr checkpoint" in info.value.message
    assert not marker.exists(), "loading executed pickled code"
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        ck.load_checkpoint(plain)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, match",
    [
        (b"hello, I am a text file\n", "not a readable checkpoint"),
        (b"", "not a readable checkpoint"),
    ],
)
def test_refuses_non_torch_files(tmp_path: Path, content: bytes, match: str) -> None:
    f = tmp_path / "x.pth"
    f.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        ck.load_checkpoint(f)


def test_refuses_state_dict_truncated_and_missing(tmp_path: Path) -> None:
    sd = tmp_path / "sd.pth"
    torch.save({"w": torch.zeros(2)}, sd)
    with pytest.raises(CheckpointError, match="plain state_dict"):
        ck.load_checkpoint(sd)
    good = tmp_path / "good.pth"
    ck.save_checkpoint(good, _payload())
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="trunc.pth"):
        ck.load_checkpoint(trunc)
    with pytest.raises(CheckpointError, match="not found"):
        ck.load_checkpoint(tmp_path / "nope.pth")
    newer = tmp_path / "newer.pth"
    ck.save_checkpoint(newer, {**_payload(), "format_version": ck.FORMAT_VERSION + 1})
    with pytest.raises(CheckpointError, match="newer"):
        ck.load_checkpoint(newer)


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_interrupted_write_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str) -> None:
    dest = tmp_path / "autosave_latest.pth"
    ck.save_checkpoint(dest, _payload(1.0))

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash")

    if fail_at == "write":
        real_save = torch.save

        def half_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            f.seek(f.tell() // 2)
            f.truncate()
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(torch, "save", half_save)
    elif fail_at == "fsync":
        monkeypatch.setattr(os, "fsync", boom)
    else:
        monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError if fail_at == "write" else KeyboardInterrupt):  # the error each failure raises
        ck.save_checkpoint(dest, _payload(7.0))
    monkeypatch.undo()
    got = ck.load_checkpoint(dest)
    assert torch.equal(got["model_state"]["w"], torch.full((3, 3), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["autosave_latest.pth"]


def test_check_compatible_lists_differences(tmp_path: Path) -> None:
    ckpt = _payload()
    ck.check_compatible(ckpt, tmp_path / "c.pth", aux_names=["lights_500m", "population_100m"], factor=10, years_window=1)
    with pytest.raises(CheckpointError) as info:
        ck.check_compatible(ckpt, tmp_path / "c.pth", aux_names=["lights_500m", "roads:length"], years_window=3)
    msg = info.value.message
    assert "population_100m" in msg and "roads:length" in msg and "years_window" in msg
    with pytest.raises(CheckpointError, match="different order"):
        ck.check_compatible(ckpt, tmp_path / "c.pth", aux_names=["population_100m", "lights_500m"])
    with pytest.raises(CheckpointError, match="width"):
        ck.check_compatible(ckpt, tmp_path / "c.pth", model_config={"preset": "tiny", "width": 16})


def test_rng_state_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    dest = tmp_path / "rng.pth"
    ck.save_checkpoint(dest, {**_payload(), "rng_state": ck.capture_rng_state()})
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ck.restore_rng_state(ck.load_checkpoint(dest)["rng_state"])
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]
