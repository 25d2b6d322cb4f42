"""Shared fixtures: small synthetic rasters and the generated sample data."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from raster_files import write_raster

os.environ.setdefault("OMP_NUM_THREADS", "2")
# The per-input cache (aux/cache.py) of this test session lives in a temporary folder,
# never in the user's ~/.cache (child processes inherit the variable).
if "CARBONSR_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="carbonsr-test-cache-")
    os.environ["CARBONSR_CACHE_DIR"] = _SESSION_CACHE
    atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)
# Idle OpenMP threads sleep instead of spinning: keeps a busy 2-core machine responsive.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default sample region (``carbonsr sample-data``), generated once per test session."""
    from carbonsr_cli.sample_data import generate_sample_data

    out = tmp_path_factory.mktemp("sample") / "data"
    generate_sample_data(out, seed=0)
    return out


# --- make_raster (geospatial core, issue 4) ------------------------------------------------


@pytest.fixture
def make_raster(tmp_path: Path):
    """Factory writing small GeoTIFFs under ``tmp_path``.

    Call as ``make_raster(name, array, crs="EPSG:32633", transform=None, nodata=None,
    descriptions=None, dtype=None, tags=None, tiled=False, compress=None) -> Path``; see
    :func:`write_raster` for the defaults.
    """

    def _make(name: str, array, crs="EPSG:32633", transform=None, nodata=None, descriptions=None, **kw) -> Path:
        return write_raster(tmp_path / name, array, crs, transform, nodata, descriptions, **kw)

    return _make
