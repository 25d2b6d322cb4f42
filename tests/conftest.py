"""Shared fixtures: small synthetic rasters and the generated sample data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default sample region (``carbonsr sample-data``), generated once per test session."""
    from carbonsr_cli.sample_data import generate_sample_data

    out = tmp_path_factory.mktemp("sample") / "data"
    generate_sample_data(out, seed=0)
    return out
