"""The numpy fills of the baselines (``models.host_baselines``) give the bits of their torch
references (``models.baselines``) on the CPU, and the sums add in torch's order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carbonsr_cli.methods import REGISTRY, needs_torch
from models.baselines import dasymetric_fill, uniform_fill
from models.host_baselines import block_columns, clean_weights, dasymetric_children, uniform_children
from models.physics import to_blocks
from models.torch_sum_order import torch_sums


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shapes and bit patterns, NaN at the same places (NaN payloads not compared)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return False
    return np.array_equal(np.where(np.isnan(a), 0.0, a).view(np.uint64), np.where(np.isnan(b), 0.0, b).view(np.uint64))


def _inputs(seed: int, block: int, dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Totals ``[2, 1, 3, 7, 9]`` over many magnitudes (NaN, 0, -0 among them) and child weights
    with NaN, +-inf, negative values, -0, huge values, an all-zero and an all-negative block."""
    rng = np.random.default_rng(seed)
    tot = rng.random((2, 1, 3, 7, 9)) * 10.0 ** rng.normal(0, 3, (2, 1, 3, 7, 9))
    tot[0, 0, 0, 1, :3] = np.nan
    tot[1, 0, 2, 0, 0] = 0.0
    tot[0, 0, 1, 2, 2] = -0.0
    shape = (2, 1, 3, 7 * block, 9 * block)
    w = (rng.random(shape) * 10.0 ** rng.normal(0, 2, shape)).astype(dtype)
    for frac, val in ((0.05, np.nan), (0.02, -0.0), (0.01, np.inf), (0.01, -np.inf), (0.05, -3.0), (0.001, 3e38)):
        w[rng.random(shape) < frac] = val
    w[..., :block, :block] = 0.0
    w[..., block : 2 * block, :block] = -1.0
    return tot, w


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9, 16, 25, 63, 64, 100, 144, 255, 256, 400, 1024, 4099])
def test_row_sums_add_in_torchs_order(n: int) -> None:
    rng = np.random.default_rng(n)
    rows = 64 if n > 1000 else 500
    x = rng.random((rows, n)) * 10.0 ** rng.normal(0, 4, (rows, n))  # magnitudes far apart: the order shows
    ref = torch.from_numpy(x).sum(dim=-1).numpy()
    assert same_bits(torch_sums(x), ref)
    assert same_bits(torch_sums(np.ascontiguousarray(x.T), axis=0), ref)
    if n >= 64:  # a running sum differs: these inputs tell orders apart
        assert not same_bits(np.add.accumulate(x, axis=-1)[:, -1], ref)


@pytest.mark.parametrize(("seed", "block"), [(0, 10), (1, 10), (2, 5), (3, 3), (4, 16), (5, 2), (6, 1), (7, 20)])
@pytest.mark.parametrize("power", [1.0, 2.0, 3.0])
def test_dasymetric_children_are_the_torch_fill_bit_for_bit(seed: int, block: int, power: float) -> None:
    tot, w = _inputs(seed, block, np.float32 if seed % 2 else np.float64)
    ref = dasymetric_fill(torch.from_numpy(tot), torch.from_numpy(w), block, power).numpy()
    got = dasymetric_children(tot, w, block, power)
    assert got.dtype == np.float64 and same_bits(got, ref)
    static = w[:1, :, :1]  # a year-less layer broadcast over the batch and the years
    ref = dasymetric_fill(torch.from_numpy(tot), torch.from_numpy(static), block, power).numpy()
    assert same_bits(dasymetric_children(tot, static, block, power), ref)


@pytest.mark.parametrize("power", [0.5, 1.7, 0.3])
def test_other_powers_are_within_float64_rounding(power: float) -> None:
    """torch's ``pow`` (SLEEF) and numpy's differ in the last bits for other exponents."""
    tot, w = _inputs(11, 10)
    ref = dasymetric_fill(torch.from_numpy(tot), torch.from_numpy(w), 10, power).numpy()
    got = dasymetric_children(tot, w, 10, power)
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, rtol=1e-14, atol=0.0, equal_nan=True)
    sums = np.nansum(got.reshape(2, 1, 3, 7, 10, 9, 10), axis=(4, 6))
    ok = ~np.isnan(tot)
    np.testing.assert_allclose(sums[ok], tot[ok], rtol=1e-13, atol=0.0)


def test_zero_weight_blocks_are_uniform_and_nan_totals_nan() -> None:
    tot, w = _inputs(3, 4)
    kids = dasymetric_children(tot, w, 4)
    np.testing.assert_array_equal(kids[..., :4, :4], np.broadcast_to(tot[..., :1, :1] / 16, kids[..., :4, :4].shape))
    np.testing.assert_array_equal(kids[..., 4:8, :4], np.broadcast_to(tot[..., 1:2, :1] / 16, kids[..., 4:8, :4].shape))
    assert np.isnan(kids[0, 0, 0, 4:8, :12]).all() and not np.isnan(kids[0, 0, 0, :4]).any()
    assert (kids[~np.isnan(kids)] >= 0).all()


def test_uniform_children_are_the_torch_fill_bit_for_bit() -> None:
    tot, _ = _inputs(5, 3)
    for block in (1, 3, 10):
        assert same_bits(uniform_children(tot, block), uniform_fill(torch.from_numpy(tot), block).numpy())


def test_helpers_match_their_torch_counterparts() -> None:
    _, w = _inputs(2, 5)
    x = np.nan_to_num(w.astype(np.float64))
    assert np.array_equal(block_columns(x, 5), to_blocks(torch.from_numpy(x), 5).numpy().T)
    cleaned = torch.from_numpy(w.astype(np.float64)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0).numpy()
    assert np.array_equal(clean_weights(w, w.shape), cleaned)  # equal values (zero signs may differ)
    with pytest.raises(ValueError, match="do not broadcast"):
        dasymetric_children(np.ones((2, 3)), np.ones((7, 7)), 5)
    with pytest.raises(ValueError, match="power"):
        dasymetric_children(np.ones((2, 3)), np.ones((10, 15)), 5, power=0.0)


@pytest.mark.parametrize("name", sorted(n for n, m in REGISTRY.items() if m.numpy_fill))
def test_numpy_fill_of_every_method_is_its_fill(name: str) -> None:
    method = REGISTRY[name]
    tot, w = _inputs(8, 10, np.float32)
    layers = w[None]  # [L, ...] raw values, as the engine passes them
    ref = method.fill(torch.from_numpy(tot), torch.from_numpy(layers), 10).numpy()
    assert same_bits(method.fill_array(tot, layers, 10), ref)


def test_needs_torch() -> None:
    assert not needs_torch("uniform") and not needs_torch(" Dasymetric:lights ")
    assert needs_torch(None) and needs_torch("model") and needs_torch("auto") and needs_torch("points")
    assert needs_torch("nonsense")
