"""Tests of carbonsr_cli.conservation on arrays (the one conservation module: issue 16)."""

from __future__ import annotations

import dataclasses

import numpy as np

from carbonsr_cli.conservation import BandConservation, ConservationCheck, ConservationReport, check_blocks


def _children(totals: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(totals / 100, 10, axis=-2), 10, axis=-1)


def test_check_blocks_counts_every_violation() -> None:
    rng = np.random.default_rng(2)
    totals = rng.random((3, 4)) * 100
    totals[1, 2] = np.nan
    children = _children(totals)
    children[10:20, 20:30] = np.nan  # nodata block: children nodata too
    rep = check_blocks(children, totals, 10, child_nodata=float("nan"))
    assert rep.ok is True and rep.parent_cells == 11 and rep.max_rel_err < 1e-13
    bad = children.copy()
    bad[25, 33] += 0.5  # block (2, 3)
    bad[0, 0] = -1.0
    rep = check_blocks(bad, totals, 10, child_nodata=float("nan"))
    assert rep.ok is False and rep.negatives == 1 and rep.failed_blocks == 2
    assert (rep.worst.row, rep.worst.col) == (0, 0)  # the negative child: infinite score
    bad[0, 0] = children[0, 0]
    rep = check_blocks(bad, totals, 10, child_nodata=float("nan"))
    assert (rep.worst.row, rep.worst.col) == (2, 3)
    assert abs(rep.max_abs_err - 0.5) < 1e-12


def test_zero_total_must_give_exact_zeros() -> None:
    totals = np.array([[0.0, 5.0]])
    children = np.zeros((10, 20))
    children[:, 10:] = 0.05
    assert check_blocks(children, totals, 10).ok
    children[3, 4] = 1e-9  # mass inside a block whose total is 0
    rep = check_blocks(children, totals, 10)
    assert rep.failed_blocks == 1 and not rep.ok


def test_ok_is_a_plain_bool_everywhere() -> None:
    """``assert rep.ok`` must be able to fail: ``ok`` is a bool (a field or a property), never a
    method."""
    assert isinstance(ConservationCheck().finish().ok, bool)
    assert isinstance(BandConservation(name="x").ok, bool)
    assert isinstance(ConservationReport("a", "b", 10, 1e-6, 0.0, []).ok, bool)
    assert not callable(ConservationCheck().ok)
    bad = dataclasses.replace(ConservationCheck(), negatives=1).finish()
    assert bad.ok is False
