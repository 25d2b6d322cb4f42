"""Inference tiles aligned to parent cells, edge padding, and smooth blending of overlaps.

Geometry (all computed on the parent grid, then scaled by ``factor``, so that no parent
block is ever split):

- A tile is ``tile_child x tile_child`` child cells (default 120 = 12 x 12 parent cells at
  factor 10); ``tile_child`` must be a multiple of ``factor``.
- ``overlap_parent`` (default 2) is the *context margin* on each side of a tile, in whole
  parent cells. Tiles advance by ``stride = tile_parent - 2 * overlap_parent`` parent cells,
  so neighbouring tiles share ``2 * overlap_parent`` parent cells and every parent cell has at
  least ``overlap_parent`` cells of context on each side (reflect-padded at raster edges).
  Tile ``(i, j)`` covers parent rows ``i*stride - overlap .. i*stride - overlap + tile_parent``
  (likewise for columns) and *owns* (``core``) rows ``i*stride .. (i+1)*stride``.
  Design choice: a margin on both sides (instead of ``stride = tile - overlap``) costs
  ``(tile / stride)**2`` = 2.25x the model calls at the defaults, but it gives the first
  row/column of the raster the same context as the interior, and symmetric overlaps blend
  with one weight profile for every tile.
- Windows may extend past the raster: read the clipped ``read_window`` and pad with
  :func:`pad_reflect` (edge-inclusive mirror, so padding consists of whole mirrored parent
  blocks); ``valid`` marks the part of the tile inside the raster.
- Blending: predictions (in the log domain) are accumulated as ``sum(w * pred) / sum(w)`` with
  a separable weight that rises as ``sin^2`` over the ``2 * overlap`` shared cells and is 1 in
  between; the weights of two neighbours sum to 1 in their shared zone (partition of unity) and
  a floor (1e-3) keeps every covered cell's weight > 0. Blending is per child cell, before the
  physics step, which then works per parent cell, so conservation is never affected.
- Memory: :func:`iter_tile_rows` yields one row of tiles at a time (lazily), and
  :class:`BlendStream` keeps only the child rows of the current tile row.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from functools import lru_cache

import numpy as np
from rasterio.windows import Window

from carbonsr_cli.errors import UsageError
from carbonsr_cli.grids import validate_factor

__all__ = [
    "TileSpec",
    "Tile",
    "TileLayout",
    "iter_tile_rows",
    "pad_reflect",
    "blend_weights_1d",
    "blend_weights",
    "Blender",
    "BlendStream",
]

#: Minimum blending weight of a covered child cell.
WEIGHT_FLOOR = 1e-3


@dataclass(frozen=True)
class TileSpec:
    """Tile size and overlap.

    Attributes:
        tile: Tile edge in child cells (multiple of ``factor``; default 120).
        overlap_parent: Context margin on each tile side, in parent cells (default 2).
    """

    tile: int = 120
    overlap_parent: int = 2


@dataclass(frozen=True)
class Tile:
    """One inference tile.

    Attributes:
        row: Tile-row index.
        col: Tile-column index.
        child_window: Full tile window on the child grid (may extend past the raster).
        parent_window: Same window on the parent grid (``child_window / factor``).
        read_window: ``child_window`` clipped to the raster (what to read).
        pad: ``((top, bottom), (left, right))`` child cells to pad around the read data
            (multiples of ``factor``).
        valid: ``(row_slice, col_slice)`` of the tile that lies inside the raster.
        core: Child window (clipped to the raster) this tile owns; cores partition the raster.
        factor: Child cells per parent cell.
        overlap_parent: Context margin in parent cells (for the weights).
    """

    row: int
    col: int
    child_window: Window
    parent_window: Window
    read_window: Window
    pad: tuple[tuple[int, int], tuple[int, int]]
    valid: tuple[slice, slice]
    core: Window
    factor: int
    overlap_parent: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the full tile in child cells."""
        return (int(self.child_window.height), int(self.child_window.width))

    @property
    def parent_read_window(self) -> Window:
        """``read_window`` on the parent grid."""
        f = self.factor
        w = self.read_window
        return Window(w.col_off // f, w.row_off // f, w.width // f, w.height // f)

    @property
    def parent_pad(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``pad`` in parent cells."""
        f = self.factor
        (t, b), (l, r) = self.pad
        return ((t // f, b // f), (l // f, r // f))

    def mask(self) -> np.ndarray:
        """Boolean ``[rows, cols]``: True where the tile lies inside the raster."""
        m = np.zeros(self.shape, dtype=bool)
        m[self.valid] = True
        return m

    def weights(self) -> np.ndarray:
        """Blending weights ``[rows, cols]`` float32 (see module docstring)."""
        h, w = self.shape
        return blend_weights(h, w, self.overlap_parent * self.factor)


@lru_cache(maxsize=16)
def _weights_1d(length: int, ramp: int, floor: float) -> np.ndarray:
    w = np.ones(length, dtype=np.float64)
    if ramp > 0:
        r = min(ramp, length)
        i = np.arange(r, dtype=np.float64)
        up = np.sin(0.5 * np.pi * (i + 0.5) / ramp) ** 2
        w[:r] = np.minimum(w[:r], up)
        w[length - r :] = np.minimum(w[length - r :], up[::-1])
    w = np.maximum(w, floor).astype(np.float32)
    w.setflags(write=False)
    return w


def blend_weights_1d(length: int, ramp: int, floor: float = WEIGHT_FLOOR) -> np.ndarray:
    """1-D blending weight: ``sin^2`` rise over ``ramp`` cells at both ends, 1 in between.

    ``w[i] = sin^2(pi/2 * (i + 0.5) / ramp)`` for ``i < ramp`` (mirrored at the end), so the
    falling end of one tile and the rising start of its neighbour, offset by ``length - ramp``,
    sum to exactly 1. Values are at least ``floor``.

    Returns:
        float32 ``[length]`` (read-only, cached).
    """
    return _weights_1d(int(length), int(ramp), float(floor))


def blend_weights(height: int, width: int, ramp: int, floor: float = WEIGHT_FLOOR) -> np.ndarray:
    """Separable 2-D blending weight ``[height, width]`` float32 (outer product of 1-D weights)."""
    return np.outer(blend_weights_1d(height, ramp, floor), blend_weights_1d(width, ramp, floor))


def pad_reflect(array: np.ndarray, pad: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Pad the last two axes by mirroring (edge cell included), and return the inside mask.

    The mirror includes the edge cell (numpy ``symmetric``), so padding by a multiple of
    ``factor`` an array of whole parent blocks yields whole mirrored parent blocks. Pads larger
    than the array repeat the mirroring.

    Args:
        array: ``[..., h, w]`` data read from ``Tile.read_window`` (h, w >= 1).
        pad: ``((top, bottom), (left, right))`` in cells.

    Returns:
        ``(padded [..., h + top + bottom, w + left + right], mask [H, W] bool)`` where mask is
        True on the original cells.
    """
    (t, b), (l, r) = (int(pad[0][0]), int(pad[0][1])), (int(pad[1][0]), int(pad[1][1]))
    h, w = array.shape[-2:]
    if h < 1 or w < 1:
        raise ValueError("cannot pad an empty array")
    widths = [(0, 0)] * (array.ndim - 2) + [(t, b), (l, r)]
    padded = np.pad(array, widths, mode="symmetric") if (t or b or l or r) else array
    mask = np.zeros((h + t + b, w + l + r), dtype=bool)
    mask[t : t + h, l : l + w] = True
    return padded, mask


@dataclass(frozen=True)
class TileLayout:
    """Tile geometry over a parent grid of ``parent_height x parent_width`` cells.

    Attributes:
        parent_height: Parent rows.
        parent_width: Parent cols.
        factor: Child cells per parent cell (integer >= 2).
        tile_child: Tile edge in child cells (multiple of ``factor``).
        overlap_parent: Context margin per side, in parent cells.
    """

    parent_height: int
    parent_width: int
    factor: int = 10
    tile_child: int = 120
    overlap_parent: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", validate_factor(self.factor))
        if self.parent_height < 1 or self.parent_width < 1:
            raise UsageError(f"empty grid {self.parent_height} x {self.parent_width}")
        if self.tile_child <= 0 or self.tile_child % self.factor:
            raise UsageError(f"tile size {self.tile_child} must be a positive multiple of factor {self.factor}")
        if self.overlap_parent < 0:
            raise UsageError(f"overlap must be >= 0 parent cells, got {self.overlap_parent}")
        if self.stride_parent < 1:
            raise UsageError(
                f"overlap {self.overlap_parent} too large for a tile of {self.tile_parent} parent cells "
                f"(need tile > 2 * overlap)"
            )

    @property
    def tile_parent(self) -> int:
        """Tile edge in parent cells."""
        return self.tile_child // self.factor

    @property
    def stride_parent(self) -> int:
        """Step between tiles in parent cells (``tile_parent - 2 * overlap_parent``)."""
        return self.tile_parent - 2 * self.overlap_parent

    @property
    def n_rows(self) -> int:
        """Number of tile rows."""
        return math.ceil(self.parent_height / self.stride_parent)

    @property
    def n_cols(self) -> int:
        """Number of tile columns."""
        return math.ceil(self.parent_width / self.stride_parent)

    @property
    def n_tiles(self) -> int:
        """Total number of tiles."""
        return self.n_rows * self.n_cols

    @property
    def child_height(self) -> int:
        """Rows of the child grid."""
        return self.parent_height * self.factor

    @property
    def child_width(self) -> int:
        """Cols of the child grid."""
        return self.parent_width * self.factor

    def _axis(self, k: int, n_parent: int) -> tuple[int, tuple[int, int], tuple[int, int], tuple[int, int]]:
        """Parent start, read range, pad and core range of tile index ``k`` along one axis."""
        s, o, tp = self.stride_parent, self.overlap_parent, self.tile_parent
        start = k * s - o
        stop = start + tp
        r0, r1 = max(start, 0), min(stop, n_parent)
        pad = (r0 - start, stop - r1)
        core = (k * s, min((k + 1) * s, n_parent))
        return start, (r0, r1), pad, core

    def tile(self, i: int, j: int) -> Tile:
        """Tile at tile-row ``i``, tile-column ``j``."""
        f, tp = self.factor, self.tile_parent
        rs, (rr0, rr1), rpad, (rc0, rc1) = self._axis(i, self.parent_height)
        cs, (cr0, cr1), cpad, (cc0, cc1) = self._axis(j, self.parent_width)
        parent_window = Window(cs, rs, tp, tp)
        child_window = Window(cs * f, rs * f, tp * f, tp * f)
        read_window = Window(cr0 * f, rr0 * f, (cr1 - cr0) * f, (rr1 - rr0) * f)
        pad = ((rpad[0] * f, rpad[1] * f), (cpad[0] * f, cpad[1] * f))
        valid = (slice(pad[0][0], tp * f - pad[0][1]), slice(pad[1][0], tp * f - pad[1][1]))
        core = Window(cc0 * f, rc0 * f, (cc1 - cc0) * f, (rc1 - rc0) * f)
        return Tile(i, j, child_window, parent_window, read_window, pad, valid, core, f, self.overlap_parent)

    def row(self, i: int) -> list[Tile]:
        """All tiles of tile-row ``i``, left to right."""
        return [self.tile(i, j) for j in range(self.n_cols)]

    def rows(self) -> Iterator[list[Tile]]:
        """Lazily yield the tile rows, top to bottom."""
        for i in range(self.n_rows):
            yield self.row(i)

    def ready_until(self, i: int) -> int:
        """Child row up to which output is final once tile-rows ``0..i`` are blended.

        Equals the first child row of tile-row ``i + 1`` (clipped to the raster), or the raster
        height after the last row. Always a multiple of ``factor``.
        """
        if i >= self.n_rows - 1:
            return self.child_height
        nxt = (i + 1) * self.stride_parent - self.overlap_parent
        return max(0, min(nxt, self.parent_height)) * self.factor


def iter_tile_rows(
    parent_h: int,
    parent_w: int,
    factor: int = 10,
    tile_child: int = 120,
    overlap_parent: int = 2,
) -> Iterator[list[Tile]]:
    """Lazily yield rows of :class:`Tile` covering a ``parent_h x parent_w`` parent grid.

    See the module docstring for the geometry; memory use is one row of tiles.
    """
    return TileLayout(parent_h, parent_w, factor, tile_child, overlap_parent).rows()


class Blender:
    """Accumulate overlapping tile predictions with smooth weights over a band of child cells.

    The buffer covers child rows ``row_off .. row_off + height`` and cols
    ``col_off .. col_off + width``; parts of a tile outside it are ignored.

    Args:
        height: Rows of the band (child cells).
        width: Cols of the band (child cells).
        channels: Leading channels of the predictions (e.g. years T): predictions are
            ``[channels, th, tw]``.
        row_off: Child row of the band's first row.
        col_off: Child col of the band's first col.
        device: None: numpy buffers; a torch device: tensor buffers there.
        weights_cache: Tile weights already on ``device`` (shared by the blenders of one
            :class:`BlendStream`: uploading them again for every band would wait for the GPU's
            queued work, a pageable copy, once per tile row).
    """

    def __init__(
        self, height: int, width: int, channels: int = 1, *, row_off: int = 0, col_off: int = 0, device: Any = None,
        weights_cache: dict[tuple[Any, ...], Any] | None = None,
    ) -> None:
        self.height, self.width, self.channels = int(height), int(width), int(channels)
        self.row_off, self.col_off = int(row_off), int(col_off)
        self.device = device
        if device is None:
            self.acc = np.zeros((self.channels, self.height, self.width), dtype=np.float32)
            self.wsum = np.zeros((self.height, self.width), dtype=np.float32)
        else:  # torch tensors on the device (predictions stay where the model made them)
            import torch

            self.acc = torch.zeros((self.channels, self.height, self.width), dtype=torch.float32, device=device)
            self.wsum = torch.zeros((self.height, self.width), dtype=torch.float32, device=device)
            self._w_cache: dict[tuple[Any, ...], Any] = {} if weights_cache is None else weights_cache

    def add(self, pred: np.ndarray, tile: Tile | Window, weights: np.ndarray | None = None) -> None:
        """Add a tile prediction.

        Args:
            pred: ``[channels, th, tw]`` (or ``[th, tw]`` with one channel) over the tile's full
                ``child_window`` (padding included; padded cells are dropped here).
            tile: The tile, or a child window of the prediction's extent.
            weights: ``[th, tw]`` weights; default ``tile.weights()`` (ones for a bare window).
        """
        window = tile.child_window if isinstance(tile, Tile) else tile
        p = np.asarray(pred, dtype=np.float32) if self.device is None else pred.float()
        if p.ndim == 2:
            p = p[None]
        th, tw = int(window.height), int(window.width)
        if tuple(p.shape) != (self.channels, th, tw):
            raise ValueError(f"prediction shape {tuple(p.shape)} != ({self.channels}, {th}, {tw})")
        if weights is None:
            weights = tile.weights() if isinstance(tile, Tile) else np.ones((th, tw), np.float32)
        if self.device is not None:
            key = (th, tw, tile.overlap_parent * tile.factor if isinstance(tile, Tile) else -1)
            if isinstance(tile, Tile) and key in self._w_cache:
                weights = self._w_cache[key]
            else:
                import torch

                weights = torch.as_tensor(np.asarray(weights, dtype=np.float32)).to(self.device)
                if isinstance(tile, Tile):
                    self._w_cache[key] = weights
        r0 = int(window.row_off) - self.row_off
        c0 = int(window.col_off) - self.col_off
        br0, br1 = max(r0, 0), min(r0 + th, self.height)
        bc0, bc1 = max(c0, 0), min(c0 + tw, self.width)
        if br1 <= br0 or bc1 <= bc0:
            return
        tr = slice(br0 - r0, br1 - r0)
        tc = slice(bc0 - c0, bc1 - c0)
        w = weights[tr, tc]
        self.acc[:, br0:br1, bc0:bc1] += p[:, tr, tc] * w
        self.wsum[br0:br1, bc0:bc1] += w

    def add_row(self, row: Sequence[Tile], preds: Sequence[Any]) -> bool:
        """Add a row of equally spaced, equally shaped tiles with one ``fold`` (torch only).

        Same sums as :meth:`add` tile by tile (up to float rounding of the summation order),
        in a handful of kernels instead of four per tile. Returns False (nothing added) when
        the row does not qualify; the caller then adds tile by tile.
        """
        if self.device is None or len(row) < 2:
            return False
        import torch
        import torch.nn.functional as F  # noqa: N812

        wins = [t.child_window for t in row]
        th, tw = int(wins[0].height), int(wins[0].width)
        step = int(wins[1].col_off - wins[0].col_off)
        if step <= 0 or any(
            int(w.height) != th or int(w.width) != tw or int(w.row_off) != int(wins[0].row_off)
            or int(w.col_off) != int(wins[0].col_off) + k * step
            for k, w in enumerate(wins)
        ):
            return False
        n = len(row)
        p = torch.stack([q.float() if q.ndim == 3 else q.float()[None] for q in preds])  # [N, C, th, tw]
        if tuple(p.shape[1:]) != (self.channels, th, tw):
            raise ValueError(f"prediction shape {tuple(p.shape[1:])} != ({self.channels}, {th}, {tw})")
        key = (th, tw, row[0].overlap_parent * row[0].factor)
        w = self._w_cache.get(key)
        if w is None:
            w = self._w_cache[key] = torch.as_tensor(np.asarray(row[0].weights(), dtype=np.float32)).to(self.device)
        width = (n - 1) * step + tw
        fold = {"output_size": (th, width), "kernel_size": (th, tw), "stride": (th, step)}
        cols = (p * w).permute(1, 2, 3, 0).reshape(1, self.channels * th * tw, n)
        acc = F.fold(cols, **fold)[0]  # [C, th, width]
        wkey = ("wsum", th, tw, step, n, key[2])
        wsum = self._w_cache.get(wkey)
        if wsum is None:
            wsum = self._w_cache[wkey] = F.fold(w.reshape(1, th * tw, 1).expand(1, th * tw, n).contiguous(), **fold)[0, 0]
        r0 = int(wins[0].row_off) - self.row_off
        c0 = int(wins[0].col_off) - self.col_off
        br0, br1 = max(r0, 0), min(r0 + th, self.height)
        bc0, bc1 = max(c0, 0), min(c0 + width, self.width)
        if br1 > br0 and bc1 > bc0:
            tr, tc = slice(br0 - r0, br1 - r0), slice(bc0 - c0, bc1 - c0)
            self.acc[:, br0:br1, bc0:bc1] += acc[:, tr, tc]
            self.wsum[br0:br1, bc0:bc1] += wsum[tr, tc]
        return True

    def finalize(self, rows: slice | None = None) -> np.ndarray:
        """Blended band ``[channels, height, width]`` float32 (NaN where nothing was added)."""
        rows = rows or slice(None)
        w = self.wsum[rows]
        if self.device is not None:  # torch: no boolean-mask assignment (it waits for the GPU)
            import torch

            return torch.where(w > 0, self.acc[:, rows] / w, float("nan"))
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.acc[:, rows] / w
        out[:, w <= 0] = float("nan")
        return out


class BlendStream:
    """Blend rows of tiles and hand back finished bands of child rows, aligned to parent cells.

    Keeps at most one tile row of child rows (plus the overlap carried to the next row) in
    memory: ``channels * tile_child * child_width * 8`` bytes.

    Example:
        >>> stream = BlendStream(layout, channels=T)
        >>> for i, row in enumerate(layout.rows()):
        ...     preds = [model(tile) for tile in row]          # [T, 120, 120] each
        ...     for window, band in stream.push(i, row, preds):  # band [T, h, child_width]
        ...         write(band, window)

    Args:
        layout: The tile layout.
        channels: Channels of each prediction.
    """

    def __init__(self, layout: TileLayout, channels: int = 1, device: Any = None) -> None:
        self.layout = layout
        self.channels = int(channels)
        self.device = device  # None: numpy bands; a torch device: tensor bands there
        self.done = 0  # child rows already handed back
        self._blender: Blender | None = None
        self._weights: dict[tuple[Any, ...], Any] = {}  # tile weights on the device, for every band

    def _ensure(self, start: int, stop: int) -> Blender:
        """Blender covering child rows ``self.done .. stop`` (carrying what is unfinished)."""
        w = self.layout.child_width
        old = self._blender
        if old is not None and old.row_off == self.done and old.row_off + old.height >= stop:
            return old
        new = Blender(stop - self.done, w, self.channels, row_off=self.done, device=self.device,
                      weights_cache=self._weights)
        if old is not None:
            lo = max(self.done, old.row_off)
            hi = min(old.row_off + old.height, stop)
            if hi > lo:
                new.acc[:, lo - self.done : hi - self.done] = old.acc[:, lo - old.row_off : hi - old.row_off]
                new.wsum[lo - self.done : hi - self.done] = old.wsum[lo - old.row_off : hi - old.row_off]
        self._blender = new
        return new

    def push(self, i: int, row: Sequence[Tile], preds: Sequence[np.ndarray]) -> list[tuple[Window, np.ndarray]]:
        """Add the predictions of tile-row ``i``; return ``[(child_window, band)]`` of finished rows.

        The list is empty or has one element (not a generator: the predictions are added even
        if the result is ignored).

        ``band`` is ``[channels, h, child_width]`` float32 (a tensor on ``device`` when the
        stream has one) and ``child_window`` starts and ends on parent-cell boundaries. After the last row, every child row has been yielded once.
        """
        if len(row) != len(preds):
            raise ValueError("one prediction per tile is required")
        ch = self.layout.child_height
        stop = min(max(int(t.child_window.row_off + t.child_window.height) for t in row), ch)
        blender = self._ensure(self.done, max(stop, self.done))
        if self.device is None or not blender.add_row(row, preds):
            for tile, pred in zip(row, preds):
                blender.add(pred, tile)
        ready = self.layout.ready_until(i)
        if ready <= self.done:
            return []
        band = blender.finalize(slice(0, ready - self.done))
        window = Window(0, self.done, self.layout.child_width, ready - self.done)
        self.done = ready
        return [(window, band)]


#: Rows of GDAL's warped-VRT blocks: a warped aux pixel depends on the block it falls in, so
#: torchrun parts start on multiples of it (``carbonsr_cli.downscale.distributed``).
VRT_BLOCK_ROWS = 128


def align_rows(layout: Any) -> int:
    """Alignment of torchrun part grids (and of baseline bands) in parent rows: a multiple of the tile stride whose child rows
    are a multiple of :data:`VRT_BLOCK_ROWS` (64 at factor 10). ``CARBONSR_DIST_ALIGN_VRT=0``:
    the tile stride only (less duplicated work; warped aux may then differ from one process
    in the last bits)."""
    f = layout.factor
    if os.environ.get("CARBONSR_DIST_ALIGN_VRT", "1").strip() == "0":  # less work, not bitwise
        return layout.stride_parent
    unit = VRT_BLOCK_ROWS // math.gcd(VRT_BLOCK_ROWS, f)
    return layout.stride_parent * unit // math.gcd(layout.stride_parent, unit)
