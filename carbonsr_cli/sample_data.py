"""Deterministic synthetic sample region: 1 km emissions, 100 m truth and auxiliary layers.

``generate_sample_data(out_dir, seed=0)`` writes a small but realistic region in
UTM zone 50N (EPSG:32650) so that every command of carbonsr can be tried and
tested without downloading anything. The region is ``size_km x size_km``
kilometres: ``size_km x size_km`` parent cells of 1000 m and ``10 size_km x 10
size_km`` child cells of 100 m (factor 10).

Generative process (all on an internal 100 m grid that extends 3 km beyond the
region, so that auxiliary layers cover the region with a margin):

1. **Coast and water.** The south-east corner is sea (whole 1 km cells; nodata in
   the emission rasters). A river runs from the north edge to the sea and a few
   lakes are scattered on land (land cover "water", zero emissions, valid cells).
2. **Terrain and land cover.** A smooth random "hilliness" field puts forest on
   the hills; built-up land follows the cities; the rest is cropland with a few
   patches of "other" land. Codes: 10 cropland, 20 forest, 50 built-up, 80 water,
   90 other (uint8, nodata 0).
3. **Settlements.** Cities (about one per 1500 km2) with exponentially decaying
   population density and lognormal texture; villages (about one per 25 km2) as
   small Gaussian blobs; scattered farmhouses. Population is in persons per
   100 m cell; built-up fraction (0..1) follows a different, steeper urban profile.
4. **Roads.** Motorways and primary roads connect nearby cities, primary roads
   radiate from cities, a jittered lattice of secondary roads covers the
   country, and residential streets fill cities and villages.
5. **Emissions (t CO2 / cell / yr, totals per cell):**
   - traffic: road length per 100 m cell weighted by class (motorway 250,
     primary 80, secondary 20, residential 4 t CO2 per 100 m of road per year), times
     ``1 + 1.5 U`` (U = urban intensity), spread over neighbouring cells with a
     3x3 kernel (road buffer);
   - residential heating: ``0.8 * population ** 0.75`` (nonlinear: per-capita
     emissions fall with density), times a north-south climate factor 1.0..1.5;
   - zero over forest and water; child cells below 0.5 t are zero; 1 km cells
     whose total activity is below ``max(50 t, 66th percentile of land cells)``
     are zero entirely (so more than 60 % of 1 km land cells are exactly zero);
   - industrial point sources (about one per 1500 km2, at least 4): each a
     footprint of 1-4 child cells inside one 1 km cell, total about 1500 times
     (300..8000 times) the median nonzero 1 km cell (the two largest at least
     1300 times, a new plant at least 800 times), nearly
     invisible in night-time lights (+6 radiance per 100 m cell);
   - years: traffic grows by 3 % +- 3 % per year and heating changes by
     -2 % +- 2 % per year (smooth spatial pattern of growth rates); every plant
     has its own trend; a new plant starts in the middle year and one plant
     closes in the last year (with two or more years); multiplicative lognormal
     noise (sigma 0.15 per child cell and year; 0.05 per plant and year).
6. **Truth and totals.** The 100 m truth is generated in float64 and stored as
   float32; the 1 km totals are the float64 sums of the stored float32 truth
   over each 10x10 block, stored as float32, so they agree to float32 rounding
   (relative error < 1e-7). No single auxiliary layer explains the emissions.
7. **Auxiliary layers** (written to ``aux/``): night-time lights on a 500 m grid
   offset by 250 m (DMSP-like digital numbers 0..63, saturated in city cores,
   Gaussian blooming), population and built-up fraction and land cover on the
   100 m grid with a 3 km margin, NDVI (-0.2..0.9) reprojected to EPSG:4326 at
   0.001 degree, and ``roads.gpkg`` (LineStrings with attribute ``class``).
8. **Point catalogue** (``plants.gpkg`` in the root, not in ``aux/``, so ``--aux aux/*``
   leaves it out; use it as ``--aux plants.gpkg:co2_t_yr``): one Point per listed plant at
   the centre of its largest footprint cell, with ``name`` and ``co2_t_yr`` = the plant's
   emission in the first year (t CO2 / yr; for a plant that opens later, its rate when it
   opens) times lognormal noise (sigma 0.3). Like a real register it is incomplete: about a
   third of the plants are left out at random (at least one is listed, and at least one is
   left out when there are three or more). Drawn last, so it changes no other file.

Region kinds (``kind=``, one set of multipliers of the process above, :data:`KINDS`):

- ``"mixed"`` (default): the process as described (all multipliers 1).
- ``"points"``: point-source dominated: 4 times as many plants (at least 8), 2.5 times as
  large, traffic and heating halved.
- ``"traffic"``: street dominated: traffic emissions x2.5 on a secondary road lattice of
  3 km instead of 6 km, heating x0.15, half as many plants (at least 2) half as large.
- ``"urban"``: smooth urban: heating x1.5, traffic x0.2, one small plant (1/20 of the
  usual size; plus the plant that opens later when there are two or more years).

Everything is drawn from one ``numpy.random.Generator(PCG64(seed))``: the same
seed and kind give identical arrays, a different seed a different region.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from carbonsr_cli.errors import OutputError, UsageError

#: Child cells per parent cell along each axis.
FACTOR = 10
#: Parent (1 km) and child (100 m) cell sizes in metres.
PARENT_RES_M = 1000.0
CHILD_RES_M = 100.0
#: Projected CRS of the region (UTM zone 50N).
CRS = "EPSG:32650"
#: Nodata of every float raster written here.
NODATA = -9999.0
#: Land cover nodata and class codes.
LANDCOVER_NODATA = 0
LANDCOVER_CLASSES: dict[int, str] = {10: "cropland", 20: "forest", 50: "built-up", 80: "water", 90: "other"}
#: Road classes and their traffic emission in t CO2 / yr per 100 m of road.
ROAD_WEIGHTS: dict[str, float] = {"motorway": 250.0, "primary": 80.0, "secondary": 20.0, "residential": 4.0}
#: Region kinds: multipliers and parameters of the generative process ("mixed": the plain process).
#: traffic/heating scale those emissions; plants_per_1500km2, min_plants and plant_size set the
#: number (per 1500 km2 of the extended grid's region) and size of the plants; lattice_cells is the
#: spacing of the secondary road lattice in child cells.
KINDS: dict[str, dict[str, float]] = {
    "mixed": {"traffic": 1.0, "heating": 1.0, "plants_per_1500km2": 1.0, "min_plants": 4, "plant_size": 1.0, "lattice_cells": 60.0},
    "points": {"traffic": 0.5, "heating": 0.5, "plants_per_1500km2": 4.0, "min_plants": 8, "plant_size": 2.5, "lattice_cells": 60.0},
    "traffic": {"traffic": 2.5, "heating": 0.15, "plants_per_1500km2": 0.0, "min_plants": 1, "plant_size": 0.02, "lattice_cells": 30.0},
    "urban": {"traffic": 0.2, "heating": 1.5, "plants_per_1500km2": 0.0, "min_plants": 1, "plant_size": 0.05, "lattice_cells": 60.0},
}
#: Sigma of the lognormal noise of the catalogue's ``co2_t_yr`` values.
CATALOGUE_SIGMA = 0.3
#: Units tag of the emission rasters.
EMISSION_UNITS = "t CO2 / cell / yr"

_MARGIN_PARENT = 3  # margin of the internal grid, in parent cells (3 km)
_MARGIN = _MARGIN_PARENT * FACTOR  # in child cells
_X_CENTRE = 500_000.0  # easting of the region's centre (central meridian of zone 50)
_Y_TOP = 3_600_000.0  # northing of the region's top edge (about 32.5 N)
_NDVI_RES_DEG = 0.001
_LIGHTS_RES_M = 500.0
_LIGHTS_OFFSET_M = 250.0
_STRIP = 1280  # rows of child cells per strip in the yearly loop (multiple of 256 and of FACTOR)
_GTIFF = {"driver": "GTiff", "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}


@dataclass(frozen=True)
class SampleData:
    """Paths of a generated sample region (all inside ``root``).

    Attributes:
        root: The output directory.
        emissions: ``emissions_1km.tif``, one band per year, t CO2 / cell / yr.
        truth: ``truth_100m.tif``, the 100 m field (evaluation only).
        aux_dir: ``aux/``, every auxiliary layer (pass ``--aux ROOT/aux/*``).
        lights, population, ndvi, landcover, builtup, roads: the auxiliary layers.
        plants: ``plants.gpkg``, the incomplete point catalogue of plants (``co2_t_yr``, ``name``),
            in the root (not in ``aux/``).
        readme: ``README.txt``.
        years: The years (band order).
        seed: The random seed.
        size_km: Edge of the region in km (= parent cells per side).
        kind: Region kind (a key of :data:`KINDS`).
    """

    root: Path
    emissions: Path
    truth: Path
    aux_dir: Path
    lights: Path
    population: Path
    ndvi: Path
    landcover: Path
    builtup: Path
    roads: Path
    plants: Path
    readme: Path
    years: tuple[int, ...]
    seed: int
    size_km: int
    kind: str = "mixed"
    crs: str = CRS

    @property
    def aux_paths(self) -> list[Path]:
        """Every auxiliary layer, in a stable order."""
        return [self.lights, self.population, self.ndvi, self.landcover, self.builtup, self.roads]

    @property
    def files(self) -> list[Path]:
        """Every file written, in a stable order."""
        return [self.emissions, self.truth, *self.aux_paths, self.plants, self.readme]


def _layout(root: Path, *, years: tuple[int, ...], seed: int, size_km: int, kind: str = "mixed") -> SampleData:
    aux = root / "aux"
    return SampleData(
        root=root,
        emissions=root / "emissions_1km.tif",
        truth=root / "truth_100m.tif",
        aux_dir=aux,
        lights=aux / "lights_500m.tif",
        population=aux / "population_100m.tif",
        ndvi=aux / "ndvi_4326.tif",
        landcover=aux / "landcover_100m.tif",
        builtup=aux / "builtup_100m.tif",
        roads=aux / "roads.gpkg",
        plants=root / "plants.gpkg",
        readme=root / "README.txt",
        years=years,
        seed=seed,
        size_km=size_km,
        kind=kind,
    )


def generate_sample_data(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    size_km: int = 96,
    years: Sequence[int] = (2019, 2020, 2021),
    overwrite: bool = False,
    kind: str = "mixed",
) -> SampleData:
    """Write a deterministic synthetic region (see the module docstring) to ``out_dir``.

    The files are written into a temporary sibling directory that is renamed to
    ``out_dir`` only when complete; with ``overwrite`` the old directory is
    replaced only after the new one is complete.

    Args:
        out_dir: Directory to create. It must not exist or be empty unless ``overwrite``.
        seed: Random seed; the same seed gives identical arrays.
        size_km: Edge of the square region in km (1 km parent cells per side), >= 12.
        years: Years to generate, one band each (distinct, 1000..9999).
        overwrite: Replace an existing non-empty ``out_dir``.
        kind: Region kind, a key of :data:`KINDS`: ``"mixed"``, ``"points"``, ``"traffic"``
            or ``"urban"`` (see the module docstring).

    Returns:
        The paths of every file written (inside ``out_dir``).

    Raises:
        OutputError: ``out_dir`` is not empty (without ``overwrite``), is a file,
            or cannot be written.
        UsageError: Bad ``size_km``, ``years`` or ``kind``.
    """
    years_t = _check_years(years)
    if kind not in KINDS:
        raise UsageError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    size_km = int(size_km)
    if size_km < 12:
        raise UsageError(f"--size-km must be at least 12 (one 12 x 12 km patch), got {size_km}")
    seed = int(seed)
    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")
    dest = Path(out_dir).expanduser().absolute()
    _check_destination(dest, overwrite)
    tmp = _make_temp_sibling(dest)
    try:
        import rasterio

        try:
            with rasterio.Env(GDAL_CACHEMAX=128):  # MB; bounded write cache for large regions
                layout = _layout(tmp, years=years_t, seed=seed, size_km=size_km, kind=kind)
                _generate(layout, seed=seed, size_km=size_km, years=years_t, kind=kind)
        except OSError as exc:  # disk full, quota, the directory removed under us, ...
            raise OutputError(f"cannot write the sample data ({exc})", dest) from None
        _move_into_place(tmp, dest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _layout(dest, years=years_t, seed=seed, size_km=size_km, kind=kind)


# ----------------------------------------------------------------------------- safety


def _check_years(years: Sequence[int]) -> tuple[int, ...]:
    try:
        years_t = tuple(int(y) for y in years)
    except (TypeError, ValueError):
        raise UsageError(f"--years must be integers, got {list(years)!r}") from None
    if not years_t:
        raise UsageError("--years needs at least one year")
    if len(set(years_t)) != len(years_t):
        raise UsageError(f"--years has duplicates: {list(years_t)}")
    if any(y < 1000 or y > 9999 for y in years_t):
        raise UsageError(f"--years must be 4-digit years, got {list(years_t)}")
    if list(years_t) != sorted(years_t):
        raise UsageError(f"--years must be increasing, got {list(years_t)}")
    return years_t


def _foreign_entries(dest: Path) -> list[str]:
    """Entries of ``dest`` that ``sample-data`` does not write (empty for an old sample region)."""
    known = {p.relative_to(dest).as_posix() for p in _layout(dest, years=(2019,), seed=0, size_km=12).files}
    known.add("aux")
    sidecar = (".aux.xml", ".ovr", ".msk")
    foreign = []
    for q in sorted(dest.rglob("*")):
        rel = q.relative_to(dest).as_posix()
        base = next((rel[: -len(x)] for x in sidecar if rel.endswith(x)), rel)
        if base not in known:
            foreign.append(rel)
    return foreign


def _check_destination(dest: Path, overwrite: bool) -> None:
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir():
            raise OutputError("exists and is not a directory", dest)
        if not any(dest.iterdir()):
            return
        if not overwrite:
            raise OutputError("directory exists and is not empty; use --overwrite to replace it", dest)
        # --overwrite replaces the whole directory: only ever a previous sample region.
        cwd = Path.cwd().resolve()
        if dest.resolve() == cwd or dest.resolve() in cwd.parents:
            raise OutputError("is the current directory or one above it; --overwrite would replace it", dest)
        foreign = _foreign_entries(dest)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise OutputError(
                f"not a carbonsr sample region (holds {shown}); --overwrite only replaces earlier sample data",
                dest,
            )


def _make_temp_sibling(dest: Path) -> Path:
    """Create the hidden ``.<name>.tmp-<host>-<pid>-<random>`` sibling the region is written to.

    Temp folders of killed runs (``kill -9``) writing the same ``dest`` are removed first;
    so are ``.<name>.old-*`` folders (the replaced region) once ``dest`` itself exists.
    """
    from carbonsr_cli.atomic import owner_tag, remove_stale

    if dest.parent.is_dir():
        remove_stale(dest.parent, f".{dest.name}.tmp-")
        if dest.is_dir():
            remove_stale(dest.parent, f".{dest.name}.old-")
    tmp = dest.parent / f".{dest.name}.tmp-{owner_tag()}-{uuid.uuid4().hex[:8]}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        (tmp / "aux").mkdir()
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _unwritable(dest, exc) from None
    return tmp


def _unwritable(dest: Path, exc: OSError) -> OutputError:
    """An OutputError naming the first existing ancestor of ``dest`` that blocks writing."""
    anc = dest.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        return OutputError("is not a directory; cannot create the output directory inside it", anc)
    if isinstance(exc, PermissionError):
        return OutputError("permission denied: cannot create the output directory here", anc)
    return OutputError(f"cannot create the output directory here ({exc.strerror or type(exc).__name__})", anc)


def _move_into_place(tmp: Path, dest: Path, overwrite: bool) -> None:
    old: Path | None = None
    try:
        if dest.exists():
            _check_destination(dest, overwrite)  # it may have changed while we worked
            if any(dest.iterdir()):
                from carbonsr_cli.atomic import owner_tag

                old = dest.parent / f".{dest.name}.old-{owner_tag()}-{uuid.uuid4().hex[:8]}"
                dest.rename(old)
            else:
                dest.rmdir()
        tmp.rename(dest)
    except OSError as exc:
        if old is not None and not dest.exists():
            old.rename(dest)
        raise OutputError(f"cannot move the new directory into place ({exc.strerror or exc})", dest) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- array helpers


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std random field with correlation length ~``scale`` cells, float32 [h, w]."""
    h, w = shape
    s = max(float(scale), 1.0)
    coarse = rng.standard_normal((int(h / s) + 3, int(w / s) + 3)).astype(np.float32)
    out = _lerp_axis(_lerp_axis(coarse, h, s, 0), w, s, 1)
    out -= np.float32(out.mean(dtype=np.float64))
    std = out.std(dtype=np.float64)
    if std > 0:
        out /= np.float32(std)
    return out


def _lerp_axis(a: np.ndarray, n: int, s: float, axis: int) -> np.ndarray:
    """Linear interpolation of ``a`` to ``n`` cells along ``axis`` (``s`` output cells per input cell)."""
    pos = (np.arange(n, dtype=np.float64) + 0.5) / s
    i0 = np.floor(pos).astype(np.int64)
    f = (pos - i0).astype(np.float32)
    f = f[:, None] if axis == 0 else f[None, :]
    out = np.take(a, i0, axis=axis)
    out *= 1 - f
    nxt = np.take(a, i0 + 1, axis=axis)
    nxt *= f
    out += nxt
    return out


def _filter_axis(a: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Correlate ``a`` with a short odd ``kernel`` along ``axis`` (edge padding).

    A sum of shifted slices, so cells whose neighbourhood is all zero stay exactly zero.
    """
    r = len(kernel) // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (r, r)
    p = np.pad(a, pad, mode="edge")
    n = a.shape[axis]
    out = np.zeros_like(a)
    for k, wk in enumerate(kernel):
        sl = [slice(None), slice(None)]
        sl[axis] = slice(k, k + n)
        out += np.float32(wk) * p[tuple(sl)]
    return out


def _blur(a: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return _filter_axis(_filter_axis(a, kernel, 0), kernel, 1)


def _gauss_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(math.ceil(3 * sigma)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _block_sum(a: np.ndarray, f: int) -> np.ndarray:
    """Sum ``f x f`` blocks of ``a`` [h, w] in float64 -> [h/f, w/f]."""
    h, w = a.shape
    return a.reshape(h // f, f, w // f, f).sum(axis=(1, 3), dtype=np.float64)


def _quantile(a: np.ndarray, q: float) -> float:
    flat = a.ravel()
    if flat.size > 2_000_000:
        flat = flat[:: flat.size // 1_000_000]
    return float(np.quantile(flat, q)) if flat.size else 0.0


# ----------------------------------------------------------------------------- generation


@dataclass
class _World:
    """Static fields on the internal (extended) 100 m grid, all [NE, NE]."""

    ne: int
    sea: np.ndarray  # bool, parent-aligned
    sea_parent: np.ndarray  # bool [NE/10, NE/10]
    landcover: np.ndarray  # uint8
    population: np.ndarray  # float32, persons / cell
    builtup: np.ndarray  # float32, 0..1
    urban: np.ndarray | None  # float32, 0..1 urban intensity
    roads: dict[str, list[np.ndarray]] = field(default_factory=dict)  # class -> polylines (pixel coords)
    road_weight: np.ndarray | None = None  # float32 t/yr per cell before buffering


def _generate(paths: SampleData, *, seed: int, size_km: int, years: tuple[int, ...], kind: str = "mixed") -> None:
    import rasterio
    from rasterio.windows import Window

    params = KINDS[kind]
    rng = np.random.Generator(np.random.PCG64(seed))
    n = size_km
    n_child = n * FACTOR
    ne = n_child + 2 * _MARGIN
    x_left = _X_CENTRE - n * PARENT_RES_M / 2
    ext_transform = _from_origin(x_left - _MARGIN * CHILD_RES_M, _Y_TOP + _MARGIN * CHILD_RES_M, CHILD_RES_M, CHILD_RES_M)
    child_transform = _from_origin(x_left, _Y_TOP, CHILD_RES_M, CHILD_RES_M)
    parent_transform = _from_origin(x_left, _Y_TOP, PARENT_RES_M, PARENT_RES_M)

    world = _make_world(rng, ne, ext_transform, params["lattice_cells"])
    inner = (slice(_MARGIN, _MARGIN + n_child), slice(_MARGIN, _MARGIN + n_child))
    sea_child = world.sea[inner]
    sea_parent = world.sea_parent[_MARGIN_PARENT : _MARGIN_PARENT + n, _MARGIN_PARENT : _MARGIN_PARENT + n]

    # --- static emission components (t CO2 / child cell / yr), float32 on the extended grid
    if world.urban is None or world.road_weight is None:  # pragma: no cover - internal invariant
        raise RuntimeError("world fields missing")
    traffic = world.road_weight * (1.0 + 1.5 * world.urban)
    traffic = _blur(traffic.astype(np.float32), np.array([0.25, 0.5, 0.25]))
    traffic *= np.float32(params["traffic"])  # x1 ("mixed") is exact
    climate = (1.0 + 0.5 * (1.0 - np.arange(ne, dtype=np.float32) / ne))[:, None]
    heating = (0.8 * np.power(world.population, 0.75, dtype=np.float32)) * climate
    heating *= np.float32(params["heating"])
    allowed = ~np.isin(world.landcover, (20, 80)) & ~world.sea
    traffic = np.where(allowed, traffic, 0)[inner].astype(np.float32)
    heating = np.where(allowed, heating, 0)[inner].astype(np.float32)
    del climate, allowed
    base = traffic + heating
    low = base < 0.5
    traffic[low] = 0
    heating[low] = 0
    activity = _block_sum(traffic + heating, FACTOR)
    land_act = activity[~sea_parent]
    threshold = max(50.0, _quantile(land_act, 0.66))
    active = (activity > threshold) & ~sea_parent
    active_child = np.repeat(np.repeat(active, FACTOR, 0), FACTOR, 1)
    traffic[~active_child] = 0
    heating[~active_child] = 0
    del base, low, active_child
    nz = activity[active]
    median_nz = float(np.median(nz)) if nz.size else 1000.0

    plants = _make_plants(rng, world, n, median_nz, len(years), params)
    world.urban = None  # no longer needed; free memory before the yearly loop
    for p in plants:  # plant sites have no residents and no other activity
        traffic[p.rows - _MARGIN, p.cols - _MARGIN] = 0
        heating[p.rows - _MARGIN, p.cols - _MARGIN] = 0
    growth = np.clip(_smooth_field(rng, (n_child, n_child), 200.0), -1.5, 1.5)

    # --- write per year, by strips of rows: truth (100 m) and totals (1 km)
    emissions = np.full((len(years), n, n), NODATA, dtype=np.float32)
    truth_profile = {
        **_GTIFF,
        "width": n_child,
        "height": n_child,
        "count": len(years),
        "dtype": "float32",
        "crs": CRS,
        "transform": child_transform,
        "nodata": NODATA,
    }
    sigma = 0.15
    first_totals: list[float] = []  # each plant's first-year emission (t CO2 / yr), for the catalogue
    with rasterio.open(paths.truth, "w", **truth_profile) as dst:
        for b, year in enumerate(years):
            t = year - years[0]
            totals = [(p, p.total_for(b, t, rng)) for p in plants]
            if b == 0:
                first_totals = [tot if tot > 0 else p.total for p, tot in totals]
            for r0 in range(0, n_child, _STRIP):
                r1 = min(n_child, r0 + _STRIP)
                rows = slice(r0, r1)
                g = growth[rows]
                truth = traffic[rows].astype(np.float64)
                truth *= np.power(1.0 + (0.03 + 0.03 * g), t, dtype=np.float32)
                truth += heating[rows] * np.power(1.0 + (-0.02 + 0.02 * g), t, dtype=np.float32)
                truth *= np.exp(sigma * rng.standard_normal((r1 - r0, n_child), dtype=np.float32) - np.float32(sigma**2 / 2))
                for p, total in totals:
                    r, c = p.rows - _MARGIN, p.cols - _MARGIN
                    inside = (r >= r0) & (r < r1)
                    if total > 0 and inside.any():
                        np.add.at(truth, (r[inside] - r0, c[inside]), total * p.shares[inside])
                truth32 = truth.astype(np.float32)
                del truth
                sea_s = sea_child[rows]
                truth32[sea_s] = NODATA
                emissions[b, r0 // FACTOR : r1 // FACTOR] = _block_sum(np.where(sea_s, np.float32(0), truth32), FACTOR)
                dst.write(truth32, b + 1, window=Window(0, r0, n_child, r1 - r0))
                del truth32
            emissions[b][sea_parent] = NODATA
            dst.set_band_description(b + 1, str(year))
            dst.update_tags(b + 1, YEAR=str(year))
        dst.update_tags(
            UNITS=EMISSION_UNITS,
            CARBONSR_KIND="truth",
            FACTOR=str(FACTOR),
            SEED=str(seed),
            DESCRIPTION="synthetic 100 m emission truth; for evaluation only, never for training",
        )
    del traffic, heating, growth

    with rasterio.open(
        paths.emissions,
        "w",
        **{**_GTIFF, "blockxsize": 128, "blockysize": 128},
        width=n,
        height=n,
        count=len(years),
        dtype="float32",
        crs=CRS,
        transform=parent_transform,
        nodata=NODATA,
    ) as dst:
        dst.write(emissions)
        for b, year in enumerate(years):
            dst.set_band_description(b + 1, str(year))
            dst.update_tags(b + 1, YEAR=str(year))
        dst.update_tags(
            UNITS=EMISSION_UNITS,
            CARBONSR_KIND="emissions",
            SEED=str(seed),
            DESCRIPTION="synthetic annual CO2 emission totals per 1 km cell",
        )

    _write_aux(paths, rng, world, ext_transform, plants, seed=seed, size_km=size_km)
    n_listed = _write_catalogue(paths.plants, rng, plants, first_totals, ext_transform)  # last draws: other files unchanged
    _write_readme(paths, seed=seed, size_km=size_km, years=years, n_plants=len(plants), n_listed=n_listed, kind=kind)


def _make_world(rng: np.random.Generator, ne: int, ext_transform: Any, lattice_cells: float = 60.0) -> _World:
    npe = ne // FACTOR
    # coast: sea in the south-east corner, whole parent cells
    u = (np.arange(npe) + 0.5) / npe
    coast = 1.55 + 0.05 * np.sin(2 * np.pi * (2.0 * u[None, :] + rng.uniform())) + 0.06 * _smooth_field(rng, (npe, npe), 6)
    sea_parent = (u[None, :] + u[:, None]) > coast
    sea_parent[-_MARGIN_PARENT - 1 :, -_MARGIN_PARENT - 1 :] = True  # at least one sea cell in the region
    sea = np.repeat(np.repeat(sea_parent, FACTOR, 0), FACTOR, 1)
    del coast

    # terrain -> forest candidates; other land; lakes
    hills = _smooth_field(rng, (ne, ne), 80)
    hills *= np.float32(0.8)
    hills += np.float32(0.4) * _smooth_field(rng, (ne, ne), 20)
    forest_thr = _quantile(hills[~sea], 0.74)
    lakes_f = _smooth_field(rng, (ne, ne), 15)
    lakes = (lakes_f > _quantile(lakes_f, 0.99)) & ~sea
    del lakes_f

    # cities
    area_km2 = (ne / FACTOR) ** 2
    n_cities = max(3, int(round(area_km2 / 1500)))
    cities = _sample_points(rng, n_cities, ne, lambda r, c: ~sea[r, c] & (hills[r, c] < forest_thr), min_dist=60)
    radius = np.clip(10 * np.exp(rng.normal(math.log(2.0), 0.4, len(cities))), 8, 80)  # child cells
    radius[0] = 50.0  # one larger city
    peak = rng.uniform(120, 300, len(cities))  # persons per 100 m cell at the centre
    urban = np.zeros((ne, ne), np.float32)
    pop = np.zeros((ne, ne), np.float32)
    for (r0, c0), rc, pk in zip(cities, radius, peak, strict=True):
        w = int(4 * rc)
        rs, cs = slice(max(0, r0 - w), min(ne, r0 + w + 1)), slice(max(0, c0 - w), min(ne, c0 + w + 1))
        rr = np.arange(rs.start, rs.stop, dtype=np.float32)[:, None] - r0
        cc = np.arange(cs.start, cs.stop, dtype=np.float32)[None, :] - c0
        d = np.sqrt(rr**2 + cc**2)
        np.maximum(urban[rs, cs], np.exp(-((d / rc) ** 2)), out=urban[rs, cs])
        pop[rs, cs] += pk * np.exp(-d / (0.7 * rc))
    texture = _smooth_field(rng, (ne, ne), 5)
    texture *= np.float32(0.35)
    texture -= np.float32(0.06)
    pop *= np.exp(texture, out=texture)
    del texture

    # villages (point masses blurred into blobs) and farmhouses
    n_villages = max(5, int(round(area_km2 / 25)))
    villages = _sample_points(rng, n_villages, ne, lambda r, c: ~sea[r, c] & ~lakes[r, c] & (hills[r, c] < forest_thr))
    vmass = np.zeros((ne, ne), np.float32)
    np.add.at(vmass, (villages[:, 0], villages[:, 1]), np.exp(rng.normal(math.log(400), 0.6, len(villages))).astype(np.float32))
    vpop = _blur(vmass, _gauss_kernel(2.0))
    del vmass
    pop += vpop
    farm = rng.random((ne, ne), dtype=np.float32) < 0.004
    pop[farm] += rng.uniform(2, 8, int(farm.sum())).astype(np.float32)
    del farm

    builtup = np.clip(1.3 * urban - 0.15 + 0.1 * _smooth_field(rng, (ne, ne), 8), 0, 1) + np.clip(vpop / 60.0, 0, 0.6)
    builtup = np.clip(builtup, 0, 1).astype(np.float32)
    del vpop

    # roads (pixel coordinates: x = column, y = row, on the extended grid)
    roads = _make_roads(rng, ne, cities, radius, villages, lattice_cells)

    def _valid(pts: np.ndarray) -> np.ndarray:
        ok = (pts[:, 0] >= 0) & (pts[:, 0] < ne) & (pts[:, 1] >= 0) & (pts[:, 1] < ne)
        r = np.clip(pts[:, 1].astype(np.int64) // FACTOR, 0, npe - 1)
        c = np.clip(pts[:, 0].astype(np.int64) // FACTOR, 0, npe - 1)
        return ok & ~sea_parent[r, c]

    roads = {k: _split_runs(v, _valid) for k, v in roads.items()}

    # river: from the north edge towards the sea, 2-3 cells wide
    river = _polyline(rng, np.array([rng.uniform(0.2, 0.5) * ne, -5.0]), np.array([ne * 1.05, ne * 0.9]), 0.12)
    river_mask = _rasterize_lines([river], 1.0, ne) > 0
    river_mask[1:, :] |= river_mask[:-1, :]
    river_mask[:, 1:] |= river_mask[:, :-1]
    water = sea | lakes | river_mask
    del lakes, river_mask

    road_weight = np.zeros((ne, ne), np.float32)
    for cls, lines in roads.items():
        road_weight += _rasterize_lines(lines, ROAD_WEIGHTS[cls], ne)

    other_f = _smooth_field(rng, (ne, ne), 20)
    landcover = np.full((ne, ne), 10, np.uint8)
    landcover[other_f > _quantile(other_f, 0.94)] = 90
    del other_f
    landcover[(hills > forest_thr) & (urban < 0.3)] = 20
    landcover[builtup >= 0.4] = 50
    landcover[water] = 80
    del hills

    pop[water] = 0
    pop[landcover == 20] *= 0.05
    pop = np.where(pop < 0.5, 0, np.round(pop, 1)).astype(np.float32)
    builtup[water] = 0
    return _World(
        ne=ne, sea=sea, sea_parent=sea_parent, landcover=landcover, population=pop, builtup=builtup, urban=urban, roads=roads, road_weight=road_weight
    )


def _from_origin(west: float, north: float, xsize: float, ysize: float) -> Any:
    """North-up affine transform (like rasterio.transform.from_origin, without its deprecation warning)."""
    from affine import Affine

    return Affine(xsize, 0.0, west, 0.0, -ysize, north)


def _rasterize_lines(lines: list[np.ndarray], weight: float, ne: int, step: float = 0.25) -> np.ndarray:
    """Line length per cell times ``weight``: float32 [ne, ne] (length in cells, 1 = 100 m).

    Polylines are in pixel coordinates (x = column, y = row). Each segment is sampled
    every ``step`` cells and every sample adds ``weight * step`` to its cell: a plain,
    fast alternative to GDAL rasterization for hundreds of thousands of lines.
    """
    grid = np.zeros((ne, ne), np.float32)
    if not lines:
        return grid
    a = np.concatenate([p[:-1] for p in lines])
    b = np.concatenate([p[1:] for p in lines])
    d = b - a
    seglen = np.hypot(d[:, 0], d[:, 1])
    nsteps = np.maximum(1, np.ceil(seglen / step)).astype(np.int64)
    seg = np.repeat(np.arange(len(a)), nsteps)
    first = np.repeat(np.cumsum(nsteps) - nsteps, nsteps)
    t = (np.arange(len(seg)) - first + 0.5) / nsteps[seg]
    x = a[seg, 0] + t * d[seg, 0]
    y = a[seg, 1] + t * d[seg, 1]
    w = (weight * seglen / nsteps)[seg]
    ok = (x >= 0) & (x < ne) & (y >= 0) & (y < ne)
    np.add.at(grid, (y[ok].astype(np.int64), x[ok].astype(np.int64)), w[ok].astype(np.float32))
    return grid


def _pixel_to_crs(transform: Any) -> Any:
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f

    def to_xy(pts: np.ndarray) -> np.ndarray:
        x, y = pts[:, 0], pts[:, 1]
        return np.column_stack([c + a * x + b * y, f + d * x + e * y])

    return to_xy


def _sample_points(
    rng: np.random.Generator, k: int, ne: int, ok: Any, min_dist: float = 0.0, lo: float = 0.03, hi: float = 0.97
) -> np.ndarray:
    """``k`` random child-cell positions [k, 2] (row, col) where ``ok(rows, cols)`` holds."""
    chosen: list[np.ndarray] = []
    count = 0
    for _ in range(50):
        cand = rng.integers(int(lo * ne), int(hi * ne), size=(max(4 * k, 16), 2))
        cand = cand[ok(cand[:, 0], cand[:, 1])]
        if min_dist > 0:
            for p in cand:
                if all(np.hypot(*(p - q)) >= min_dist for q in chosen):
                    chosen.append(p)
                    if len(chosen) == k:
                        break
            count = len(chosen)
        else:
            chosen.extend(cand[: k - count])
            count = len(chosen)
        if count >= k:
            break
    if not chosen:  # degenerate tiny region: fall back to the centre
        chosen = [np.array([ne // 3, ne // 3])]
    return np.array(chosen[:k], dtype=np.int64)


def _polyline(rng: np.random.Generator, p0: np.ndarray, p1: np.ndarray, wiggle: float, step: float = 5.0) -> np.ndarray:
    """A wiggly polyline from ``p0`` to ``p1`` (x, y pixel coords), vertices every ~``step`` cells."""
    vec = p1 - p0
    length = float(np.hypot(*vec))
    m = max(2, int(math.ceil(length / step)) + 1)
    t = np.linspace(0, 1, m)
    normal = np.array([-vec[1], vec[0]]) / max(length, 1e-9)
    a1, a2 = rng.normal(0, wiggle, 2)
    off = length * (a1 * np.sin(np.pi * t) + 0.5 * a2 * np.sin(2 * np.pi * t))
    off += np.concatenate([[0], np.cumsum(rng.normal(0, 0.6, m - 2)), [0]]) if m > 2 else 0
    return p0[None, :] + t[:, None] * vec[None, :] + off[:, None] * normal[None, :]


def _make_roads(
    rng: np.random.Generator, ne: int, cities: np.ndarray, radius: np.ndarray, villages: np.ndarray, spacing: float = 60.0
) -> dict[str, list[np.ndarray]]:
    """Road polylines by class (pixel coordinates); ``spacing``: secondary lattice spacing in child cells."""
    roads: dict[str, list[np.ndarray]] = {k: [] for k in ROAD_WEIGHTS}
    xy = cities[:, ::-1].astype(np.float64)  # (x=col, y=row)
    big = radius >= np.median(radius)
    # intercity roads: each city to its 2 nearest neighbours
    edges: set[tuple[int, int]] = set()
    if len(xy) > 1:
        d = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
        np.fill_diagonal(d, np.inf)
        for i in range(len(xy)):
            for j in np.argsort(d[i])[:2]:
                edges.add((min(i, int(j)), max(i, int(j))))
    for i, j in sorted(edges):
        cls = "motorway" if big[i] and big[j] else "primary"
        roads[cls].append(_polyline(rng, xy[i], xy[j], 0.05))
    # radial roads out of each city
    for (x, y), rc in zip(xy, radius, strict=True):
        for ang in rng.uniform(0, 2 * np.pi, rng.integers(2, 5)):
            ln = rng.uniform(50, 200)
            end = np.array([x + ln * np.cos(ang), y + ln * np.sin(ang)])
            roads["primary" if rc > 20 else "secondary"].append(_polyline(rng, np.array([x, y]), end, 0.08))
    # secondary lattice, spacing ~6 km ("mixed"), segments kept with probability 0.55
    sp = float(spacing)
    k = int(ne / sp) + 2
    grid = np.arange(k) * sp - sp / 2
    nodes = np.stack(np.meshgrid(grid, grid, indexing="xy"), -1) + rng.uniform(-12, 12, (k, k, 2))
    for i in range(k):
        for j in range(k):
            for di, dj in ((0, 1), (1, 0)):
                if i + di < k and j + dj < k and rng.random() < 0.55:
                    roads["secondary"].append(_polyline(rng, nodes[i, j], nodes[i + di, j + dj], 0.06))
    # residential streets: rotated grid inside each city, a cross in each village
    for (x, y), rc in zip(xy, radius, strict=True):
        rad = 1.2 * rc
        spacing = rng.uniform(3.0, 5.0)
        theta = rng.uniform(0, np.pi / 2)
        for rot in (theta, theta + np.pi / 2):
            ux, uy = np.cos(rot), np.sin(rot)
            for o in np.arange(-rad + spacing / 2, rad, spacing):
                half = math.sqrt(max(rad**2 - o**2, 0.0))
                if half < 2:
                    continue
                cx, cy = x - o * uy, y + o * ux
                p0 = np.array([cx - half * ux, cy - half * uy])
                p1 = np.array([cx + half * ux, cy + half * uy])
                roads["residential"].append(_polyline(rng, p0, p1, 0.0, step=10.0))
    for r, c in villages:
        ang = rng.uniform(0, np.pi)
        for rot in (ang, ang + np.pi / 2):
            half = rng.uniform(2, 5)
            v = np.array([np.cos(rot), np.sin(rot)]) * half
            roads["residential"].append(np.array([[c - v[0], r - v[1]], [c + v[0], r + v[1]]], dtype=np.float64))
    return roads


def _split_runs(lines: list[np.ndarray], valid: Any) -> list[np.ndarray]:
    """Cut each polyline into runs of consecutive valid vertices (>= 2 vertices each)."""
    if not lines:
        return []
    lens = np.array([len(p) for p in lines])
    ok_all = valid(np.concatenate(lines))
    out: list[np.ndarray] = []
    start = 0
    for p, m in zip(lines, lens, strict=True):
        ok = ok_all[start : start + m]
        start += m
        if ok.all():
            out.append(p)
            continue
        edges = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(np.int8), [0]])))
        for a, b in zip(edges[::2], edges[1::2], strict=True):
            if b - a >= 2:
                out.append(p[a:b])
    return out


@dataclass
class _Plant:
    rows: np.ndarray  # extended-grid child rows of the footprint
    cols: np.ndarray
    shares: np.ndarray  # sums to 1
    total: float  # t CO2 / yr in the first year
    trend: float  # relative change per year
    start: int  # first band index with emissions
    stop: int  # first band index without emissions (closure), or a large number

    def total_for(self, band: int, t: int, rng: np.random.Generator) -> float:
        """Total of this plant in band ``band`` (year offset ``t``); draws its yearly noise."""
        noise = math.exp(0.05 * rng.standard_normal() - 0.05**2 / 2)
        if band < self.start or band >= self.stop:
            return 0.0
        return self.total * (1.0 + self.trend) ** t * noise


def _make_plants(
    rng: np.random.Generator, world: _World, n: int, median_nz: float, n_years: int, params: dict[str, float] | None = None
) -> list[_Plant]:
    params = params or KINDS["mixed"]
    ne = world.ne
    n_existing = max(int(params["min_plants"]), int(round(n * n / 1500 * params["plants_per_1500km2"])))
    n_total = n_existing + (1 if n_years >= 2 else 0)

    def ok(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        inside = (r >= _MARGIN) & (r < ne - _MARGIN - 1) & (c >= _MARGIN) & (c < ne - _MARGIN - 1)
        r2, c2 = np.clip(r, 0, ne - 1), np.clip(c, 0, ne - 1)
        lc = world.landcover[r2, c2]
        return inside & ~world.sea[r2, c2] & (lc != 80) & (lc != 20) & (r % FACTOR < FACTOR - 1) & (c % FACTOR < FACTOR - 1)

    sites = _sample_points(rng, n_total, ne, ok, min_dist=2 * FACTOR, lo=0.0, hi=1.0)
    mult = np.clip(np.exp(rng.normal(math.log(1500.0), 0.6, len(sites))), 300.0, 8000.0)
    order = np.argsort(-mult)
    mult[order[:2]] = np.maximum(mult[order[:2]], 1300.0)
    plants: list[_Plant] = []
    for k, (r, c) in enumerate(sites):
        cells = rng.integers(1, 5)
        dr = np.array([0, 0, 1, 1])[:cells]
        dc = np.array([0, 1, 0, 1])[:cells]
        shares = rng.dirichlet(np.ones(cells) * 2.0)
        is_new = n_years >= 2 and k == len(sites) - 1
        start = max(1, n_years // 2) if is_new else 0
        total = median_nz * (max(float(mult[k]), 800.0) if is_new else float(mult[k])) * params["plant_size"]
        plants.append(_Plant(r + dr, c + dc, shares, total, float(rng.normal(0.0, 0.04)), start, 10**9))
        world.landcover[r + dr, c + dc] = 50
        world.builtup[r + dr, c + dc] = np.maximum(world.builtup[r + dr, c + dc], 0.7)
        world.population[r + dr, c + dc] = 0
    if n_years >= 2:
        existing = [i for i in range(n_existing) if i not in set(order[:2].tolist())]
        closing = existing[0] if existing else n_existing - 1
        plants[closing].stop = n_years - 1
    return plants


# ----------------------------------------------------------------------------- auxiliary layers


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
) -> int:
    """Write the incomplete plant catalogue ``plants.gpkg`` (see the module docstring); returns the plants listed.

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
    return len(idx)


def _write_readme(
    paths: SampleData,
    *,
    seed: int,
    size_km: int,
    years: tuple[int, ...],
    n_plants: int,
    n_listed: int | None = None,
    kind: str = "mixed",
) -> None:
    doc = (__doc__ or "").strip()
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
