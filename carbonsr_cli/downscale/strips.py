"""Aux inputs of the downscale model path, read once per row strip by threads or processes.

Tiles overlap: with 12-parent-cell tiles and a 2-cell margin a tile row spans 12 parent rows
but advances by 8, so reading each tile row's extent reads most aux rows 1.5 times. Here the
rows are cut into *strips* of ``stride_parent`` rows (strip ``k``: parent rows
``[k * s - o, (k + 1) * s - o)`` clipped to the grid), each strip is read once per column
chunk, and a tile row is assembled from the two or three strips it spans
(:meth:`StripGeometry.parts`), mirror-padded at the raster edges exactly as
:func:`carbonsr_cli.tiling.pad_reflect` pads (numpy ``symmetric``).

The readers that fill the strips and the feed that schedules them: :mod:`.readers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from carbonsr_cli.devices import to_device

__all__ = ["StripGeometry", "assemble", "symmetric_index"]


def symmetric_index(start: int, stop: int, n: int) -> np.ndarray:
    """Indices into ``[0, n)`` of positions ``start..stop-1`` mirrored at both ends.

    The mirror includes the edge cell (numpy ``symmetric``) and repeats for positions more
    than ``n`` outside, as ``np.pad(..., mode="symmetric")`` does.
    """
    x = np.arange(start, stop, dtype=np.int64) % (2 * n)
    return np.where(x >= n, 2 * n - 1 - x, x)


@dataclass(frozen=True)
class StripGeometry:
    """Strips of a :class:`~carbonsr_cli.tiling.TileLayout`, per column chunk of tiles.

    Attributes:
        layout: Tile layout (parent cells).
        chunks: ``(j0, j1)`` tile-column runs of a tile row.
        factor: Child cells per parent cell.
    """

    layout: Any
    chunks: tuple[tuple[int, int], ...]
    factor: int

    @property
    def n_strips(self) -> int:
        """Strips down to the last row any tile row needs."""
        lay = self.layout
        last = min((lay.n_rows - 1) * lay.stride_parent - lay.overlap_parent + lay.tile_parent, lay.parent_height)
        return (last - 1 + lay.overlap_parent) // lay.stride_parent + 1

    def strip_rows(self, k: int) -> tuple[int, int]:
        """Parent rows ``[a, b)`` of strip ``k`` (clipped to the grid; may be empty)."""
        lay = self.layout
        a = k * lay.stride_parent - lay.overlap_parent
        a, b = max(a, 0), min(a + lay.stride_parent, lay.parent_height)
        return a, max(a, b)

    def row_extent(self, i: int) -> tuple[int, int]:
        """Parent rows ``[er0, er1)`` of tile row ``i`` (unclipped: may pass the raster edges)."""
        lay = self.layout
        er0 = i * lay.stride_parent - lay.overlap_parent
        return er0, er0 + lay.tile_parent

    def col_extent(self, j: int) -> tuple[int, int]:
        """Parent cols ``[ec0, ec1)`` of chunk ``j``'s tiles (unclipped)."""
        lay = self.layout
        j0, j1 = self.chunks[j]
        return j0 * lay.stride_parent - lay.overlap_parent, (j1 - 1) * lay.stride_parent - lay.overlap_parent + lay.tile_parent

    def clipped_cols(self, j: int) -> tuple[int, int]:
        """Parent cols ``[cc0, cc1)`` of chunk ``j`` inside the grid (what a strip reads)."""
        ec0, ec1 = self.col_extent(j)
        return max(ec0, 0), min(ec1, self.layout.parent_width)

    def strips_of_row(self, i: int) -> list[int]:
        """Non-empty strips holding the rows of tile row ``i`` inside the grid."""
        lay = self.layout
        er0, er1 = self.row_extent(i)
        rr0, rr1 = max(er0, 0), min(er1, lay.parent_height)
        s, o = lay.stride_parent, lay.overlap_parent
        return [k for k in range((rr0 + o) // s, (rr1 - 1 + o) // s + 1) if self.strip_rows(k)[1] > self.strip_rows(k)[0]]

    def child_window(self, k: int, j: int) -> Any:
        """Child window read for strip ``k`` of chunk ``j``."""
        from rasterio.windows import Window

        f = self.factor
        a, b = self.strip_rows(k)
        c0, c1 = self.clipped_cols(j)
        return Window(c0 * f, a * f, (c1 - c0) * f, (b - a) * f)

    def parts(self, i: int) -> list[tuple[int, slice]]:
        """``(strip k, child-row slice of that strip)`` making up tile row ``i``'s clipped rows, top to bottom."""
        f = self.factor
        er0, er1 = self.row_extent(i)
        rr0, rr1 = max(er0, 0), min(er1, self.layout.parent_height)
        out = []
        for k in self.strips_of_row(i):
            a, b = self.strip_rows(k)
            out.append((k, slice((max(a, rr0) - a) * f, (min(b, rr1) - a) * f)))
        return out

    def pad_maps(self, i: int, j: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Row and column index maps from the clipped rows/cols to the padded extent (None: no padding).

        Mirrors at the edges of the clipped extent, repeating the mirror where a pad is longer
        than the clipped extent (tiny rasters), exactly as ``pad_reflect`` pads it.
        """
        f, lay = self.factor, self.layout
        er0, er1 = self.row_extent(i)
        ec0, ec1 = self.col_extent(j)
        rows = cols = None
        # As np.pad(mode="symmetric") of the clipped extent (what pad_reflect does).
        if er0 < 0 or er1 > lay.parent_height:
            rr0, rr1 = max(er0, 0), min(er1, lay.parent_height)
            rows = symmetric_index((er0 - rr0) * f, (er1 - rr0) * f, (rr1 - rr0) * f)
        if ec0 < 0 or ec1 > lay.parent_width:
            cc0, cc1 = max(ec0, 0), min(ec1, lay.parent_width)
            cols = symmetric_index((ec0 - cc0) * f, (ec1 - cc0) * f, (cc1 - cc0) * f)
        return rows, cols

    def release_before(self, i: int) -> int:
        """Strips below this index are not needed by tile rows ``>= i``."""
        if i >= self.layout.n_rows:
            return self.n_strips
        ks = self.strips_of_row(i)
        return ks[0] if ks else self.n_strips


def assemble(geom: StripGeometry, i: int, j: int, strips: dict[int, Any], order: Sequence[int] | None) -> Any:
    """Aux input ``[C, T, eh, ew]`` of chunk ``j`` of tile row ``i`` from its strips.

    Args:
        geom: Strip geometry.
        i: Tile row.
        j: Column chunk.
        strips: ``k -> [C_stack, T, h_k, w]`` float32 raw aux values of this chunk: numpy arrays,
            or torch tensors (already on the device; joined there).
        order: Stack channel of every model channel (None: same order).

    Returns:
        A new numpy array (never sharing memory with the strips, whose shared-memory slots
        are reused after release), or a tensor on the strips' device.
    """
    parts = [strips[k][:, :, sl] for k, sl in geom.parts(i)]
    rows, cols = geom.pad_maps(i, j)
    if not isinstance(parts[0], np.ndarray):
        import torch

        dev = parts[0].device
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        # index uploads through page-locked memory: no wait for the GPU work queued meanwhile
        if order is not None:
            x = x.index_select(0, to_device(np.asarray(order, dtype=np.int64), dev))
        if rows is not None:
            x = x.index_select(2, to_device(np.asarray(rows, dtype=np.int64), dev))
        if cols is not None:
            x = x.index_select(3, to_device(np.asarray(cols, dtype=np.int64), dev))
        return x  # a view of a device strip keeps its memory alive after the strip is released
    x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)
    if order is not None:
        x = x[list(order)]
    if rows is not None:
        x = np.take(x, rows, axis=2)
    if cols is not None:
        x = np.take(x, cols, axis=3)
    return np.array(x, dtype=np.float32, order="C", copy=True) if x is parts[0] else np.ascontiguousarray(x)


# --------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------


