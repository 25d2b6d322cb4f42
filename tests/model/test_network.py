"""Tests for models.network.DSTCarbonFormer: shapes, padding, ablations, physics, numerics."""

from __future__ import annotations

import math

import pytest
import torch

from models.config import ModelConfig, preset
from models.network import DSTCarbonFormer, count_parameters
from models.physics import block_sum

C_AUX = 3


def _inputs(b: int, t: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    aux = torch.randn(b, C_AUX, t, h, w, generator=g)
    main = torch.rand(b, 1, t, h, w, generator=g) * 6.0
    return aux, main


@pytest.fixture(scope="module")
def tiny() -> DSTCarbonFormer:
    torch.manual_seed(0)
    return DSTCarbonFormer(preset("tiny", C_AUX, allocation="water_fill")).eval()


@pytest.mark.parametrize(("b", "t", "h", "w"), [(1, 1, 120, 120), (1, 1, 100, 100), (2, 3, 40, 40), (1, 2, 37, 45)])
def test_output_shapes_any_size(tiny: DSTCarbonFormer, b: int, t: int, h: int, w: int) -> None:
    aux, main = _inputs(b, t, h, w)
    with torch.no_grad():
        raw, constrained = tiny(aux, main)
    assert raw.shape == (b, 1, t, h, w)
    assert raw.dtype == torch.float32 and torch.isfinite(raw).all()
    assert constrained is None


def test_untrained_model_starts_near_uniform_prior(tiny: DSTCarbonFormer) -> None:
    aux, main = _inputs(2, 1, 40, 40)
    with torch.no_grad():
        raw, _ = tiny(aux, main)
    assert (raw - main).abs().mean() < 0.5


def test_eval_deterministic_and_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    model = DSTCarbonFormer(preset("tiny", C_AUX, allocation="water_fill", dropout=0.3)).eval()
    aux, main = _inputs(2, 2, 32, 32)
    with torch.no_grad():
        a, _ = model(aux, main)
        b, _ = model(aux, main)
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        c, _ = model(aux, main)
    assert not torch.equal(a, c)


def test_batch_independence(tiny: DSTCarbonFormer) -> None:
    """Each patch's output depends only on that patch (GroupNorm, no batch statistics)."""
    aux, main = _inputs(3, 1, 24, 24)
    with torch.no_grad():
        full, _ = tiny(aux, main)
        one, _ = tiny(aux[1:2], main[1:2])
    torch.testing.assert_close(full[1:2], one, rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    cfg = preset("tiny", C_AUX, allocation="water_fill", temporal_kernel=3, dilations=(1, 2))
    model = DSTCarbonFormer(cfg).train()
    for seed in range(2):  # two batches so that every expert is routed to
        aux, main = _inputs(2, 3, 32, 32, seed=seed)
        raw, _ = model(aux, main)
        loss = (raw * torch.randn_like(raw)).sum() + model.aux_loss
        loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("case", ["zeros", "extreme"])
def test_no_nan_for_zero_and_extreme_inputs(case: str) -> None:
    torch.manual_seed(0)
    model = DSTCarbonFormer(preset("tiny", C_AUX, allocation="water_fill")).train()
    block = 10
    if case == "zeros":
        aux = torch.zeros(2, C_AUX, 2, 40, 40)
        main = torch.zeros(2, 1, 2, 40, 40)
        totals = torch.zeros(2, 1, 2, 4, 4, dtype=torch.float64)
    else:
        aux = torch.full((2, C_AUX, 2, 40, 40), 1e4)
        aux[:, 1] = -1e4
        main = torch.full((2, 1, 2, 40, 40), math.log1p(1e9))
        totals = torch.full((2, 1, 2, 4, 4), 1e9 * block * block, dtype=torch.float64)
    raw, constrained = model(aux, main, totals, block)
    assert torch.isfinite(raw).all()
    assert constrained is not None and torch.isfinite(constrained).all()
    (raw.sum() + constrained.sum() + model.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_physics_constrained_sums_equal_block_totals(tiny: DSTCarbonFormer) -> None:
    aux, main = _inputs(2, 2, 40, 60)
    g = torch.Generator().manual_seed(1)
    totals = torch.rand(2, 1, 2, 4, 6, generator=g, dtype=torch.float64) * 1e4
    totals[0, 0, 0, 0, 0] = 0.0
    with torch.no_grad():
        raw, constrained = tiny(aux, main, totals, 10)
    assert constrained is not None and constrained.dtype == torch.float64
    children = torch.expm1(constrained)
    assert (children >= 0).all()
    torch.testing.assert_close(block_sum(children, 10), totals, rtol=1e-10, atol=1e-9)
    assert (children[0, 0, 0, :10, :10] == 0).all()


def test_physics_requires_both_arguments(tiny: DSTCarbonFormer) -> None:
    aux, main = _inputs(1, 1, 20, 20)
    with pytest.raises(ValueError, match="both"):
        tiny(aux, main, block_totals=torch.ones(1, 1, 1, 2, 2))


@pytest.mark.parametrize("switch", ["use_sft", "use_moe", "use_attention", "use_temporal", "use_physics"])
def test_each_ablation_switch_changes_model_and_runs(switch: str) -> None:
    torch.manual_seed(0)
    full = DSTCarbonFormer(preset("tiny", C_AUX, allocation="water_fill"))
    ablated = DSTCarbonFormer(preset("tiny", C_AUX, allocation="water_fill", **{switch: False}))
    aux, main = _inputs(1, 2, 40, 40)
    totals = torch.rand(1, 1, 2, 4, 4, dtype=torch.float64) * 100
    raw, constrained = ablated(aux, main, totals, 10)
    assert raw.shape == main.shape and torch.isfinite(raw).all()
    if switch == "use_physics":
        assert count_parameters(ablated) == count_parameters(full)
        assert constrained is None
    else:
        assert count_parameters(ablated) < count_parameters(full)
        assert constrained is not None
    if switch == "use_moe":
        assert float(ablated.aux_loss) == 0.0
    raw.sum().backward()


def test_config_and_state_dict_round_trip(tiny: DSTCarbonFormer) -> None:
    rebuilt = DSTCarbonFormer(ModelConfig.from_dict(tiny.config.to_dict())).eval()
    rebuilt.load_state_dict(tiny.state_dict())
    aux, main = _inputs(1, 1, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(aux, main)[0], tiny(aux, main)[0])


def test_channels_last_switch_same_result(tiny: DSTCarbonFormer) -> None:
    aux, main = _inputs(2, 2, 24, 32)
    with torch.no_grad():
        a, _ = tiny(aux, main)
        tiny.channels_last = False
        try:
            b, _ = tiny(aux, main)
        finally:
            tiny.channels_last = True
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_forward_backward_cpu() -> None:
    torch.manual_seed(0)
    model = DSTCarbonFormer(preset("tiny", C_AUX, allocation="water_fill", temporal_kernel=3)).train()
    aux, main = _inputs(2, 2, 40, 40)
    totals = torch.rand(2, 1, 2, 4, 4, dtype=torch.float64) * 100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw, constrained = model(aux, main, totals, 10)
    assert raw.dtype == torch.float32 and torch.isfinite(raw).all()
    assert constrained is not None and constrained.dtype == torch.float64
    (raw.sum() + constrained.float().sum() + model.aux_loss).backward()
    with torch.no_grad():
        ref, _ = model.eval()(aux, main)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = model(aux, main)
    assert (low - ref).abs().max() < 0.1


def test_input_validation(tiny: DSTCarbonFormer) -> None:
    aux, main = _inputs(1, 1, 16, 16)
    with pytest.raises(ValueError, match="aux must be"):
        tiny(aux[:, :2], main)
    with pytest.raises(ValueError, match="main must be"):
        tiny(aux, main[..., :8])
    cfg = preset("tiny", C_AUX, allocation="water_fill", max_years=2)
    with pytest.raises(ValueError, match="max_years"):
        DSTCarbonFormer(cfg)(*_inputs(1, 3, 16, 16))
