"""The model path's planning reads its checkpoint once, hashes it in the background and takes
the loaded weights without copying them, with the same model as before."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from carbonsr_cli import checkpoints
from carbonsr_cli.downscale import downscale


def test_prefetched_hash_is_the_files_hash(tmp_path: Path) -> None:
    f = tmp_path / "c.pth"
    f.write_bytes(os.urandom(3 << 20))
    key = str(f.resolve())
    checkpoints.prefetch_sha256(f)
    assert key in checkpoints._SHA_STARTED
    assert checkpoints.file_sha256(f) == checkpoints._hash_file(f)
    assert key not in checkpoints._SHA_STARTED  # taken
    checkpoints.prefetch_sha256(f)
    time.sleep(0.05)
    f.write_bytes(os.urandom(1 << 20))  # changed after the prefetch: hashed again
    assert checkpoints.file_sha256(f) == checkpoints._hash_file(f)
    missing = tmp_path / "missing.pth"
    checkpoints.prefetch_sha256(missing)  # nothing to hash: no error, nothing kept
    assert str(missing.resolve()) not in checkpoints._SHA_STARTED


def test_weights_taken_without_copy_give_the_same_model(small_ckpt: Path) -> None:
    from models.config import ModelConfig
    from models.network import DSTCarbonFormer

    loaded = checkpoints.load_model_for_inference(small_ckpt, "cpu")
    ckpt = checkpoints.load_checkpoint(small_ckpt)
    ref = DSTCarbonFormer(ModelConfig.from_dict(ckpt["model_config"])).eval()
    ref.load_state_dict(ckpt["model_state"], strict=True)  # the copying load
    for (k, a), (_, b) in zip(loaded.model.state_dict().items(), ref.state_dict().items()):
        assert a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b), k
    c = len(loaded.aux_names)
    g = torch.Generator().manual_seed(0)
    aux, main = torch.rand(2, c, 1, 40, 40, generator=g), torch.rand(2, 1, 1, 40, 40, generator=g)
    with torch.inference_mode():
        assert torch.equal(loaded.model(aux, main)[0], ref(aux, main)[0])
    # requires_grad as a copying load leaves it (the model's, not the file's)
    assert [p.requires_grad for p in loaded.model.parameters()] == [p.requires_grad for p in ref.parameters()]


def test_weights_of_another_dtype_are_copied(small_ckpt: Path) -> None:
    ckpt = checkpoints.load_checkpoint(small_ckpt)
    ckpt["model_state"] = {k: v.double() if v.is_floating_point() else v for k, v in ckpt["model_state"].items()}
    loaded = checkpoints.load_model_for_inference(small_ckpt, "cpu", checkpoint=ckpt)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


def test_a_model_run_reads_its_checkpoint_once(small_region: dict, small_ckpt: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = torch.load

    def counting(*a, **k):  # noqa: ANN002, ANN003, ANN202
        calls.append(a[0] if a else k.get("f"))
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", counting)
    s = downscale(small_region["main"], [small_region["aux"]], tmp_path / "m.tif", checkpoint=small_ckpt,
                  device="cpu", progress=False)
    assert len(calls) == 1 and s.model_sha256 == checkpoints._hash_file(small_ckpt)
