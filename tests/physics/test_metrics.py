"""Tests of models/metrics.py against hand computations and independent numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.metrics import (
    MetricAccumulator,
    balanced_mae,
    compute_metrics,
    mae,
    nonzero_mae,
    pearson,
    r2,
    relative_bias,
    rmse,
    topk_nonzero_mae,
)


def test_hand_made_values() -> None:
    truth = np.array([0.0, 0.0, 0.0, 1.0, 2.0, 10.0])
    pred = np.array([1.0, 0.0, 0.5, 2.0, 2.0, 7.0])
    assert mae(pred, truth) == pytest.approx((1 + 0 + 0.5 + 1 + 0 + 3) / 6)
    assert nonzero_mae(pred, truth) == pytest.approx(4 / 3)
    assert balanced_mae(pred, truth) == pytest.approx(0.5 * 0.5 + 0.5 * 4 / 3)
    # nonzero truth {1, 2, 10}: 0.5 quantile = 2 -> cells {2, 10}: errors {0, 3}
    assert topk_nonzero_mae(pred, truth, q=0.5) == pytest.approx(1.5)
    # 0.99 quantile = 2 + 0.98 * 8 = 9.84 -> only the 10 cell
    assert topk_nonzero_mae(pred, truth, q=0.99) == pytest.approx(3.0)
    assert relative_bias(pred, truth) == pytest.approx((12.5 - 13) / 13)
    assert rmse(pred, truth) == pytest.approx(math.sqrt((1 + 0.25 + 1 + 9) / 6))
    sst = np.sum((truth - truth.mean()) ** 2)
    assert r2(pred, truth) == pytest.approx(1 - 11.25 / sst)
    assert pearson(pred, truth) == pytest.approx(np.corrcoef(pred, truth)[0, 1])


def test_mask_nan_torch_and_edge_cases() -> None:
    truth = torch.tensor([0.0, 1.0, float("nan"), 4.0])
    pred = torch.tensor([0.0, 2.0, 5.0, float("nan")])
    assert nonzero_mae(pred, truth) == pytest.approx(1.0)
    mask = np.array([True, False, True, True])
    assert math.isnan(nonzero_mae(pred, truth, mask))
    assert balanced_mae(pred, truth, mask) == pytest.approx(0.0)  # only the zero half
    assert math.isnan(r2(np.ones(3), np.ones(3)))
    assert math.isnan(relative_bias(np.ones(3), np.zeros(3)))
    with pytest.raises(ValueError):
        mae(np.ones(3), np.ones(4))


def sparse_field(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    truth = np.where(rng.random(shape) < 0.3, rng.lognormal(2, 2, shape), 0.0)
    pred = np.abs(truth * rng.lognormal(0, 0.3, shape) + rng.random(shape) * 0.1)
    return pred, truth


def test_one_pass_matches_independent_numpy() -> None:
    rng = np.random.default_rng(0)
    pred, truth = sparse_field(rng, (3, 50, 40))
    m = compute_metrics(pred, truth)
    nz = truth > 0
    q99 = np.quantile(truth[nz], 0.99)
    q95 = np.quantile(truth[nz], 0.95)
    e = np.abs(pred - truth)
    expect = {
        "mae": e.mean(),
        "nonzero_mae": e[nz].mean(),
        "balanced_mae": 0.5 * e[~nz].mean() + 0.5 * e[nz].mean(),
        "top1_nonzero_mae": e[truth >= q99].mean(),
        "top5_nonzero_mae": e[truth >= q95].mean(),
        "rmse": np.sqrt(np.mean((pred - truth) ** 2)),
        "r2": 1 - np.sum((pred - truth) ** 2) / np.sum((truth - truth.mean()) ** 2),
        "pearson": np.corrcoef(pred.ravel(), truth.ravel())[0, 1],
        "relative_bias": pred.sum() / truth.sum() - 1,
    }
    for k, v in expect.items():
        assert m[k] == pytest.approx(v, rel=1e-6), k


@pytest.mark.parametrize("keep", [True, False])
def test_streaming_equals_one_pass(keep: bool) -> None:
    rng = np.random.default_rng(1)
    pred, truth = sparse_field(rng, (2, 300, 200))
    one = compute_metrics(pred, truth)
    acc = MetricAccumulator(keep_for_quantiles=keep)
    for t in range(2):
        for r in range(0, 300, 60):
            for c in range(0, 200, 50):
                acc.update(pred[t, r : r + 60, c : c + 50], truth[t, r : r + 60, c : c + 50])
    got = acc.result()
    for k in ("mae", "nonzero_mae", "balanced_mae", "rmse", "relative_bias", "sum_pred", "sum_truth", "n_nonzero"):
        assert got[k] == pytest.approx(one[k], rel=1e-12), k
    for k in ("r2", "pearson"):
        assert got[k] == pytest.approx(one[k], rel=1e-10), k
    for k in ("top1_nonzero_mae", "top5_nonzero_mae"):
        assert got[k] == pytest.approx(one[k], rel=1e-6 if keep else 1e-2), k
