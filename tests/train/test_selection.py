"""What ``downscale --method auto`` is told to use (``validation.selection``) in each regime, and
the validation score's floor under a baseline that happens to be exact."""

from __future__ import annotations

import pytest

from carbonsr_cli.train.validation import _val_score, selection

SCALES = (2, 4)
BASE = {s: {"best_label": "dasymetric:roads:length" if s == 2 else "fitted"} for s in SCALES}


def _row(score: float, model: float, uniform: float) -> dict[str, float]:
    """A history row: val score and the per-scale model / uniform Nonzero-MAE."""
    return {"val_score": score, **{f"s{s}_model_nonzero_mae": model for s in SCALES}, **{f"s{s}_uniform_nonzero_mae": uniform for s in SCALES}}


@pytest.mark.parametrize(
    ("rows", "initial", "method", "phrase"),
    [
        ([_row(0.80, 8.0, 40.0), _row(0.95, 9.0, 40.0)], (1.0, 0.3), "model", "x the best baseline's"),  # beats the baseline at 1 km
        ([_row(1.30, 13.0, 40.0), _row(1.20, 12.0, 40.0)], (1.10, 0.3), "model", "did not beat"),  # worse at 1 km, better than uniform
        ([_row(1.50, 15.0, 40.0)], (1.40, 0.35), "model", "did not beat"),  # the initial state is the judged one
        ([_row(4.00, 45.0, 40.0)], (5.0, 1.3), "dasymetric:roads:length", "validated best"),  # worse than uniform
    ],
)
def test_selection_keeps_the_model_unless_worse_than_uniform(rows: list[dict], initial: tuple[float, float], method: str, phrase: str) -> None:
    sel = selection(rows, BASE, SCALES, *initial)
    assert sel["method"] == method
    assert sel["score"] == pytest.approx(min([r["val_score"] for r in rows] + [initial[0]]))
    assert sel["baseline"] == "dasymetric:roads:length"  # the best at the smallest scale
    assert phrase in sel["reason"]


def test_selection_judges_the_state_with_the_best_score() -> None:
    sel = selection([_row(1.2, 44.0, 40.0)], BASE, SCALES, 1.5, 0.5)
    assert sel["score"] == pytest.approx(1.2) and sel["vs_uniform"] == pytest.approx(1.1) and sel["method"] != "model"


def test_selection_without_an_epoch_uses_the_baseline() -> None:
    assert selection([], BASE, SCALES, None)["method"] == "dasymetric:roads:length"


def test_val_score_floors_an_exact_baseline_at_one_percent_of_uniform() -> None:
    model = {2: {"nonzero_mae": 72.0}, 3: {"nonzero_mae": 190.0}}
    base = {2: {"best": {"nonzero_mae": 4e-14}, "uniform": {"nonzero_mae": 400.0}},
            3: {"best": {"nonzero_mae": 100.0}, "uniform": {"nonzero_mae": 470.0}}}
    # s=2: 72 / 4 = 18 (not 1.8e15); s=3: 1.9; weights 1/2 and 1/3
    assert _val_score(model, base, (2, 3)) == pytest.approx((18 / 2 + 1.9 / 3) / (1 / 2 + 1 / 3))
    assert _val_score(model, base, (2, 3), against="uniform") == pytest.approx((0.18 / 2 + 190 / 470 / 3) / (1 / 2 + 1 / 3))
