"""The mass prior's gate (``validation.score_initial_state``): the correction is kept, scaled or
dropped by how much better the network validates with it than with the fitted mix alone."""

from __future__ import annotations

import math

import pytest
import torch

from carbonsr_cli.train.validation import MASS_GATE_RAMP, mass_strength, score_initial_state
from models.mass_prior import MassPrior

SCALES = (2, 4)
BASE = {s: {"best": {"nonzero_mae": 10.0}, "uniform": {"nonzero_mae": 50.0}} for s in SCALES}


@pytest.mark.parametrize(("ratio", "strength"), [(0.5, 1.0), (0.80, 1.0), (0.85, 0.5), (0.88, 0.2), (0.90, 0.0), (1.3, 0.0), (math.nan, 0.0)])
def test_strength_is_one_below_the_ramp_zero_above_and_linear_between(ratio: float, strength: float) -> None:
    assert MASS_GATE_RAMP == (0.80, 0.90)
    assert mass_strength(ratio) == pytest.approx(strength)


class _Net:
    """A network whose prior is a real :class:`MassPrior` with a non-zero correction."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.prior = MassPrior(2, hidden=4, smooth=(1,), exponents=(1.0,), mix_smooth=(1,))
        with torch.no_grad():
            self.prior.mlp[-1].weight.fill_(0.5)
            self.prior.mlp[-1].bias.fill_(0.25)

    def strength(self) -> float:
        """The correction's last-layer bias relative to the one set above (0 = the mix)."""
        return float(self.prior.mlp[-1].bias) / 0.25


def _scorer(net: _Net, with_correction: float, mix: float) -> object:
    """Scores (Nonzero-MAE at every scale, baseline 10) interpolating linearly in the correction's strength."""
    calls = []

    def score() -> dict[int, dict[str, float]]:
        a = net.strength()
        calls.append(a)
        return {s: {"nonzero_mae": 10.0 * (a * with_correction + (1 - a) * mix)} for s in SCALES}

    score.calls = calls  # type: ignore[attr-defined]
    return score


@pytest.mark.parametrize(("with_correction", "strength"), [(0.70, 1.0), (0.85, 0.5), (0.95, 0.0)])
def test_the_gate_keeps_scales_or_drops_the_correction(with_correction: float, strength: float) -> None:
    net = _Net()
    score = _scorer(net, with_correction, 1.0)
    val, vs_uniform, gate = score_initial_state(net, score, BASE, SCALES)
    assert gate["strength"] == pytest.approx(strength)
    assert gate["kept"] == (strength > 0)
    assert gate["with_correction"] == pytest.approx(with_correction) and gate["mix"] == pytest.approx(1.0)
    assert net.strength() == pytest.approx(strength)  # the network starts from that state
    expected = strength * with_correction + (1 - strength) * 1.0
    assert val == pytest.approx(expected)  # the score of the state the network starts from
    assert vs_uniform == pytest.approx(expected / 5.0)
    assert ("scaled" in gate) == (0 < strength < 1)
    # scored with the correction, without it, and at a partial strength only when there is one
    assert score.calls == pytest.approx([1.0, 0.0] + ([strength] if 0 < strength < 1 else []))  # type: ignore[attr-defined]


def test_a_prior_without_a_correction_is_scored_once() -> None:
    class Plain:
        prior = torch.nn.Identity()

    calls = []

    def score() -> dict[int, dict[str, float]]:
        calls.append(1)
        return {s: {"nonzero_mae": 8.0} for s in SCALES}

    assert score_initial_state(Plain(), score, BASE, SCALES) == (pytest.approx(0.8), pytest.approx(0.16), {})
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("gate", "phrase"),
    [
        ({"with_correction": 0.70, "mix": 1.0, "strength": 1.0, "kept": True}, "kept in full; with it the model validated 0.700 x"),
        ({"with_correction": 0.864, "mix": 1.0, "strength": 0.36, "kept": True}, "kept at 36% of its strength; with it the model validated 0.864 x"),
        ({"with_correction": 0.95, "mix": 1.0, "strength": 0.0, "kept": False}, "dropped (the model is the fitted mix); with it the model validated 0.950 x"),
        ({"with_correction": 0.8, "mix": 1.0, "kept": True}, "kept in full"),  # a record from before the ramp
    ],
)
def test_the_train_report_says_what_the_gate_did(gate: dict, phrase: str) -> None:
    from carbonsr_cli.train.validation import describe_mass_gate

    text = describe_mass_gate(gate)
    assert text is not None and phrase in text, text
    assert "(kept in full below 0.80, dropped above 0.90)" in text
    assert describe_mass_gate({}) is None


def test_a_configured_ramp_is_used_and_recorded() -> None:
    """``TrainConfig.mass_gate_ramp``: 0.85 x the mix keeps half the correction under the default
    ramp and all of it under (0.9, 1.0); the record keeps the ramp for the train report."""
    from carbonsr_cli.train.validation import describe_mass_gate

    net = _Net()
    _, _, gate = score_initial_state(net, _scorer(net, 0.85, 1.0), BASE, SCALES, (0.9, 1.0))
    assert gate["strength"] == pytest.approx(1.0) and gate["ramp"] == [0.9, 1.0]
    text = describe_mass_gate(gate)
    assert text is not None and "(kept in full below 0.90, dropped above 1.00)" in text, text


@pytest.mark.parametrize("ramp", [[0.9, 0.9], [0.9, 0.8], [0.0, 0.5], [0.8]])
def test_a_ramp_that_cannot_work_is_refused(ramp: list[float]) -> None:
    from carbonsr_cli.errors import UsageError
    from carbonsr_cli.train.config import TrainConfig

    with pytest.raises(UsageError, match="mass_gate_ramp"):
        TrainConfig(main=["m.tif"], aux=["a.tif"], mass_gate_ramp=ramp).validate()
    TrainConfig(main=["m.tif"], aux=["a.tif"], mass_gate_ramp=[0.85, 0.95]).validate()
    with pytest.raises(UsageError, match="--fit-buffer"):
        TrainConfig(main=["m.tif"], aux=["a.tif"], fit_buffer=-1).validate()
