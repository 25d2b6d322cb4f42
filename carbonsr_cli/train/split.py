"""Spatial train/validation split on the parent grid (pure numpy, no I/O except polygons).

Validation must measure how well the model does in places it never trained on, so
the split is spatial: the parent grid is cut into square *blocks* of
``block_patches x block_patches`` patches (a patch is ``patch x patch`` parent cells,
12 x 12 with factor 10), and whole blocks go to validation. The validation blocks are
grown as compact clusters from seeded random start blocks (a compact region loses less
training area to the buffer than scattered blocks), until they hold about
``val_fraction`` of the valid parent cells. A user can instead give the validation
region as a bounding box or a polygon file (``--val-region``).

Guarantee (tested): every training patch stays at least ``buffer`` parent cells
(default one patch) away from every validation cell, so training and validation
patches never overlap and their receptive fields hardly touch.

All coordinates are parent-grid cells: rows from the top, cols from the left;
rectangles are half-open ``(r0, c0, r1, c1)``; patch positions are top-left corners
``(row, col)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from carbonsr_cli.errors import InputDataError, UsageError

from carbonsr_cli.errors import MissingInputError

__all__ = [
    "Split",
    "make_block_split",
    "make_region_split",
    "parse_val_region",
    "rect_mask",
    "mask_to_rects",
    "window_sums",
]

Rect = tuple[int, int, int, int]


def rect_mask(rects: Sequence[Sequence[int]], height: int, width: int) -> np.ndarray:
    """Boolean mask ``[height, width]`` that is True inside any of the half-open rectangles."""
    mask = np.zeros((height, width), dtype=bool)
    for r0, c0, r1, c1 in rects:
        mask[max(r0, 0) : max(min(r1, height), 0), max(c0, 0) : max(min(c1, width), 0)] = True
    return mask


def mask_to_rects(mask: np.ndarray) -> list[Rect]:
    """Cover a boolean mask exactly with rectangles (row runs merged down identical rows)."""
    rects: list[Rect] = []
    open_runs: dict[tuple[int, int], int] = {}  # (c0, c1) -> start row
    h = mask.shape[0]
    for r in range(h + 1):
        runs: set[tuple[int, int]] = set()
        if r < h:
            row = np.concatenate([[False], mask[r], [False]]).astype(np.int8)
            d = np.diff(row)
            starts = np.flatnonzero(d == 1)
            ends = np.flatnonzero(d == -1)
            runs = {(int(a), int(b)) for a, b in zip(starts, ends)}
        for run in list(open_runs):
            if run not in runs:
                rects.append((open_runs.pop(run), run[0], r, run[1]))
        for run in runs:
            open_runs.setdefault(run, r)
    return sorted(rects)


def window_sums(mask: np.ndarray, size: int) -> np.ndarray:
    """Number of True cells in every ``size x size`` window of ``mask``.

    Returns:
        int64 array ``[H - size + 1, W - size + 1]``; entry ``(r, c)`` counts the window
        whose top-left cell is ``(r, c)``. Empty when the mask is smaller than a window.
    """
    h, w = mask.shape
    if h < size or w < size:
        return np.zeros((max(h - size + 1, 0), max(w - size + 1, 0)), dtype=np.int64)
    sat = np.zeros((h + 1, w + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1)
    return sat[size:, size:] - sat[:-size, size:] - sat[size:, :-size] + sat[:-size, :-size]


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Chebyshev dilation of a boolean mask by ``radius`` cells (square structuring element)."""
    if radius <= 0 or not mask.any():
        return mask.copy()
    h, w = mask.shape
    padded = np.zeros((h + 2 * radius, w + 2 * radius), dtype=bool)
    padded[radius : radius + h, radius : radius + w] = mask
    counts = window_sums(padded, 2 * radius + 1)
    return counts > 0


@dataclass
class Split:
    """A spatial split of a ``height x width`` parent grid.

    Attributes:
        height: Parent grid rows.
        width: Parent grid cols.
        patch: Patch edge in parent cells (120 child cells / factor).
        buffer: Minimum distance in parent cells between a training patch and any
            validation cell (default: one patch).
        val_rects: Validation region as half-open rectangles ``(r0, c0, r1, c1)``.
        val_windows: Fixed validation windows (top-left ``(row, col)``, ``patch`` cells
            square), inside the validation region, in a deterministic order.
        method: ``"blocks"``, ``"bbox"`` or ``"polygon"``.
        seed: Seed of the block choice.
        val_fraction: Requested validation fraction (blocks method).
        block_patches: Block edge in patches (blocks method).
        max_nodata: Largest nodata fraction of a usable patch or validation window.
        source: The ``--val-region`` argument, if any.
    """

    height: int
    width: int
    patch: int
    buffer: int
    val_rects: list[Rect]
    val_windows: list[tuple[int, int]]
    method: str = "blocks"
    seed: int = 0
    val_fraction: float = 0.2
    block_patches: int = 3
    max_nodata: float = 0.5
    source: str | None = None
    _train_cache: dict[Any, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def val_mask(self) -> np.ndarray:
        """Boolean ``[height, width]`` mask of the validation region."""
        return rect_mask(self.val_rects, self.height, self.width)

    def forbidden_mask(self, buffer: int | None = None) -> np.ndarray:
        """Validation region dilated by ``buffer`` parent cells (default: the split's): no training
        cell may fall inside it."""
        return _dilate(self.val_mask(), self.buffer if buffer is None else int(buffer))

    def train_positions(self, valid: np.ndarray | None = None, *, max_positions: int = 4_000_000) -> np.ndarray:
        """Top-left corners of every allowed training patch.

        A position is allowed when its ``patch x patch`` window lies inside the grid,
        does not touch the buffered validation region, and has at most ``max_nodata``
        nodata cells. On huge grids the positions are thinned to a regular stride so
        that at most about ``max_positions`` remain.

        Args:
            valid: Optional boolean ``[height, width]`` mask of parent cells with data.
            max_positions: Upper bound on the number of positions returned (memory).

        Returns:
            int32 array ``[N, 2]`` of ``(row, col)``, sorted row-major.
        """
        key = (None if valid is None else hash(valid.tobytes()), max_positions)
        if key in self._train_cache:
            return self._train_cache[key]
        p = self.patch
        ok = window_sums(self.forbidden_mask(), p) == 0
        if valid is not None:
            nodata = window_sums(~valid.astype(bool), p)
            ok &= nodata <= self.max_nodata * p * p
        stride = max(1, math.ceil(math.sqrt(ok.size / max_positions))) if ok.size else 1
        if stride > 1:
            thin = np.zeros_like(ok)
            thin[::stride, ::stride] = True
            ok &= thin
        pos = np.argwhere(ok).astype(np.int32)
        self._train_cache[key] = pos
        return pos

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (stored in split.json and in every checkpoint)."""
        return {
            "method": self.method,
            "height": self.height,
            "width": self.width,
            "patch": self.patch,
            "buffer": self.buffer,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "block_patches": self.block_patches,
            "max_nodata": self.max_nodata,
            "source": self.source,
            "val_rects": [list(r) for r in self.val_rects],
            "val_windows": [list(w) for w in self.val_windows],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Split:
        """Rebuild a split from :meth:`to_dict` output."""
        return cls(
            height=int(d["height"]),
            width=int(d["width"]),
            patch=int(d["patch"]),
            buffer=int(d["buffer"]),
            val_rects=[tuple(int(v) for v in r) for r in d["val_rects"]],  # type: ignore[misc]
            val_windows=[(int(r), int(c)) for r, c in d["val_windows"]],
            method=str(d.get("method", "blocks")),
            seed=int(d.get("seed", 0)),
            val_fraction=float(d.get("val_fraction", 0.2)),
            block_patches=int(d.get("block_patches", 3)),
            max_nodata=float(d.get("max_nodata", 0.5)),
            source=d.get("source"),
        )


def _val_windows(val: np.ndarray, patch: int, valid: np.ndarray | None, max_nodata: float, anchors: Sequence[Rect]) -> list[tuple[int, int]]:
    """Non-overlapping validation windows inside ``val``, tiled from each anchor rectangle's corner."""
    h, w = val.shape
    inside = window_sums(val, patch)
    bad = window_sums(~valid, patch) if valid is not None else None
    taken = np.zeros_like(val)
    out: list[tuple[int, int]] = []
    for r0, c0, r1, c1 in anchors:
        for r in range(r0, r1 - patch + 1, patch):
            for c in range(c0, c1 - patch + 1, patch):
                if r < 0 or c < 0 or r + patch > h or c + patch > w:
                    continue
                if inside[r, c] != patch * patch or taken[r : r + patch, c : c + patch].any():
                    continue
                if bad is not None and bad[r, c] > max_nodata * patch * patch:
                    continue
                taken[r : r + patch, c : c + patch] = True
                out.append((r, c))
    return sorted(out)


def _check(split: Split, valid: np.ndarray | None, what: str) -> Split:
    if not split.val_windows:
        raise UsageError(
            f"the validation region ({what}) holds no complete {split.patch}x{split.patch}-cell window with data; "
            "give a larger --val-region or a larger --val-fraction"
        )
    if len(split.train_positions(valid)) == 0:
        raise UsageError(
            f"no training patch is left outside the validation region ({what}) and its {split.buffer}-cell buffer; "
            "use a smaller --val-fraction or --val-region, or a larger raster "
            f"(grid {split.height}x{split.width} parent cells, patch {split.patch})"
        )
    return split


def make_block_split(
    height: int,
    width: int,
    *,
    patch: int = 12,
    block_patches: int = 3,
    val_fraction: float = 0.2,
    seed: int = 0,
    buffer: int | None = None,
    valid: np.ndarray | None = None,
    max_nodata: float = 0.5,
) -> Split:
    """Block split: compact clusters of blocks chosen by ``seed`` hold ~``val_fraction`` of the data.

    On small grids where blocks of ``block_patches`` patches leave no training patch, smaller
    blocks are tried (down to one patch) before giving up.

    Args:
        height: Parent grid rows.
        width: Parent grid cols.
        patch: Patch edge in parent cells.
        block_patches: Block edge in patches (the largest tried).
        val_fraction: Target share of valid parent cells in validation, in (0, 1).
        seed: Seed of the block choice (same seed, same split).
        buffer: Gap in parent cells between training patches and validation (default ``patch``).
        valid: Optional boolean ``[height, width]`` mask of parent cells with data.
        max_nodata: Largest nodata fraction of a usable window.

    Raises:
        UsageError: Bad fraction, grid too small for a validation window plus training.
    """
    for bp in range(max(int(block_patches), 1), 0, -1):
        try:
            return _make_block_split(
                height, width, patch=patch, block_patches=bp, val_fraction=val_fraction, seed=seed,
                buffer=buffer, valid=valid, max_nodata=max_nodata,
            )
        except UsageError:
            if bp == 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _make_block_split(
    height: int,
    width: int,
    *,
    patch: int = 12,
    block_patches: int = 3,
    val_fraction: float = 0.2,
    seed: int = 0,
    buffer: int | None = None,
    valid: np.ndarray | None = None,
    max_nodata: float = 0.5,
) -> Split:
    """Block split: compact clusters of blocks chosen by ``seed`` hold ~``val_fraction`` of the data.

    Args:
        height: Parent grid rows.
        width: Parent grid cols.
        patch: Patch edge in parent cells.
        block_patches: Block edge in patches.
        val_fraction: Target share of valid parent cells in validation, in (0, 1).
        seed: Seed of the block choice (same seed, same split).
        buffer: Gap in parent cells between training patches and validation (default ``patch``).
        valid: Optional boolean ``[height, width]`` mask of parent cells with data.
        max_nodata: Largest nodata fraction of a usable window.

    Raises:
        UsageError: Bad fraction, grid too small for a validation window plus training.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if height < patch or width < patch:
        raise UsageError(f"the raster ({height}x{width} parent cells) is smaller than one {patch}x{patch} patch")
    buffer = patch if buffer is None else int(buffer)
    if valid is None:
        valid_mask = np.ones((height, width), dtype=bool)
    else:
        valid_mask = valid.astype(bool)
    edge = block_patches * patch
    nbr, nbc = math.ceil(height / edge), math.ceil(width / edge)
    area = np.zeros((nbr, nbc), dtype=np.int64)
    full = np.zeros((nbr, nbc), dtype=bool)
    for i in range(nbr):
        for j in range(nbc):
            sub = valid_mask[i * edge : (i + 1) * edge, j * edge : (j + 1) * edge]
            area[i, j] = int(sub.sum())
            # a block must hold at least one complete window to be useful for validation
            full[i, j] = sub.shape[0] >= patch and sub.shape[1] >= patch and area[i, j] >= (1 - max_nodata) * patch * patch
    target = val_fraction * max(int(valid_mask.sum()), 1)
    rng = np.random.default_rng([int(seed), 7919])
    candidates = [(int(i), int(j)) for i, j in np.argwhere(full)]
    if not candidates:
        raise UsageError(f"the raster ({height}x{width} parent cells) has no block with enough data for validation")
    chosen: list[tuple[int, int]] = []
    chosen_set: set[tuple[int, int]] = set()
    n_clusters = max(1, round(target / (edge * edge) / 9))
    clusters: list[list[tuple[int, int]]] = []
    total = 0

    def add(b: tuple[int, int]) -> None:
        nonlocal total
        chosen.append(b)
        chosen_set.add(b)
        total += int(area[b])

    order = [candidates[k] for k in rng.permutation(len(candidates))]
    for b in order[:n_clusters]:
        clusters.append([b])
        add(b)
    k = 0
    while total < target:
        cluster = clusters[k % len(clusters)]
        k += 1
        frontier = sorted(
            {
                (i + di, j + dj)
                for i, j in cluster
                for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1))
                if 0 <= i + di < nbr and 0 <= j + dj < nbc and full[i + di, j + dj] and (i + di, j + dj) not in chosen_set
            }
        )
        if not frontier:
            rest = [b for b in order if b not in chosen_set]
            if not rest or k > 10 * len(candidates):
                break
            nxt = rest[0]
            clusters.append([nxt])
        else:
            nxt = frontier[int(rng.integers(len(frontier)))]
            cluster.append(nxt)
        if abs(total + int(area[nxt]) - target) >= abs(total - target):
            if cluster and cluster[-1] == nxt:
                cluster.pop()
            elif clusters[-1] == [nxt]:
                clusters.pop()
            break
        add(nxt)
    rects = [(i * edge, j * edge, min((i + 1) * edge, height), min((j + 1) * edge, width)) for i, j in sorted(chosen)]
    val = rect_mask(rects, height, width)
    windows = _val_windows(val, patch, None if valid is None else valid_mask, max_nodata, rects)
    split = Split(
        height=height,
        width=width,
        patch=patch,
        buffer=buffer,
        val_rects=mask_to_rects(val),
        val_windows=windows,
        method="blocks",
        seed=int(seed),
        val_fraction=float(val_fraction),
        block_patches=int(block_patches),
        max_nodata=float(max_nodata),
    )
    return _check(split, None if valid is None else valid_mask, f"{len(chosen)} block(s) of {edge}x{edge} cells")


def make_region_split(
    val: np.ndarray,
    *,
    patch: int = 12,
    buffer: int | None = None,
    valid: np.ndarray | None = None,
    max_nodata: float = 0.5,
    method: str = "bbox",
    source: str | None = None,
) -> Split:
    """Split with a user-given validation region (boolean ``[height, width]`` mask).

    Raises:
        UsageError: Region empty, without a complete window, or leaving no training patch.
    """
    height, width = val.shape
    if not val.any():
        raise UsageError("the validation region does not overlap the raster", source)
    ys, xs = np.nonzero(val)
    anchor = [(int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)]
    valid_mask = None if valid is None else valid.astype(bool)
    windows = _val_windows(val, patch, valid_mask, max_nodata, anchor)
    split = Split(
        height=height,
        width=width,
        patch=patch,
        buffer=patch if buffer is None else int(buffer),
        val_rects=mask_to_rects(val),
        val_windows=windows,
        method=method,
        seed=0,
        val_fraction=float(val.sum() / val.size),
        block_patches=0,
        max_nodata=float(max_nodata),
        source=source,
    )
    return _check(split, valid_mask, f"--val-region {source}")


def parse_val_region(spec: str, transform: Any, height: int, width: int, crs: Any = None) -> tuple[np.ndarray, str]:
    """Turn a ``--val-region`` value into a boolean parent-cell mask.

    Args:
        spec: ``"minx,miny,maxx,maxy"`` in the parent raster's CRS units, or the path of a
            polygon file (.gpkg, .geojson, .shp; reprojected to the parent CRS).
        transform: Parent grid affine transform (north-up).
        height: Parent grid rows.
        width: Parent grid cols.
        crs: Parent CRS (needed for polygon files).

    Returns:
        ``(mask [height, width] bool, method)`` with method ``"bbox"`` or ``"polygon"``;
        a cell belongs to the region when its centre lies inside.

    Raises:
        UsageError: Malformed bounding box. InputDataError: unreadable polygon file.
    """
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) == 4 and not Path(spec).exists():
        try:
            minx, miny, maxx, maxy = (float(p) for p in parts)
        except ValueError:
            raise UsageError(f"--val-region {spec!r}: expected minx,miny,maxx,maxy (numbers) or a polygon file") from None
        if not (minx < maxx and miny < maxy):
            raise UsageError(f"--val-region {spec!r}: need minx < maxx and miny < maxy")
        cols = (np.arange(width) + 0.5) * transform.a + transform.c
        rows = (np.arange(height) + 0.5) * transform.e + transform.f
        in_c = (cols >= minx) & (cols <= maxx)
        in_r = (rows >= miny) & (rows <= maxy)
        return np.outer(in_r, in_c), "bbox"
    path = Path(spec)
    if not path.exists():
        raise MissingInputError("--val-region: not a bounding box (minx,miny,maxx,maxy) and no such file", path)
    try:
        import geopandas as gpd
        from rasterio.features import rasterize

        gdf = gpd.read_file(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a data problem
        raise InputDataError(f"cannot read the validation polygons: {exc}", path) from None
    if gdf.empty:
        raise InputDataError("the validation polygon file has no features", path)
    if crs is not None and gdf.crs is not None:
        gdf = gdf.to_crs(crs)
    geoms = [g for g in gdf.geometry if g is not None and not g.is_empty]
    mask = rasterize(((g, 1) for g in geoms), out_shape=(height, width), transform=transform, fill=0, dtype="uint8")
    return mask.astype(bool), "polygon"
