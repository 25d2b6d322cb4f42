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

import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carbonsr_cli.atomic import owner_tag, remove_stale
from carbonsr_cli.errors import OutputError, UsageError
from carbonsr_cli.sample_files import _write_aux, _write_catalogue, _write_readme
from carbonsr_cli.sample_world import (
    CHILD_RES_M,
    CRS,
    EMISSION_UNITS,
    FACTOR,
    KINDS,
    NODATA,
    PARENT_RES_M,
    _GTIFF,
    _MARGIN,
    _MARGIN_PARENT,
    _STRIP,
    _Plant,
    _X_CENTRE,
    _Y_TOP,
    _block_sum,
    _blur,
    _from_origin,
    _make_plants,
    _make_world,
    _quantile,
    _smooth_field,
)


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
    noise_free: bool = False,
    unlisted_plants: bool = True,
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
        noise_free: Leave out the per-cell lognormal noise of the 100 m field (sigma 0.15), every
            other draw unchanged: the truth is then the field's expected value and the 1 km totals
            its sums. For benchmarks: the noise-free twin of a region, allocated to the noisy
            region's 1 km totals, is the best placement any method could reach (the floor).
        unlisted_plants: With ``False`` (only together with ``noise_free``; for benchmarks), the
            truth raster has the footprint cells of every plant that ``plants.gpkg`` does not list
            set to 0 in every band (a plant's cells carry only the plant). Every draw and every
            other file (the 1 km totals included) stay those of the noise-free twin. Shared onto
            the noisy region's 1 km totals, this twin puts the listed plants at their sites and an
            unlisted plant's mass onto its block's surface in proportion: the floor a method can
            reach that knows the law and the catalogue but not where the unlisted plants sit.

    Returns:
        The paths of every file written (inside ``out_dir``).

    Raises:
        OutputError: ``out_dir`` is not empty (without ``overwrite``), is a file,
            or cannot be written.
        UsageError: Bad ``size_km``, ``years`` or ``kind``.
        ValueError: ``unlisted_plants=False`` without ``noise_free=True``.
    """
    if not unlisted_plants and not noise_free:
        raise ValueError("unlisted_plants=False is only allowed with noise_free=True (a benchmark twin)")
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
                _generate(layout, seed=seed, size_km=size_km, years=years_t, kind=kind, noise_free=noise_free,
                          unlisted_plants=unlisted_plants)
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


# ----------------------------------------------------------------------------- generation


def _generate(
    paths: SampleData, *, seed: int, size_km: int, years: tuple[int, ...], kind: str = "mixed", noise_free: bool = False,
    unlisted_plants: bool = True,
) -> None:
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
    sigma = 0.0 if noise_free else 0.15  # the noise is drawn either way: other draws stay the same
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
    listed = _write_catalogue(paths.plants, rng, plants, first_totals, ext_transform)  # last draws: other files unchanged
    if not unlisted_plants:
        unlisted = set(range(len(plants))) - set(listed.tolist())
        _zero_plants(paths.truth, [plants[i] for i in sorted(unlisted)])
    _write_readme(
        paths, seed=seed, size_km=size_km, years=years, n_plants=len(plants), n_listed=len(listed), kind=kind,
        process=__doc__ or "",
    )


def _zero_plants(truth_path: Path, plants: list[_Plant]) -> None:
    """Set the footprint cells of ``plants`` to 0 in every band of the truth raster (in place).

    A plant's cells carry only the plant (traffic and heating are zeroed there, sites are on
    land), so this removes exactly the plants' mass.
    """
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(truth_path, "r+") as dst:
        for p in plants:
            r, c = p.rows - _MARGIN, p.cols - _MARGIN
            r0, c0 = int(r.min()), int(c.min())
            win = Window(c0, r0, int(c.max()) - c0 + 1, int(r.max()) - r0 + 1)
            block = dst.read(window=win)
            block[:, r - r0, c - c0] = 0
            dst.write(block, window=win)


# ----------------------------------------------------------------------------- auxiliary layers


