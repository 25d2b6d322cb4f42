"""The context's collectives under torchrun with 2 CPU ranks (gloo)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_helpers import run_spec  # noqa: E402


def test_collectives_release_their_tensors(tmp_path: Path) -> None:
    """A CPU sum returns only once gloo's worker thread dropped the tensor (otherwise that thread
    may free the tensor's Python object while the process exits: SIGABRT); objects round-trip."""
    if not hasattr(torch.Tensor, "_use_count"):
        pytest.skip("this torch does not report tensor reference counts")
    res = run_spec("collectives", {"rounds": 200}, tmp_path / "coll.json")
    assert res["use_counts"] == [1]  # without the wait, about 30 % of the sums returned 4
    assert res["received"] == [{"from": 0, "values": [1.5, None, "x" * 300]}] * 2
    assert res["gathered"] == [["rank", 0], ["rank", 1]]
