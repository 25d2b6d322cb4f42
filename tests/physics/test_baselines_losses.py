"""Tests of the baselines (models/baselines.py) and the dual-layer loss (models/losses.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.baselines import dasymetric_fill, uniform_fill
from models.losses import DualLayerWeightedLoss
from models.physics import block_sum

F64 = torch.float64


def test_uniform_fill() -> None:
    s = torch.tensor([[1.0, float("nan")], [0.0, 1e9]]).reshape(1, 1, 1, 2, 2)
    x = uniform_fill(s, 10)
    assert x.dtype == F64 and x.shape == (1, 1, 1, 20, 20)
    assert torch.isnan(x[..., :10, 10:]).all()
    assert (x[..., :10, :10] == 0.01).all()
    torch.testing.assert_close(block_sum(x, 10), s.double(), equal_nan=True, rtol=1e-14, atol=0)


def test_dasymetric_fill() -> None:
    rng = np.random.default_rng(0)
    s = torch.from_numpy(rng.random((2, 1, 3, 4, 5)) * 100)
    s[0, 0, 0, 0, 0] = float("nan")
    w = torch.from_numpy(rng.random((2, 1, 1, 40, 50)))  # static layer, broadcast over T
    w[..., :10, 10:20] = 0.0  # block (0, 1) all zero -> uniform
    w[..., 15, 15] = float("nan")
    w[..., 16, 16] = -5.0
    for p in (1.0, 2.0):
        x = dasymetric_fill(s, w, 10, power=p)
        assert x.shape == (2, 1, 3, 40, 50) and x.dtype == F64
        torch.testing.assert_close(block_sum(x, 10), s, equal_nan=True, rtol=1e-13, atol=0)
        assert torch.isnan(x[0, 0, 0, :10, :10]).all()
        assert (x[..., :10, 10:20] == s[..., :1, 1:2].repeat_interleave(10, -2).repeat_interleave(10, -1) / 100).all()
        assert (x[..., 15, 15] == 0).all() and (x[..., 16, 16] == 0).all()
        assert torch.isfinite(x[1]).all() and (x[1] >= 0).all()
    # share proportional to w ** p within a block
    x = dasymetric_fill(s, w, 10, power=2.0)
    blk_w = w[1, 0, 0, 20:30, 30:40] ** 2
    torch.testing.assert_close(x[1, 0, 2, 20:30, 30:40], blk_w / blk_w.sum() * s[1, 0, 2, 2, 3])
    with pytest.raises(ValueError, match="power"):
        dasymetric_fill(s, w, 10, power=0)


# ---------------------------------------------------------------------------------------------
# Loss


def make_loss(**kw: float) -> DualLayerWeightedLoss:
    return DualLayerWeightedLoss(log_nz_over_nnz=kw.pop("L", 2.0), cv_log=kw.pop("cv", 0.5), **kw)


def test_weights_formula() -> None:
    loss = make_loss(L=math.log(9.0), cv=0.5, mean_log=2.0)
    y = torch.tensor([0.0, 1.0, 2.0, 4.0], dtype=F64)
    w = loss.weights(y)
    w_macro = 1 + math.log(9.0)
    expected = torch.tensor([1.0, w_macro * 1.25, w_macro * 1.5, w_macro * 2.0], dtype=F64)
    torch.testing.assert_close(w, expected)
    # macro weight never below 1 (more nonzeros than zeros)
    assert make_loss(L=-3.0).w_macro == 1.0


def test_weight_properties() -> None:
    y = torch.tensor([0.0, 0.5, 1.0, 3.0, 8.0], dtype=F64)
    w = make_loss().weights(y)
    assert w[0] == 1.0
    assert (w[1:] > 1).all()
    assert (torch.diff(w[1:]) > 0).all()  # larger y weighs more
    # rarer nonzeros weigh more
    assert (make_loss(L=4.0).weights(y)[1:] > make_loss(L=1.0).weights(y)[1:]).all()
    # scale invariance: per-batch reference makes the weights invariant to scaling y
    torch.testing.assert_close(make_loss().weights(y * 7.5), w)


def test_loss_normalised_and_scale_invariant_in_weights() -> None:
    torch.manual_seed(0)
    y = torch.relu(torch.randn(2, 1, 2, 6, 6, dtype=F64)) * 3
    p = y + torch.randn_like(y) * 0.3
    a = make_loss(L=1.0, cv=0.5)
    val = a(p, y)
    w = a.weights(y)
    rho = torch.sqrt((p - y) ** 2 + 1e-6) - 1e-3
    torch.testing.assert_close(val, (w * rho).sum() / w.sum())
    # multiplying all weights by a constant (here: through w_macro when all pixels are nonzero)
    y_nz = y + 0.1
    torch.testing.assert_close(make_loss(L=1.0)(p, y_nz), make_loss(L=5.0)(p, y_nz))
    # perfect prediction -> 0
    assert make_loss()(y, y).item() == 0.0


def test_loss_all_zero_mask_and_nan() -> None:
    y = torch.zeros(1, 1, 1, 4, 4)
    p = torch.randn(1, 1, 1, 4, 4, requires_grad=True)
    val = make_loss()(p, y)
    assert torch.isfinite(val)
    val.backward()
    assert torch.isfinite(p.grad).all()
    # nodata target pixels and masked pixels are ignored, even if pred is NaN there
    y2 = torch.rand(1, 1, 1, 4, 4)
    y2[..., 0, 0] = float("nan")
    p2 = y2.clone()
    p2[..., 0, 0] = float("nan")
    p2[..., 1, 1] = 100.0
    mask = torch.ones_like(y2, dtype=torch.bool)
    mask[..., 1, 1] = False
    assert make_loss()(p2, y2, mask).item() == pytest.approx(0.0, abs=1e-12)
    # nothing valid -> 0, no NaN
    out = make_loss()(p2, y2, torch.zeros_like(mask))
    assert out.item() == 0.0
    with pytest.raises(ValueError):
        DualLayerWeightedLoss(float("nan"), 1.0)
