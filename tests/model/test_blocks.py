"""Unit tests for models.blocks: shapes, gradient flow to every parameter, numerical safety."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.blocks import (
    Downsample,
    GlobalContextAttention,
    MultiScaleDSConv3d,
    OutputHead,
    SFTLayer,
    SpatialMoE,
    TemporalSSM,
    UpFuse,
)

C = 8


def _single_input_blocks() -> dict[str, nn.Module]:
    return {
        "msconv_t1": MultiScaleDSConv3d(C, (3, 5), (1, 1), temporal_kernel=1),
        "msconv_t3_dilated": MultiScaleDSConv3d(C, (3, 5), (1, 2), temporal_kernel=3, dropout=0.1),
        "moe": SpatialMoE(C, n_experts=4, top_k=2),
        "moe_top1": SpatialMoE(C, n_experts=3, top_k=1),
        "attention": GlobalContextAttention(C, heads=2, pool=4),
        "temporal": TemporalSSM(C, state_size=4, expand=2),
    }


def _assert_all_grads(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"


@pytest.mark.parametrize("name", list(_single_input_blocks()))
def test_single_input_block_shape_and_gradients(name: str) -> None:
    torch.manual_seed(0)
    block = _single_input_blocks()[name]
    x = torch.randn(2, C, 3, 12, 10, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    # A random projection, not a plain sum: GroupNorm output sums have zero gradient.
    loss = (y * torch.randn_like(y)).sum()
    if isinstance(block, SpatialMoE):
        loss = loss + block.aux_loss
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    _assert_all_grads(block)


@pytest.mark.parametrize("name", list(_single_input_blocks()))
@pytest.mark.parametrize("fill", [0.0, math.log1p(1e9), 1e6])
def test_single_input_block_finite_for_zero_and_extreme_inputs(name: str, fill: float) -> None:
    torch.manual_seed(0)
    block = _single_input_blocks()[name].eval()
    x = torch.full((1, C, 2, 8, 8), fill)
    x[:, :, :, :4] = 0.0  # half constant, half extreme: exercises normalisation
    with torch.no_grad():
        y = block(x)
    assert torch.isfinite(y).all()


def test_t1_temporal_branch_equals_zero_padded_conv() -> None:
    """For T = 1 the centre-tap shortcut equals the full zero-padded temporal conv."""
    torch.manual_seed(0)
    block = MultiScaleDSConv3d(C, (3, 5), (1, 2), temporal_kernel=3)
    h = torch.randn(2, C, 1, 9, 9)
    assert block.temporal is not None
    torch.testing.assert_close(block._temporal(h), block.temporal(h), rtol=1e-5, atol=1e-6)


def test_msconv_is_spatial_per_year_with_temporal_kernel_1() -> None:
    """temporal_kernel=1: years do not mix (except through GroupNorm statistics)."""
    torch.manual_seed(0)
    block = MultiScaleDSConv3d(C, (3, 5), (1, 1), temporal_kernel=1).eval()
    with torch.no_grad():
        block.proj.weight.mul_(10.0)
    x = torch.randn(1, C, 3, 10, 10)
    x2 = x.clone()
    x2[:, :, 0, 5, 5] += 3.0
    with torch.no_grad():
        d = (block(x2) - block(x)).abs().sum(dim=(0, 1))
    assert d[0, 5, 5] > 5 * d[1, 5, 5]
    assert d[0, 5, 7] > 5 * d[0, 5, 8]  # receptive field of a 5x5 kernel: +-2 cells
    # channels_last_3d input gives the same result (the fold is a view there).
    with torch.no_grad():
        torch.testing.assert_close(block(x.to(memory_format=torch.channels_last_3d)), block(x))


def test_sft_shapes_gradients_and_modulation() -> None:
    torch.manual_seed(0)
    sft = SFTLayer(cond_channels=6, channels=C)
    x = torch.randn(2, C, 1, 10, 10, requires_grad=True)
    cond = torch.randn(2, 6, 1, 10, 10, requires_grad=True)
    y = sft(x, cond)
    assert y.shape == x.shape
    (y * torch.randn_like(y)).sum().backward()
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    _assert_all_grads(sft)
    # The modulation is local: a change of the condition at one pixel changes that pixel far
    # more than others (which only see it through the GroupNorm statistics).
    cond2 = cond.detach().clone()
    cond2[..., 0, 0] += 5.0
    with torch.no_grad():
        diff = (sft(x, cond2) - sft(x, cond.detach())).abs().sum(dim=(0, 1, 2))
    assert diff[0, 0] > 5 * diff[5, 5]


def test_moe_routes_top_k_and_balance_loss_range() -> None:
    torch.manual_seed(0)
    moe = SpatialMoE(C, n_experts=4, top_k=2)
    x = torch.randn(3, C, 2, 16, 16)
    moe(x)
    # Switch loss: 1 for perfect balance, at most E when everything goes to one expert.
    assert 1.0 - 1e-3 <= moe.aux_loss.item() <= 4.0
    # Forcing the gate to prefer expert 0 everywhere raises the balance loss.
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.bias.copy_(torch.tensor([5.0, 2.0, 0.0, 0.0]))
    moe(x)
    assert moe.aux_loss.item() > 1.5


def test_attention_uses_global_context() -> None:
    """A change in one corner changes the output in the opposite corner (beyond any conv)."""
    torch.manual_seed(0)
    attn = GlobalContextAttention(C, heads=2, pool=4).eval()
    with torch.no_grad():
        attn.out.weight.mul_(10.0)
    x = torch.randn(1, C, 1, 16, 16)
    x2 = x.clone()
    x2[..., :4, :4] += 3.0
    with torch.no_grad():
        d = (attn(x2) - attn(x)).abs()
    assert d[..., 12:, 12:].sum() > 0


def test_attention_small_map_smaller_than_pool() -> None:
    attn = GlobalContextAttention(C, heads=4, pool=8)
    x = torch.randn(2, C, 1, 3, 5)
    assert attn(x).shape == x.shape


def test_temporal_scan_mixes_years_both_ways() -> None:
    torch.manual_seed(0)
    ssm = TemporalSSM(C, state_size=4).eval()
    with torch.no_grad():
        ssm.out_proj.weight.mul_(10.0)
    x = torch.randn(1, C, 4, 3, 3)
    x2 = x.clone()
    x2[:, :, 1] += 2.0  # perturb year 1 only
    with torch.no_grad():
        d = (ssm(x2) - ssm(x)).abs().sum(dim=(0, 1, 3, 4))
    assert d[0] > 0 and d[3] > 0  # earlier and later years both see it
    # The scan is per pixel: other pixels only feel a change through GroupNorm statistics.
    x3 = x.clone()
    x3[..., 0, 0] += 2.0
    with torch.no_grad():
        d_pix = (ssm(x3) - ssm(x)).abs().sum(dim=(0, 1, 2))
    assert d_pix[0, 0] > 5 * d_pix[2, 2]


def test_temporal_t1_well_defined_and_near_identity() -> None:
    torch.manual_seed(0)
    ssm = TemporalSSM(C, state_size=4)
    x = torch.randn(2, C, 1, 5, 5, requires_grad=True)
    y = ssm(x)
    assert torch.isfinite(y).all()
    assert (y - x).abs().mean() < 0.5 * x.abs().mean()
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("years", [1, 3])
def test_temporal_scan_without_autograd_gives_the_training_values(years: int) -> None:
    """Inference skips the first step's decay (the state is 0) and, for one year, the second
    scan (the same computation): the values must stay those of the training forward, bit for bit."""
    torch.manual_seed(0)
    ssm = TemporalSSM(C, state_size=4)
    with torch.no_grad():
        ssm.out_proj.weight.normal_()
    x = torch.randn(2, C, years, 5, 5)
    y_train = ssm(x.requires_grad_())
    y_train.sum().backward()
    assert ssm.A_log.grad is not None  # training still uses A_log at T = 1 (weight decay, DDP)
    with torch.inference_mode():
        y_infer = ssm(x.detach())
    assert torch.equal(y_train.detach(), y_infer)


def test_down_up_and_head_shapes() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, C, 1, 8, 12)
    down = Downsample(C, 2 * C)
    y = down(x)
    assert y.shape == (2, 2 * C, 1, 4, 6)
    up = UpFuse(2 * C, C)
    z = up(y, x)
    assert z.shape == x.shape
    head = OutputHead(C)
    out = head(z)
    assert out.shape == (2, 1, 1, 8, 12)
    (out * torch.randn_like(out)).sum().backward()
    for module in (down, up, head):
        _assert_all_grads(module)


def test_head_is_bounded() -> None:
    head = OutputHead(C, bound=24.0)
    with torch.no_grad():
        head.out.weight.fill_(1e6)
        out = head(torch.randn(1, C, 1, 4, 4) * 1e6)
    assert torch.isfinite(out).all() and out.abs().max() <= 24.0


@pytest.mark.parametrize("name", ["msconv_t3_dilated", "moe", "attention", "temporal"])
def test_blocks_under_bf16_autocast(name: str) -> None:
    torch.manual_seed(0)
    block = _single_input_blocks()[name]
    x = torch.randn(2, C, 2, 8, 8).to(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.float().sum().backward()


def test_group_norm_channels_last_input_without_grad() -> None:
    """Regression: native CPU group_norm backward crashed for this case (PyTorch 2.13)."""
    from models.blocks import group_norm

    gn = group_norm(C)
    x = torch.randn(2, C, 2, 6, 6).to(memory_format=torch.channels_last_3d)
    y = gn(x)
    (y * torch.randn_like(y)).sum().backward()
    assert gn.weight.grad is not None and gn.weight.grad.abs().sum() > 0
    ref = nn.GroupNorm(gn.num_groups, C)
    ref.load_state_dict(gn.state_dict())
    torch.testing.assert_close(y, ref(x.contiguous()))
