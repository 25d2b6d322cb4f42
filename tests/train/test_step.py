"""The training step's helpers (issue 20): float16 batches, deferred loss checks, compile choice,
throughput meter, and the CUDA-only speed paths of the network (checked here on CPU tensors)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from carbonsr_cli.distributed import DistContext
from carbonsr_cli.errors import UsageError
from carbonsr_cli.train.dataset import AuxCache, BatchSpec, MainData, build_batch
from carbonsr_cli.train.step import COMPILE_MIN_STEPS, LossTracker, Throughput, compile_wanted


def _data(years: int = 3, h: int = 12, w: int = 12, c: int = 4) -> tuple[MainData, AuxCache]:
    rng = np.random.default_rng(0)
    values = rng.gamma(1.0, 5.0, size=(years, h, w)).astype(np.float32)
    values[0, 2, 3] = np.nan
    main = MainData(grid=None, years=[str(2018 + k) for k in range(years)], values=values, paths=[])
    aux = AuxCache(rng.normal(size=(c, years, h * 10, w * 10)).astype(np.float16), [f"a{k}" for k in range(c)])
    return main, aux


def test_float16_batch_holds_the_same_values() -> None:
    main, aux = _data()
    spec = BatchSpec(scale=3, rows=(0, 6, 3), cols=(6, 0, 3), year0=(0, 1, 0), rot=(0, 1, 3), flip=(True, False, True))
    kw = dict(factor=10, patch=6, years_window=2)
    ref = build_batch(spec, main, aux, **kw)
    half = build_batch(spec, main, aux, aux_dtype=np.float16, **kw)
    assert ref.aux.dtype == np.float32 and half.aux.dtype == np.float16
    assert np.array_equal(half.aux.astype(np.float32), ref.aux)
    for name in ("main", "totals", "truth", "mask"):
        assert np.array_equal(getattr(half, name), getattr(ref, name)), name


def test_loss_tracker_defers_and_names_the_diverged_step() -> None:
    ctx = DistContext()
    tr = LossTracker(ctx, lr=1e-3, every=3)
    tr.add(torch.tensor(1.0, dtype=torch.float64), 0, 1)
    tr.add(torch.tensor(2.0, dtype=torch.float64), 0, 2)
    assert tr.values == []  # not copied to the host yet
    tr.add(torch.tensor(3.0, dtype=torch.float64), 0, 3)
    assert tr.take() == [1.0, 2.0, 3.0]
    tr.add(0.5, 1, 1)  # floats (CPU steps) are checked at once
    assert tr.take() == [0.5]
    tr.add(torch.tensor(4.0), 1, 2)
    tr.add(torch.tensor(float("nan")), 1, 3)
    with pytest.raises(UsageError, match="diverged .* at epoch 1 step 3"):
        tr.flush()


def test_compile_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARBONSR_COMPILE", raising=False)
    unet = SimpleNamespace(enc_blocks=[])
    prior_only = SimpleNamespace()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compile_wanted("auto", cuda, unet, COMPILE_MIN_STEPS)
    assert not compile_wanted("auto", cuda, unet, COMPILE_MIN_STEPS - 1)
    assert not compile_wanted("auto", cpu, unet, 10**6)
    assert not compile_wanted("on", cuda, prior_only, 10**6)  # no U-Net to compile
    assert compile_wanted("on", cpu, unet, 1)
    monkeypatch.setenv("CARBONSR_COMPILE", "0")
    assert not compile_wanted("on", cuda, unet, 10**6)
    monkeypatch.setenv("CARBONSR_COMPILE", "1")
    assert compile_wanted("off", cpu, unet, 1)


def test_throughput_meter_skips_warmup_and_pauses() -> None:
    m = Throughput(torch.device("cpu"), global_batch=8, warmup=2)
    for _ in range(5):
        time.sleep(0.002)  # a step: 2 ms, of which 1 ms "waiting for a batch"
        m.waited(0.001)
        m.after_step()
    m.pause()
    r = m.result()
    assert r is not None and r["steps"] == 3 and r["global_batch"] == 8 and r["patches_per_s"] > 0
    assert 0 <= r["data_wait_share"] <= 1
    assert Throughput(torch.device("cpu"), 8).result() is None


def test_cuda_speed_paths_equal_the_cpu_operators() -> None:
    """The CUDA-only replacements (temporal depthwise conv, block means) compute the same values."""
    import torch.nn.functional as F

    from models.blocks import _temporal_shifted
    from models.network import block_mean

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(6, 6, (3, 1, 1), padding=(1, 0, 0), groups=6)
    h = torch.randn(2, 6, 3, 8, 8)
    torch.testing.assert_close(_temporal_shifted(conv, h), conv(h), rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = _temporal_shifted(conv, h), conv(h)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    x = torch.randn(2, 3, 2, 40, 40)
    for block in (10, 20, 40):
        y = x.reshape(2, 3, 2, 40 // block, block, 40 // block, block).mean(dim=(-3, -1), keepdim=True)
        y = y.expand(2, 3, 2, 40 // block, block, 40 // block, block).reshape(x.shape)
        torch.testing.assert_close(y, block_mean(x, block), rtol=1e-5, atol=1e-6)
    assert F is not None


def test_compiled_unet_is_used_for_training_forwards_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from carbonsr_cli.train.step import CompiledUNet
    from models.config import preset
    from models.network import DSTCarbonFormer

    calls: list[str] = []

    def fake_compile(fn, **kw):  # noqa: ANN001, ANN202 - stands in for torch.compile
        def compiled(*a, **k):  # noqa: ANN002, ANN003, ANN202
            calls.append("compiled")
            return fn(*a, **k)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    torch.manual_seed(0)
    model = DSTCarbonFormer(preset("tiny", aux_channels=2, widths=(8, 8), depths=(1, 1), n_experts=2, attn_heads=2))
    aux, main = torch.randn(1, 2, 1, 16, 16), torch.rand(1, 1, 1, 16, 16)
    ref = model(aux, main, context_block=8)[0].detach()
    unet = CompiledUNet(model)
    out = model(aux, main, context_block=8)[0]
    assert calls == ["compiled"] and torch.equal(out.detach(), ref)
    with torch.no_grad():
        model(aux, main, context_block=8)
    assert calls == ["compiled"]  # validation (no_grad) stays eager
    unet.failed(RuntimeError("no compiler"))
    model(aux, main, context_block=8)
    assert calls == ["compiled"]
    unet.remove()
    assert "_features" not in model.__dict__ and set(model.state_dict()) == set(DSTCarbonFormer(model.config).state_dict())
