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
    conservation_report,
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


def test_conservation_report() -> None:
    rng = np.random.default_rng(2)
    totals = rng.random((2, 3, 4)) * 100
    totals[0, 1, 2] = np.nan
    children = np.repeat(np.repeat(totals / 100, 10, axis=-2), 10, axis=-1)
    rep = conservation_report(children, totals, 10)
    assert rep.ok and rep.blocks_checked == 23 and rep.cells_checked == 2300 and rep.nodata_blocks == 1
    assert rep.max_rel_error < 1e-13
    bad = children.copy()
    bad[1, 25, 33] += 0.5  # block (band 1, row 2, col 3)
    bad[0, 0, 0] = -1.0
    bad[1, 0, 0] = np.nan
    bad[0, 10, 20] = 1.0  # inside the nodata block
    rep = conservation_report(bad, totals, 10)
    assert not rep.ok
    assert rep.negatives == 1 and rep.nans == 1 and rep.nodata_mismatch == 1
    assert rep.worst_block == (1, 0, 0)  # the NaN block: infinite error
    bad[1, 0, 0] = children[1, 0, 0]
    rep = conservation_report(bad, totals, 10, offset=(5, 7))
    rel_a = 0.5 / totals[1, 2, 3]
    rel_b = abs(-1.0 - children[0, 0, 0]) / totals[0, 0, 0]
    assert rep.worst_block == ((1, 7, 10) if rel_a > rel_b else (0, 5, 7))
    assert rep.max_rel_error == pytest.approx(max(rel_a, rel_b))
    assert rep.max_abs_error == pytest.approx(max(0.5, abs(-1.0 - children[0, 0, 0])))
    # merge over windows and torch [B, 1, T, H, W]
    r1 = conservation_report(torch.from_numpy(children[None, None]), torch.from_numpy(totals[None, None]), 10)
    merged = r1.merge(conservation_report(bad, totals, 10))
    assert merged.blocks_checked == 46 and merged.negatives == 1
    d = merged.to_dict()
    assert "_worst_key" not in d and d["blocks_checked"] == 46


def test_conservation_report_zero_total_must_give_exact_zeros() -> None:
    totals = np.array([[[0.0, 5.0]]])
    children = np.zeros((1, 10, 20))
    children[:, :, 10:] = 0.05
    assert conservation_report(children, totals, 10).ok
    children[0, 3, 4] = 1e-9  # mass inside a block whose total is 0
    rep = conservation_report(children, totals, 10)
    assert rep.zero_total_violations == 1 and not rep.ok
