"""Writing small GeoTIFFs for the tests (one writer for every test folder).

A module of its own, not ``conftest.py``: every test folder has a ``conftest`` module, so
``from conftest import ...`` would pick up the wrong one.
"""

from __future__ import annotations

from pathlib import Path


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


def write_north_up(
    path: Path,
    data,
    *,
    res: float | tuple[float, float],
    origin: tuple[float, float] = (500_000.0, 4_000_000.0),
    crs: str = "EPSG:32633",
    nodata: float | None = -9999.0,
    descriptions=None,
    dtype: str = "float32",
) -> Path:
    """Write ``data`` ``[bands, rows, cols]`` (or ``[rows, cols]``) as a north-up GeoTIFF.

    ``res`` is the cell size (or ``(x, y)`` sizes) in CRS units from the top-left ``origin``;
    values are cast to ``dtype``.
    """
    from rasterio.transform import from_origin

    rx, ry = (res, res) if not isinstance(res, tuple) else res
    return write_raster(path, data, crs, from_origin(origin[0], origin[1], rx, ry), nodata, descriptions, dtype=dtype)
