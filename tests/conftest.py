"""Shared fixtures: small synthetic rasters and the generated sample data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
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


def write_raster(
    path: Path,
    array,
    crs="EPSG:32633",
    transform=None,
    nodata=None,
    descriptions=None,
    *,
    dtype=None,
    tags=None,
    tiled: bool = False,
    compress: str | None = None,
) -> Path:
    """Write ``array`` (``[rows, cols]`` or ``[bands, rows, cols]``) as a GeoTIFF at ``path``.

    Defaults: EPSG:32633 (UTM 33N), 1 km cells from origin (500000, 4000000). ``crs=None``
    writes a raster without CRS; ``transform`` may be any ``affine.Affine`` (rotated too).
    """
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[None]
    if transform is None:
        transform = from_origin(500000.0, 4000000.0, 1000.0, 1000.0)
    profile = {
        "driver": "GTiff",
        "width": arr.shape[2],
        "height": arr.shape[1],
        "count": arr.shape[0],
        "dtype": dtype or arr.dtype.name,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
    }
    if tiled:
        profile.update(tiled=True, blockxsize=16, blockysize=16)
    if compress:
        profile["compress"] = compress
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning for crs=None / odd transforms
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(arr.astype(profile["dtype"]))
            if descriptions:
                for i, d in enumerate(descriptions, start=1):
                    ds.set_band_description(i, d)
            if tags:
                ds.update_tags(**tags)
    return path


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
