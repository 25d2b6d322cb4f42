"""Training data: main raster and aux cache, deterministic patch sampling, degradation.

Weak supervision (ARCHITECTURE section 5): a *patch* is ``patch x patch`` parent cells
(12 x 12 = 120 x 120 child cells with factor 10) at a parent-aligned position of the
training region, over a window of ``T`` consecutive years. It is *degraded* to a coarse
scale ``s`` (a divisor of ``patch``): the coarse totals are the sums of the true parent
totals over ``s x s`` parent cells, and the model's ``main`` input is
``log1p(coarse total / (s * factor) ** 2)`` broadcast over the coarse block's children.
The model predicts children, the physics layer water-fills each coarse block
(``block = s * factor`` child cells), children are sum-pooled to parent cells and the loss
compares those with the true parent totals.

Nodata: parent cells that are nodata in the main raster count as 0 in the coarse totals
and are masked out of the loss and of the metrics; patches with more than
``max_nodata`` nodata cells are never drawn (see :mod:`.split`).

Determinism: the batch drawn at ``(epoch, step)`` is a pure function of
``(seed, epoch, step)`` (:class:`PatchSampler`), so a resumed run replays exactly the
data order of an uninterrupted one, whatever thread prepared the batch.

Caching: the aux layers are aligned onto the child grid once per run (tile by tile,
through :class:`carbonsr_cli.auxlayers.AuxStack`), normalised with the run's statistics and
kept as float16 ``[C_aux, Y, H_child, W_child]``: in memory when it fits
``ram_limit_bytes``, otherwise in a ``.npy`` memmap under ``<run>/cache/``. The main raster
is kept in memory at parent resolution (float32 ``[Y, H, W]``).
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carbonsr_cli.errors import InputDataError, UsageError

__all__ = [
    "AuxCache",
    "Batch",
    "BatchSpec",
    "MainData",
    "PatchSampler",
    "Prefetcher",
    "build_batch",
    "degrade",
    "load_main",
    "parse_scales",
]


@dataclass
class MainData:
    """The main raster(s) in memory at parent resolution.

    Attributes:
        grid: ``ParentGrid`` of the (first) main file.
        years: One name per band/year (``"2019"``...), in order.
        values: float32 ``[Y, H, W]`` totals per parent cell (t CO2 / cell / yr), NaN = nodata.
        paths: The main file(s).
    """

    grid: Any
    years: list[str]
    values: np.ndarray
    paths: list[Path]

    @property
    def valid(self) -> np.ndarray:
        """bool ``[Y, H, W]``: cells with data."""
        return np.isfinite(self.values)

    @property
    def valid_all_years(self) -> np.ndarray:
        """bool ``[H, W]``: cells with data in every year."""
        return np.isfinite(self.values).all(axis=0)


def load_main(paths: Sequence[str | os.PathLike[str]]) -> MainData:
    """Read the main raster: one multi-band file (band = year) or several files on one grid.

    Args:
        paths: One file with a band per year, or several files (one or more bands each),
            all on the same grid; years come from band descriptions or file names.

    Returns:
        :class:`MainData` with nodata (and negative or non-finite values) as NaN.

    Raises:
        UsageError: no file. InputDataError: grids differ, duplicate years, negative totals.
    """
    import warnings

    from carbonsr_cli.grids import ParentGrid
    from carbonsr_cli.rasters import open_raster, read_window, read_years

    if not paths:
        raise UsageError("no main raster given")
    files = [Path(p) for p in paths]
    grid = ParentGrid.from_raster(files[0])
    years: list[str] = []
    arrays: list[np.ndarray] = []
    for f in files:
        with open_raster(f) as ds:
            if (ds.crs != grid.crs or ds.transform != grid.transform or ds.width != grid.width or ds.height != grid.height):
                raise InputDataError(
                    f"main rasters must share one grid; this one differs from {files[0].name} "
                    f"({ds.height}x{ds.width} vs {grid.height}x{grid.width} cells, or CRS/transform)",
                    f,
                )
            names = read_years(ds)
            if len(files) > 1 and len(names) == 1 and names[0].startswith("band"):
                names = [f.stem]
            data = read_window(ds, out_dtype="float32")
            nodata = ds.nodata
        if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
            data[data == np.float32(nodata)] = np.nan
        data[~np.isfinite(data)] = np.nan
        if np.nanmin(data, initial=0.0) < 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                n_neg = int(np.sum(data < 0))
            raise InputDataError(
                f"{n_neg} cell(s) have negative totals; training needs emissions >= 0 "
                "(net sinks are not supported for training)",
                f,
            )
        years.extend(names)
        arrays.append(data)
    if len(set(years)) != len(years):
        raise InputDataError(f"duplicate year/band names across main rasters: {years}", files[0])
    return MainData(grid=grid, years=years, values=np.concatenate(arrays, axis=0), paths=files)


def parse_scales(spec: str | Sequence[int] | Mapping[int, float], patch: int = 12) -> dict[int, float]:
    """Parse a coarse-scale schedule into ``{scale: probability}`` (probabilities sum to 1).

    Accepts ``"12,4,2"`` (equal weights), ``"12:0.5,4:0.25,2:0.25"``, a list, or a dict.
    Every scale must divide ``patch``; scale 1 carries no training signal (the coarse total
    *is* the parent total) and is rejected.

    Raises:
        UsageError: malformed spec, a scale that does not divide ``patch``, or scale 1.
    """
    items: list[tuple[int, float]] = []
    try:
        if isinstance(spec, str):
            for part in spec.replace(" ", "").split(","):
                if not part:
                    continue
                if ":" in part:
                    s, w = part.split(":", 1)
                    items.append((int(s), float(w)))
                else:
                    items.append((int(part), 1.0))
        elif isinstance(spec, Mapping):
            items = [(int(k), float(v)) for k, v in spec.items()]
        else:
            items = [(int(s), 1.0) for s in spec]
    except ValueError:
        raise UsageError(f"--scales {spec!r}: expected e.g. 12,4,2 or 12:0.5,4:0.25,2:0.25") from None
    if not items:
        raise UsageError(f"--scales {spec!r}: no scale given")
    out: dict[int, float] = {}
    for s, w in items:
        if s < 2 or patch % s:
            divisors = [d for d in range(2, patch + 1) if patch % d == 0]
            raise UsageError(f"--scales: {s} is not a usable coarse scale; choose among {divisors} (divisors of the {patch}-cell patch, > 1)")
        if w < 0:
            raise UsageError(f"--scales: negative weight for scale {s}")
        out[s] = out.get(s, 0.0) + w
    total = sum(out.values())
    if total <= 0:
        raise UsageError(f"--scales {spec!r}: weights sum to 0")
    return {s: w / total for s, w in sorted(out.items(), reverse=True)}


class AuxCache:
    """Normalised aux layers on the child grid, float16 ``[C_aux, Y, H_child, W_child]``.

    Built once per run from an ``AuxStack`` tile by tile; patches are then plain slices.
    """

    def __init__(self, array: np.ndarray, names: Sequence[str]) -> None:
        self.array = array
        self.names = list(names)

    @property
    def channels(self) -> int:
        """Number of aux layers ``C_aux``."""
        return int(self.array.shape[0])

    @classmethod
    def build(
        cls,
        stack: Any,
        normalize: Callable[[np.ndarray], np.ndarray],
        child_shape: tuple[int, int],
        n_years: int,
        *,
        cache_dir: Path | None = None,
        ram_limit_bytes: int = 8 << 30,
        tile: int = 1200,
        progress: Callable[[int, int], None] | None = None,
    ) -> AuxCache:
        """Read, normalise and cache every aux layer over the whole child grid.

        Args:
            stack: ``AuxStack`` (``.names``, ``.read(window) -> [C, Y, h, w]``).
            normalize: ``AuxNormalizer.apply`` (raw ``[C, Y, h, w]`` -> normalised).
            child_shape: ``(H_child, W_child)``.
            n_years: Y, the number of years of the main raster.
            cache_dir: Where to put the memmap if the cache is larger than ``ram_limit_bytes``.
            ram_limit_bytes: Largest in-memory cache.
            tile: Tile edge in child cells for reading (a multiple of the factor).
            progress: Called with ``(done, total)`` tiles.
        """
        from rasterio.windows import Window

        hc, wc = child_shape
        c = len(stack.names)
        nbytes = c * n_years * hc * wc * 2
        if nbytes > ram_limit_bytes and cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            arr: np.ndarray = np.lib.format.open_memmap(cache_dir / "aux_cache.npy", mode="w+", dtype=np.float16, shape=(c, n_years, hc, wc))
        else:
            arr = np.empty((c, n_years, hc, wc), dtype=np.float16)
        tiles = [(r, q) for r in range(0, hc, tile) for q in range(0, wc, tile)]
        for k, (r, q) in enumerate(tiles):
            h, w = min(tile, hc - r), min(tile, wc - q)
            raw = np.asarray(stack.read(Window(q, r, w, h)), dtype=np.float32)
            if raw.shape != (c, n_years, h, w):
                raise InputDataError(f"aux stack returned shape {raw.shape}, expected {(c, n_years, h, w)}")
            arr[:, :, r : r + h, q : q + w] = np.asarray(normalize(raw), dtype=np.float32).astype(np.float16)
            if progress is not None:
                progress(k + 1, len(tiles))
        if isinstance(arr, np.memmap):
            arr.flush()
        return cls(arr, stack.names)

    def window(self, row: int, col: int, size: int, year0: int, t: int) -> np.ndarray:
        """float32 ``[C_aux, T, size, size]`` at child ``(row, col)`` for years ``year0 .. year0+T-1``."""
        return self.array[:, year0 : year0 + t, row : row + size, col : col + size].astype(np.float32)


@dataclass(frozen=True)
class BatchSpec:
    """What to draw for one optimisation step (pure function of seed, epoch, step).

    Attributes:
        scale: Coarse scale ``s`` in parent cells for the whole batch.
        rows: Top-left parent rows of the patches ``[B]``.
        cols: Top-left parent cols ``[B]``.
        year0: First year index of each patch's T-year window ``[B]``.
        rot: Quarter turns (0..3) of each patch ``[B]`` (augmentation).
        flip: Left-right flip of each patch ``[B]`` (augmentation).
    """

    scale: int
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    year0: tuple[int, ...]
    rot: tuple[int, ...]
    flip: tuple[bool, ...]

    @classmethod
    def windows(cls, scale: int, rows: Sequence[int], cols: Sequence[int], year0: Sequence[int]) -> BatchSpec:
        """Windows as they are (no rotation, no flip): validation and self-validation."""
        n = len(rows)
        return cls(scale=scale, rows=tuple(int(r) for r in rows), cols=tuple(int(c) for c in cols),
                   year0=tuple(int(y) for y in year0), rot=(0,) * n, flip=(False,) * n)


class PatchSampler:
    """Deterministic sampler: :meth:`spec` depends only on ``(seed, epoch, step)``.

    Args:
        positions: Allowed top-left parent positions ``[N, 2]`` (from ``Split.train_positions``).
        n_years: Y, years in the main raster.
        years_window: T, years per patch.
        scales: ``{scale: probability}`` from :func:`parse_scales`.
        batch_size: Patches per step.
        seed: Run seed.
        augment: Random quarter turns and flips.
    """

    def __init__(
        self,
        positions: np.ndarray,
        n_years: int,
        years_window: int,
        scales: Mapping[int, float],
        batch_size: int,
        seed: int,
        augment: bool = True,
    ) -> None:
        if len(positions) == 0:
            raise UsageError("no training patch position available")
        if years_window > n_years:
            raise UsageError(f"--years-window {years_window} is larger than the number of years ({n_years})")
        self.positions = np.asarray(positions, dtype=np.int64)
        self.n_years = n_years
        self.years_window = years_window
        self.scale_values = np.array(list(scales), dtype=np.int64)
        self.scale_probs = np.array(list(scales.values()), dtype=np.float64)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.augment = augment

    def spec(self, epoch: int, step: int) -> BatchSpec:
        """The batch of step ``step`` (0-based) of epoch ``epoch`` (0-based)."""
        rng = np.random.default_rng([self.seed, 1_000_003, int(epoch), int(step)])
        b = self.batch_size
        scale = int(self.scale_values[rng.choice(len(self.scale_values), p=self.scale_probs)])
        idx = rng.integers(0, len(self.positions), size=b)
        year0 = rng.integers(0, self.n_years - self.years_window + 1, size=b)
        rot = rng.integers(0, 4, size=b) if self.augment else np.zeros(b, dtype=np.int64)
        flip = rng.random(b) < 0.5 if self.augment else np.zeros(b, dtype=bool)
        pos = self.positions[idx]
        return BatchSpec(
            scale=scale,
            rows=tuple(int(v) for v in pos[:, 0]),
            cols=tuple(int(v) for v in pos[:, 1]),
            year0=tuple(int(v) for v in year0),
            rot=tuple(int(v) for v in rot),
            flip=tuple(bool(v) for v in flip),
        )

    def state(self, epoch: int, step: int) -> dict[str, Any]:
        """Sampler position for checkpoints."""
        return {
            "seed": self.seed,
            "epoch": int(epoch),
            "step": int(step),
            "n_positions": int(len(self.positions)),
            "batch_size": self.batch_size,
            "scales": {str(int(s)): float(p) for s, p in zip(self.scale_values, self.scale_probs)},
            "years_window": self.years_window,
        }


@dataclass
class Batch:
    """One training or validation batch (numpy, CPU; with ``build_batch(..., pin=True)`` the
    fields are torch tensors in page-locked host memory).

    Attributes:
        aux: float32 ``[B, C_aux, T, P, P]`` normalised aux, ``P = patch * factor`` (float16, the
            cache's values unconverted, with ``build_batch(..., aux_dtype=np.float16)``).
        main: float32 ``[B, 1, T, P, P]`` = log1p(coarse total / (s * factor) ** 2), broadcast.
        totals: float64 ``[B, 1, T, patch / s, patch / s]`` coarse totals (t CO2 / block / yr).
        truth: float32 ``[B, 1, T, patch, patch]`` true parent totals, nodata as 0.
        mask: bool ``[B, 1, T, patch, patch]``, True where the parent cell has data.
        scale: Coarse scale ``s``.
    """

    aux: np.ndarray
    main: np.ndarray
    totals: np.ndarray
    truth: np.ndarray
    mask: np.ndarray
    scale: int


def degrade(truth: np.ndarray, scale: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Coarse totals and the model's ``main`` input from parent totals.

    Args:
        truth: Parent totals ``[..., h, w]`` (nodata already 0), h and w divisible by ``scale``.
        scale: Coarse scale in parent cells.
        factor: Child cells per parent cell along an axis.

    Returns:
        ``(totals [..., h/s, w/s] float64, main [..., h*f, w*f] float32)`` with
        ``main = log1p(total / (s*f)**2)`` broadcast over each coarse block's children.
    """
    *lead, h, w = truth.shape
    t = truth.astype(np.float64).reshape(*lead, h // scale, scale, w // scale, scale).sum(axis=(-3, -1))
    block = scale * factor
    m = np.log1p(t / float(block * block)).astype(np.float32)
    main = np.repeat(np.repeat(m, block, axis=-2), block, axis=-1)
    return t, main


def _augment(x: np.ndarray, rot: int, flip: bool) -> np.ndarray:
    if flip:
        x = x[..., ::-1]
    if rot:
        x = np.rot90(x, k=rot, axes=(-2, -1))
    return x


def build_batch(spec: BatchSpec, main: MainData, aux: AuxCache, *, factor: int, patch: int, years_window: int,
                aux_dtype: Any = np.float32, pin: bool = False) -> Batch:
    """Assemble the batch described by ``spec`` (pure numpy; safe to run in a thread).

    Args:
        aux_dtype: dtype of ``Batch.aux``: float32 (default) or float16, the cache's own dtype
            (no conversion on the host: the values are the same, converted exactly to float32
            on the device; half the bytes to copy).
        pin: Put every array of the batch into page-locked (pinned) host memory, as torch
            tensors (CUDA training: asynchronous copies to the device, no copy out of pageable
            memory on the GPU's stream). Needs CUDA.
    """
    p, f, t = patch, factor, years_window
    half = np.dtype(aux_dtype) == np.float16
    aux_list, truth_list, mask_list = [], [], []
    for r, c, y0, rot, flip in zip(spec.rows, spec.cols, spec.year0, spec.rot, spec.flip):
        if half:
            a = aux.array[:, y0 : y0 + t, r * f : r * f + p * f, c * f : c * f + p * f]
        else:
            a = aux.window(r * f, c * f, p * f, y0, t)
        v = main.values[y0 : y0 + t, r : r + p, c : c + p]
        ok = np.isfinite(v)
        aux_list.append(_augment(a, rot, flip))
        truth_list.append(_augment(np.where(ok, v, 0.0).astype(np.float32), rot, flip))
        mask_list.append(_augment(ok, rot, flip))
    truth = np.ascontiguousarray(np.stack(truth_list)[:, None])
    mask = np.ascontiguousarray(np.stack(mask_list)[:, None])
    totals, main_in = degrade(truth, spec.scale, f)
    if not pin:
        return Batch(
            aux=np.ascontiguousarray(np.stack(aux_list)),
            main=np.ascontiguousarray(main_in),
            totals=totals,
            truth=truth,
            mask=mask,
            scale=spec.scale,
        )
    import torch

    n = len(aux_list)
    aux_t = torch.empty((n, *aux_list[0].shape), dtype=torch.float16 if half else torch.float32, pin_memory=True)
    np.stack(aux_list, out=aux_t.numpy())  # straight into pinned memory (one copy)

    def pinned(x: np.ndarray) -> Any:
        out = torch.empty(x.shape, dtype=torch.from_numpy(x[:0]).dtype, pin_memory=True)
        out.numpy()[...] = x
        return out

    return Batch(aux=aux_t, main=pinned(main_in), totals=pinned(totals), truth=pinned(truth), mask=pinned(mask),
                 scale=spec.scale)


class Prefetcher:
    """Prepare upcoming batches in worker threads, yielding them in order.

    The results do not depend on the number of threads: each batch is a pure function
    of its spec.

    Args:
        make: Function ``(epoch, step) -> batch``.
        keys: The ``(epoch, step)`` pairs to produce, in order.
        workers: Worker threads (0 = prepare in the calling thread).
        depth: Batches prepared ahead.
    """

    def __init__(self, make: Callable[[int, int], Any], keys: Iterator[tuple[int, int]], workers: int = 2, depth: int = 4) -> None:
        self.make = make
        self.keys = iter(keys)
        self.workers = workers
        self.depth = max(depth, 1)
        self.pool = cf.ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
        self.pending: list[cf.Future] = []

    def _fill(self) -> None:
        assert self.pool is not None
        while len(self.pending) < self.depth:
            try:
                key = next(self.keys)
            except StopIteration:
                return
            self.pending.append(self.pool.submit(self.make, *key))

    def __iter__(self) -> Iterator[Any]:
        if self.pool is None:
            for key in self.keys:
                yield self.make(*key)
            return
        try:
            self._fill()
            while self.pending:
                fut = self.pending.pop(0)
                result = fut.result()
                self._fill()
                yield result
        finally:
            self.close()

    def close(self) -> None:
        """Cancel pending work and stop the threads."""
        for fut in self.pending:
            fut.cancel()
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
