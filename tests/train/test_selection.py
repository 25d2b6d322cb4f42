"""What ``downscale --method auto`` is told to use (``validation.selection``) in each regime."""

from __future__ import annotations

import pytest

from carbonsr_cli.train.validation import AUTO_FALLBACK_ABOVE, selection

SCALES = (2, 4)
BASE = {s: {"best_label": "dasymetric:roads:length" if s == 2 else "fitted"} for s in SCALES}


@pytest.mark.parametrize(
    ("scores", "initial", "method", "phrase"),
    [
        ([0.80, 0.95], 1.0, "model", "x the best baseline's"),  # beats the baseline at 1 km
        ([1.30, 1.20], 1.10, "model", "did not beat"),  # worse at 1 km, but within the limit: kept
        ([AUTO_FALLBACK_ABOVE + 0.5], AUTO_FALLBACK_ABOVE + 0.1, "dasymetric:roads:length", "validated best"),  # far worse
    ],
)
def test_selection_keeps_the_model_unless_far_worse(scores: list[float], initial: float, method: str, phrase: str) -> None:
    sel = selection([{"val_score": v} for v in scores], BASE, SCALES, initial)
    assert sel["method"] == method
    assert sel["score"] == pytest.approx(min(scores + [initial]))
    assert sel["baseline"] == "dasymetric:roads:length"  # the best at the smallest scale
    assert phrase in sel["reason"]


def test_selection_without_an_epoch_uses_the_baseline() -> None:
    assert selection([], BASE, SCALES, None)["method"] == "dasymetric:roads:length"
