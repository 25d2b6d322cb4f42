"""Tests of the water-filling projection (models/physics.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.physics import (
    PhysicsHead,
    _water_level_numpy,
    _water_level_torch,
    block_broadcast,
    block_sum,
    from_blocks,
    project_blocks,
    to_blocks,
    water_fill,
)

F64 = torch.float64


def reference_projection(v: np.ndarray, s: np.ndarray, iters: int = 200) -> np.ndarray:
    """Independent reference: bisection on the water level, one block per row.

    Finds tau with sum(max(v - tau, 0)) = s on [max - s, max] (values shifted by the row max to
    avoid cancellation), then polishes tau exactly from the support found.
    """
    u = v - v.max(axis=1, keepdims=True)
    lo = -s.copy()  # f(lo) >= 0
    hi = np.zeros_like(s)  # f(hi) = -s <= 0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        f = np.maximum(u - mid[:, None], 0).sum(axis=1) - s
        lo = np.where(f > 0, mid, lo)
        hi = np.where(f > 0, hi, mid)
    tau = 0.5 * (lo + hi)
    supp = u > tau[:, None]
    cnt = np.maximum(supp.sum(axis=1), 1)
    tau_exact = np.where(supp.any(axis=1), ((u * supp).sum(axis=1) - s) / cnt, 0.0)
    return np.maximum(u - tau_exact[:, None], 0.0)


def random_blocks(rng: np.random.Generator, n_blocks: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks mixing the hard cases: zeros, single pixel, huge range, ties, negatives."""
    kind = rng.integers(0, 7, n_blocks)
    v = rng.normal(size=(n_blocks, n))
    s = 10.0 ** rng.uniform(-6, 9, n_blocks)
    # 0: gaussian; 1: heavy tail over 1e-6..1e9; 2: ties; 3: single large pixel; 4: all negative
    # 5: all equal; 6: constant + tiny noise, S tiny
    heavy = 10.0 ** rng.uniform(-6, 9, size=(n_blocks, n))
    v = np.where((kind == 1)[:, None], heavy, v)
    ties = rng.integers(0, 3, size=(n_blocks, n)).astype(np.float64)
    v = np.where((kind == 2)[:, None], ties, v)
    single = np.zeros((n_blocks, n))
    single[np.arange(n_blocks), rng.integers(0, n, n_blocks)] = 1e9
    v = np.where((kind == 3)[:, None], single, v)
    v = np.where((kind == 4)[:, None], -np.abs(v) * 1e3, v)
    v = np.where((kind == 5)[:, None], 7.0, v)
    v = np.where((kind == 6)[:, None], 1e6 + rng.normal(size=(n_blocks, n)) * 1e-3, v)
    s = np.where(kind == 6, 1e-6, s)
    s[rng.random(n_blocks) < 0.05] = 0.0
    return v, s


@pytest.mark.parametrize("block", [1, 3, 10])
def test_property_random_blocks_match_reference(block: int) -> None:
    rng = np.random.default_rng(block)
    n_blocks = 3000
    v, s = random_blocks(rng, n_blocks, block * block)
    # lay the blocks out as [B, 1, T, H, W] with B = 10, T = 3, 10 x 10 blocks per image
    vals = from_blocks(torch.from_numpy(v), (10, 1, 3, 10 * block, 10 * block), block)
    tot = torch.from_numpy(s).reshape(10, 1, 3, 10, 10)
    x = water_fill(vals, tot, block)
    assert x.dtype == F64 and x.shape == vals.shape
    xb = to_blocks(x, block).numpy()
    assert np.isfinite(xb).all()
    assert (xb >= 0).all()
    # float64 sums
    np.testing.assert_allclose(xb.sum(axis=1), s, rtol=1e-12, atol=0)
    assert (xb[s == 0] == 0).all()
    # equal to the independent reference within 1e-9 of the block total
    ref = reference_projection(v, s)
    err = np.abs(xb - ref).max(axis=1)
    assert (err <= 1e-9 * s + 1e-300).all(), err.max()
    # float32 output: float64 sum of the cast values within 1e-6 relative
    x32 = to_blocks(water_fill(vals, tot, block, out_dtype=torch.float32), block).numpy()
    assert x32.dtype == np.float32 and (x32 >= 0).all() and np.isfinite(x32).all()
    rel = np.abs(x32.astype(np.float64).sum(axis=1) - s) / np.where(s > 0, s, 1.0)
    assert rel.max() <= 1e-6


def test_large_training_block() -> None:
    rng = np.random.default_rng(5)
    v = rng.lognormal(0, 3, size=(4, 120 * 120))
    v[0] = 0.0
    s = np.array([1.0, 1e-6, 1e9, 123.0])
    vals = from_blocks(torch.from_numpy(v), (4, 1, 1, 120, 120), 120)
    x = water_fill(vals, torch.from_numpy(s).reshape(4, 1, 1, 1, 1), 120)
    xb = to_blocks(x, 120).numpy()
    np.testing.assert_allclose(xb.sum(axis=1), s, rtol=1e-12)
    ref = reference_projection(v, s)
    assert (np.abs(xb - ref).max(axis=1) <= 1e-9 * s).all()


def test_torch_and_numpy_water_levels_agree() -> None:
    rng = np.random.default_rng(1)
    v, s = random_blocks(rng, 500, 100)
    u = torch.from_numpy(v - v.max(axis=1, keepdims=True))
    st = torch.from_numpy(s)
    tau_n, kth_n = _water_level_numpy(u, st)
    tau_t, kth_t = _water_level_torch(u, st)
    torch.testing.assert_close(tau_n, tau_t, rtol=1e-12, atol=1e-300)
    assert torch.equal(kth_n, kth_t)


def test_matches_known_solution() -> None:
    vals = torch.tensor([[3.0, 1.0, 0.0, -2.0]], dtype=F64).reshape(1, 1, 1, 2, 2)
    x = water_fill(vals, torch.tensor(2.0, dtype=F64).reshape(1, 1, 1, 1, 1), 2)
    # tau = 1: x = [2, 0, 0, 0]
    torch.testing.assert_close(x.reshape(-1), torch.tensor([2.0, 0, 0, 0], dtype=F64))
    x = water_fill(vals, torch.tensor(6.0, dtype=F64).reshape(1, 1, 1, 1, 1), 2)
    # tau = -2/3 over {3, 1, 0}: x = [11/3, 5/3, 2/3, 0]
    torch.testing.assert_close(x.reshape(-1), torch.tensor([11 / 3, 5 / 3, 2 / 3, 0.0], dtype=F64))


def test_projection_is_identity_on_feasible_input() -> None:
    rng = np.random.default_rng(2)
    v = torch.from_numpy(rng.random((20, 1, 2, 10, 10)))
    x = water_fill(v, block_sum(v, 10), 10)
    torch.testing.assert_close(x, v, rtol=1e-12, atol=1e-14)


def test_gradcheck() -> None:
    torch.manual_seed(0)
    v = torch.randn(2, 1, 2, 4, 4, dtype=F64, requires_grad=True)
    s = (torch.rand(2, 1, 2, 2, 2, dtype=F64) * 3 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: water_fill(a, b, 2), (v, s), eps=1e-7, atol=1e-6)


def test_gradient_is_projection_jacobian() -> None:
    v = torch.tensor([3.0, 1.0, 0.0, -2.0], dtype=F64).reshape(1, 1, 1, 2, 2).requires_grad_()
    s = torch.tensor(6.0, dtype=F64).reshape(1, 1, 1, 1, 1).requires_grad_()
    x = water_fill(v, s, 2)
    x.reshape(-1)[0].backward()
    # support {0, 1, 2}: d x0 / d v = e0 - 1/3 on support, 0 off; d x0 / d S = 1/3
    torch.testing.assert_close(v.grad.reshape(-1), torch.tensor([2 / 3, -1 / 3, -1 / 3, 0], dtype=F64))
    torch.testing.assert_close(s.grad.reshape(-1), torch.tensor([1 / 3], dtype=F64))
    # the float32 output path has the same gradient (the residual fix is not differentiated)
    v32 = v.detach().float().requires_grad_()
    water_fill(v32, s.detach(), 2, out_dtype=torch.float32).reshape(-1)[0].backward()
    assert v32.grad.dtype == torch.float32
    torch.testing.assert_close(v32.grad.double(), v.grad)


def test_float32_input_and_grad_path_consistency() -> None:
    rng = np.random.default_rng(3)
    v, s = random_blocks(rng, 200, 100)
    vals = from_blocks(torch.from_numpy(v), (2, 1, 1, 100, 100), 10)
    tot = torch.from_numpy(s).reshape(2, 1, 1, 10, 10)
    x_nograd = water_fill(vals, tot, 10)
    x_grad = water_fill(vals.clone().requires_grad_(), tot, 10)
    diff = to_blocks((x_grad.detach() - x_nograd).abs(), 10).max(dim=1).values.numpy()
    assert (diff <= 1e-12 * s + 1e-300).all()


def test_nan_zero_and_negative_totals() -> None:
    v = torch.randn(1, 1, 1, 4, 6, dtype=F64)
    s = torch.tensor([[1.0, float("nan"), 0.0], [2.0, 3.0, 4.0]], dtype=F64).reshape(1, 1, 1, 2, 3)
    x = water_fill(v, s, 2)
    blocks = to_blocks(x, 2)
    assert torch.isnan(blocks[1]).all()
    assert (blocks[2] == 0).all()
    assert torch.isfinite(blocks[[0, 3, 4, 5]]).all()
    with pytest.raises(ValueError, match="negative"):
        water_fill(v, -s.nan_to_num(0) - 1, 2)
    with pytest.raises(ValueError, match="infinite"):
        water_fill(v, torch.full_like(s, float("inf")), 2)
    # allow_signed: negative blocks get the uniform shift onto {sum = S}, others are unchanged
    s2 = torch.tensor([[-1.0, 1.0, 0.0], [2.0, -3.0, 4.0]], dtype=F64).reshape(1, 1, 1, 2, 3)
    x2 = water_fill(v, s2, 2, allow_signed=True)
    torch.testing.assert_close(block_sum(x2, 2), s2)
    vb, xb2 = to_blocks(v, 2), to_blocks(x2, 2)
    torch.testing.assert_close(xb2[0] - vb[0], (xb2[0] - vb[0]).mean().expand(4))
    assert (xb2[[1, 2, 3, 5]] >= 0).all()


def test_nonfinite_values() -> None:
    nan, inf = float("nan"), float("inf")
    v = torch.tensor(
        [[1.0, nan, 2.0, 0.5], [nan, nan, nan, nan], [inf, 1.0, inf, -inf], [-inf, 3.0, -inf, 1.0]], dtype=F64
    )
    s = torch.tensor([1.0, 2.0, 4.0, 3.0], dtype=F64)
    x = project_like_water_fill(v, s)
    assert torch.isfinite(x).all() and (x >= 0).all()
    torch.testing.assert_close(x.sum(dim=1), s)
    assert x[0, 1] == 0  # NaN value: zero share
    torch.testing.assert_close(x[1], torch.full((4,), 0.5, dtype=F64))  # all NaN: uniform
    torch.testing.assert_close(x[2], torch.tensor([2.0, 0, 2.0, 0], dtype=F64))  # +inf share
    torch.testing.assert_close(x[3], torch.tensor([0, 2.5, 0, 0.5], dtype=F64))


@pytest.mark.parametrize("signed", [False, True])
def test_host_counts_path_equals_the_checked_path(signed: bool) -> None:
    """``totals_counts`` (no device sync) gives the same children, also for non-finite values."""
    nan, inf = float("nan"), float("inf")
    g = torch.Generator().manual_seed(3)
    v = torch.randn(1, 1, 2, 6, 8, generator=g, dtype=F64).exp()
    v[0, 0, 0, 0, 0], v[0, 0, 0, 3, 5], v[0, 0, 1, 4, 1] = nan, inf, -inf
    s = torch.rand(1, 1, 2, 3, 4, generator=g, dtype=F64) * 10
    s[0, 0, 0, 1, 1], s[0, 0, 1, 0, 0] = nan, 0.0
    if signed:
        s[0, 0, 1, 2, 3] = -2.0
    counts = (int(torch.isinf(s).sum()), int((s < 0).sum()), int(torch.isnan(s).sum()))
    for out_dtype in (torch.float64, torch.float32):
        ref = water_fill(v, s, 2, allow_signed=signed, out_dtype=out_dtype)
        got = water_fill(v, s, 2, allow_signed=signed, out_dtype=out_dtype, totals_counts=counts)
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    finite = v.clone()
    finite[~torch.isfinite(finite)] = 1.0
    torch.testing.assert_close(water_fill(finite, s, 2, allow_signed=signed, totals_counts=counts),
                               water_fill(finite, s, 2, allow_signed=signed), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="infinite"):
        water_fill(v, torch.full_like(s, inf), 2, totals_counts=(s.numel(), 0, 0))


def project_like_water_fill(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    vals = from_blocks(v, (1, 1, 1, 2, 2 * v.shape[0]), 2)
    return to_blocks(water_fill(vals, s.reshape(1, 1, 1, 1, -1), 2), 2)


def test_shapes_and_errors() -> None:
    v = torch.zeros(1, 1, 1, 10, 10)
    with pytest.raises(ValueError, match="multiples"):
        water_fill(v, torch.zeros(1, 1, 1, 3, 3), 3)
    with pytest.raises(ValueError, match="shape"):
        water_fill(v, torch.zeros(1, 1, 1, 2, 2), 10)
    assert water_fill(v, torch.ones(1, 1, 1, 1, 1), 10, out_dtype=torch.float32).dtype == torch.float32


def test_block_helpers_roundtrip() -> None:
    x = torch.arange(2 * 3 * 6 * 9, dtype=F64).reshape(2, 1, 3, 6, 9)
    assert torch.equal(from_blocks(to_blocks(x, 3), x.shape, 3), x)
    bs = block_sum(x, 3)
    assert bs.shape == (2, 1, 3, 2, 3)
    assert bs[0, 0, 0, 1, 2] == x[0, 0, 0, 3:6, 6:9].sum()
    torch.testing.assert_close(to_blocks(x, 3).sum(dim=1), bs.reshape(-1))
    up = block_broadcast(bs, 3)
    assert up.shape == x.shape and up[0, 0, 0, 4, 7] == bs[0, 0, 0, 1, 2]


def test_physics_head_switch() -> None:
    v = torch.rand(1, 1, 1, 4, 4, dtype=F64)
    s = torch.full((1, 1, 1, 2, 2), 2.0, dtype=F64)
    assert torch.equal(PhysicsHead(enabled=False)(v, s, 2), v)
    torch.testing.assert_close(block_sum(PhysicsHead()(v, s, 2), 2), s)


def test_torch_sort_path_as_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sort path used on CUDA gives the same projection (forced on the CPU here)."""
    import models.physics as physics

    monkeypatch.setattr(physics, "_water_level_numpy", lambda u, s: _water_level_torch(u, s))
    rng = np.random.default_rng(4)
    v, s = random_blocks(rng, 700, 100)
    vals = from_blocks(torch.from_numpy(v), (7, 1, 1, 100, 100), 10)
    x = to_blocks(water_fill(vals, torch.from_numpy(s).reshape(7, 1, 1, 10, 10), 10), 10).numpy()
    assert (x >= 0).all()
    assert (np.abs(x - reference_projection(v, s)).max(axis=1) <= 1e-9 * s + 1e-300).all()
