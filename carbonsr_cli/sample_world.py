"""The synthetic world of ``carbonsr sample-data``: grid constants, the smooth random fields,
roads, settlements and plants from which the emissions and the aux layers are derived."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
