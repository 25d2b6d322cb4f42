"""Fixtures for the model tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run model tests on one intra-op thread, restoring the previous setting afterwards.

    These tests use small tensors, where a second OpenMP thread gains little; on a shared,
    oversubscribed machine, OpenMP spin-waiting made the suite 14x slower with 2 threads
    (measured: 360 s vs 26 s at load average 7.5 on 2 cores).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
