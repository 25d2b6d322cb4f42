"""Files of ``carbonsr sample-data`` besides the emissions: aux rasters in several grids and CRSs,
the roads GeoPackage, the plant catalogue and the README."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from carbonsr_cli.sample_world import (
    CATALOGUE_SIGMA,
    CHILD_RES_M,
    CRS,
    EMISSION_UNITS,
    FACTOR,
    LANDCOVER_CLASSES,
    LANDCOVER_NODATA,
    NODATA,
    PARENT_RES_M,
    ROAD_WEIGHTS,
    _GTIFF,
    _LIGHTS_OFFSET_M,
    _LIGHTS_RES_M,
    _MARGIN,
    _NDVI_RES_DEG,
    _Plant,
    _World,
    _blur,
    _from_origin,
    _gauss_kernel,
    _pixel_to_crs,
    _smooth_field,
)

if TYPE_CHECKING:
    from carbonsr_cli.sample_data import SampleData


def _write_aux(
    paths: SampleData, rng: np.random.Generator, world: _World, ext_transform: Any, plants: list[_Plant], *, seed: int, size_km: int
) -> None:
    import rasterio
    from rasterio.warp import Resampling, reproject, transform_bounds

    ne = world.ne
    common = {**_GTIFF, "crs": CRS}

    def write(path: Path, arr: np.ndarray, transform: Any, nodata: float | int, crs: str = CRS, **tags: str) -> None:
        with rasterio.open(
            path, "w", **{**common, "crs": crs}, width=arr.shape[1], height=arr.shape[0], count=1, dtype=arr.dtype, transform=transform, nodata=nodata
        ) as dst:
            dst.write(arr, 1)
            dst.update_tags(SEED=str(seed), **tags)

    write(paths.population, world.population, ext_transform, NODATA, UNITS="persons / cell", CARBONSR_KIND="continuous")
    write(paths.builtup, world.builtup, ext_transform, NODATA, UNITS="fraction (0..1)", CARBONSR_KIND="continuous")
    classes = ";".join(f"{k}={v}" for k, v in LANDCOVER_CLASSES.items())
    write(paths.landcover, world.landcover, ext_transform, LANDCOVER_NODATA, CARBONSR_KIND="categorical", CLASSES=classes)

    # night-time lights: radiance at 100 m -> 500 m grid offset by 250 m -> blooming -> DN 0..63
    rad = 40.0 * world.builtup + 2.0 * np.sqrt(world.population)
    rad += 0.05 * world.road_weight * (world.road_weight >= 0.5 * ROAD_WEIGHTS["primary"])
    for p in plants:
        rad[p.rows, p.cols] += 6.0
    rad = rad.astype(np.float32)
    left = ext_transform.c + (_MARGIN * CHILD_RES_M - 3000.0) + _LIGHTS_OFFSET_M
    top = ext_transform.f - (_MARGIN * CHILD_RES_M - 3000.0) - _LIGHTS_OFFSET_M
    n_l = int((ne * CHILD_RES_M - 2 * _LIGHTS_OFFSET_M) // _LIGHTS_RES_M)
    l_transform = _from_origin(left, top, _LIGHTS_RES_M, _LIGHTS_RES_M)
    lights = np.zeros((n_l, n_l), np.float32)
    reproject(rad, lights, src_transform=ext_transform, src_crs=CRS, dst_transform=l_transform, dst_crs=CRS, resampling=Resampling.average)
    del rad
    lights = _blur(lights, _gauss_kernel(1.5))
    lights = np.clip(np.floor(1.2 * lights + rng.uniform(0, 2.5, lights.shape)), 0, 63).astype(np.float32)
    write(paths.lights, lights, l_transform, NODATA, UNITS="DN (0..63, saturating)", CARBONSR_KIND="continuous")
    del lights

    # NDVI on the UTM grid, then reprojected to EPSG:4326 at 0.001 degree
    base = np.zeros(256, np.float32)
    base[[10, 20, 50, 80, 90]] = [0.55, 0.78, 0.18, -0.08, 0.32]
    ndvi = base[world.landcover] - 0.35 * world.builtup + 0.06 * _smooth_field(rng, (ne, ne), 10)
    ndvi += np.float32(0.02) * rng.standard_normal((ne, ne), dtype=np.float32)
    ndvi = np.clip(ndvi, -0.2, 0.9).astype(np.float32)
    x0 = ext_transform.c + (_MARGIN - FACTOR) * CHILD_RES_M  # region + 1 km
    y1 = ext_transform.f - (_MARGIN - FACTOR) * CHILD_RES_M
    span = (size_km + 2) * PARENT_RES_M
    w, s, e, nn = transform_bounds(CRS, "EPSG:4326", x0, y1 - span, x0 + span, y1, densify_pts=51)
    r = _NDVI_RES_DEG
    w, s, e, nn = math.floor(w / r) * r, math.floor(s / r) * r, math.ceil(e / r) * r, math.ceil(nn / r) * r
    g_transform = _from_origin(w, nn, r, r)
    out = np.full((int(round((nn - s) / r)), int(round((e - w) / r))), NODATA, np.float32)
    reproject(
        ndvi, out, src_transform=ext_transform, src_crs=CRS, dst_transform=g_transform, dst_crs="EPSG:4326",
        resampling=Resampling.bilinear, dst_nodata=NODATA, init_dest_nodata=True,
    )  # fmt: skip
    del ndvi
    write(paths.ndvi, out, g_transform, NODATA, crs="EPSG:4326", UNITS="NDVI (-0.2..0.9)", CARBONSR_KIND="continuous")

    _write_roads(paths.roads, world.roads, ext_transform)



@contextlib.contextmanager
def _fixed_gpkg_date() -> Iterator[None]:
    """Write GeoPackages with a fixed modification time, so the same seed gives identical bytes."""
    from pyogrio import get_gdal_config_option, set_gdal_config_options

    old = get_gdal_config_option("OGR_CURRENT_DATE")
    set_gdal_config_options({"OGR_CURRENT_DATE": "2000-01-01T00:00:00.000Z"})
    try:
        yield
    finally:
        set_gdal_config_options({"OGR_CURRENT_DATE": old})



def _write_roads(path: Path, roads: dict[str, list[np.ndarray]], ext_transform: Any) -> None:
    import geopandas as gpd
    from shapely import linestrings

    to_xy = _pixel_to_crs(ext_transform)
    classes: list[str] = []
    coords: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    k = 0
    for cls, lines in roads.items():
        for p in lines:
            coords.append(np.round(to_xy(p), 1))
            ids.append(np.full(len(p), k))
            classes.append(cls)
            k += 1
    geoms = linestrings(np.concatenate(coords), indices=np.concatenate(ids)) if coords else []
    gdf = gpd.GeoDataFrame({"class": classes}, geometry=list(geoms), crs=CRS)
    with _fixed_gpkg_date():
        gdf.to_file(path, driver="GPKG", layer="roads", engine="pyogrio")



def _write_catalogue(
    path: Path, rng: np.random.Generator, plants: list[_Plant], first_totals: list[float], ext_transform: Any
) -> np.ndarray:
    """Write the incomplete plant catalogue ``plants.gpkg`` (see the module docstring); returns the
    indices into ``plants`` of the plants listed (increasing; ``plant NN`` is index + 1).

    ``first_totals``: each plant's first-year emission in t CO2 / yr (its rate when it opens
    for a plant that opens later).
    """
    import geopandas as gpd
    from shapely import points

    n = len(plants)
    noise = np.exp(CATALOGUE_SIGMA * rng.standard_normal(n) - CATALOGUE_SIGMA**2 / 2)
    u = rng.random(n)
    keep = u >= 1.0 / 3.0
    if not keep.any():
        keep[int(np.argmax(u))] = True
    if n >= 3 and keep.all():
        keep[int(np.argmin(u))] = False
    to_xy = _pixel_to_crs(ext_transform)
    idx = np.flatnonzero(keep)
    centres = np.array([[p.cols[np.argmax(p.shares)] + 0.5, p.rows[np.argmax(p.shares)] + 0.5] for p in plants], np.float64)
    xy = to_xy(centres[idx]) if len(idx) else np.zeros((0, 2))
    gdf = gpd.GeoDataFrame(
        {
            "name": [f"plant {i + 1:02d}" for i in idx],
            "co2_t_yr": np.round(np.asarray(first_totals, np.float64)[idx] * noise[idx], 1),
        },
        geometry=list(points(xy)),
        crs=CRS,
    )
    with _fixed_gpkg_date():
        gdf.to_file(path, driver="GPKG", layer="plants", engine="pyogrio")
    return idx



def _write_readme(
    paths: SampleData,
    *,
    seed: int,
    size_km: int,
    years: tuple[int, ...],
    n_plants: int,
    n_listed: int | None = None,
    kind: str = "mixed",
    process: str = "",
) -> None:
    """README.txt of a sample region; ``process`` is the description of the generative process
    (the docstring of :mod:`carbonsr_cli.sample_data`)."""
    doc = process.strip()
    text = f"""carbonsr synthetic sample region
================================

Generated by `carbonsr sample-data` (carbonsr_cli.sample_data) with seed={seed},
size_km={size_km}, years={", ".join(map(str, years))}, kind={kind}. Everything is synthetic.

Files
-----
emissions_1km.tif   1 km parent raster, {size_km} x {size_km} cells, {CRS} (UTM 50N), float32,
                    one band per year (band description = year), totals in
                    "{EMISSION_UNITS}" (tag UNITS), nodata {NODATA:g} over the sea.
truth_100m.tif      100 m child field, same CRS, exactly aligned (10 x 10 children per
                    parent); the 1 km values are its 10 x 10 block sums (float64 sum of
                    the stored float32 values, relative error < 1e-6). For EVALUATION
                    ONLY: nothing may train on it. Nodata {NODATA:g} over the sea.
aux/                auxiliary layers; pass them all with `--aux OUT_DIR/aux/*`:
  lights_500m.tif      night-time lights, DMSP-like DN 0..63 (saturating in city
                       cores, blurred / blooming), 500 m grid offset by 250 m.
  population_100m.tif  persons per 100 m cell (100 m grid with a 3 km margin).
  ndvi_4326.tif        NDVI -0.2..0.9 in EPSG:4326 at 0.001 degree (needs reprojection).
  landcover_100m.tif   CATEGORICAL uint8 codes (GDAL tag CARBONSR_KIND=categorical):
                       10 cropland, 20 forest, 50 built-up, 80 water, 90 other;
                       nodata 0.
  builtup_100m.tif     built-up fraction 0..1 per 100 m cell.
  roads.gpkg           LineStrings (layer "roads"), attribute `class` in
                       motorway / primary / secondary / residential.
plants.gpkg         incomplete point catalogue of the plants (layer "plants", {CRS}):
                    `name`, `co2_t_yr` (first-year emission, t CO2 / yr, lognormal
                    noise sigma {CATALOGUE_SIGMA:g}); not in aux/. Use it as an extra aux
                    layer: `--aux OUT_DIR/plants.gpkg:co2_t_yr`.
README.txt          this file.

{n_plants} industrial point sources (including any plant that opens later); the
catalogue lists {n_listed if n_listed is not None else n_plants} of them.

Generative process
------------------
{doc}
"""
    paths.readme.write_text(text, encoding="utf-8")
