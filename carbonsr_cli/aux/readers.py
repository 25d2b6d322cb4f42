"""Readers of aux sources: one class per source kind behind one interface (:class:`SourceReader`).

:class:`RasterReader` (continuous bands), :class:`CategoricalReader` (class fractions) and
:class:`VectorReader` (lines, polygons, points, point attributes) fill the layers of one
:class:`~carbonsr_cli.aux.sources._Slot` on a child window; :class:`~carbonsr_cli.aux.stack.AuxStack`
picks the reader of each slot with :func:`reader_for` and owns what they share (open datasets,
warped VRTs, vector indexes, alignments). Fill and resampling rules: ``carbonsr_cli.aux`` docs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from carbonsr_cli.aux.sources import _Align, _Slot
from carbonsr_cli.aux.vector import rasterize_window
from carbonsr_cli.aux.warp import _subgrid
from carbonsr_cli.errors import InputDataError

if TYPE_CHECKING:
    from carbonsr_cli.aux.stack import AuxStack

__all__ = ["CATEGORICAL", "RASTER", "READERS", "VECTOR", "CategoricalReader", "RasterReader", "SourceReader",
           "VectorReader", "reader_for"]


def src_block(stack: AuxStack, slot: _Slot, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
    """Source pixels ``[r0:r1, c0:c1]`` (may extend past the raster) and their validity.

    Returns:
        ``(raw values [r1 - r0, c1 - c0] in the source dtype (0 where invalid), valid bool mask)``;
        outside the raster, nodata and non-finite values are invalid.
    """
    from rasterio.windows import Window

    ds = stack._dataset(slot.source.path)
    h, w = r1 - r0, c1 - c0
    dtype = np.dtype(ds.dtypes[slot.entry.band - 1])
    raw = np.zeros((h, w), dtype=dtype)
    valid = np.zeros((h, w), dtype=bool)
    a0, a1 = max(r0, 0), min(r1, ds.height)
    b0, b1 = max(c0, 0), min(c1, ds.width)
    if a1 <= a0 or b1 <= b0:
        return raw, valid
    data = read_vrt(ds, slot.entry.band, Window(b0, a0, b1 - b0, a1 - a0), slot.source.path)
    ok = np.ones(data.shape, dtype=bool) if ds.nodata is None else data != ds.nodata
    if dtype.kind == "f":
        ok &= np.isfinite(data)
    raw[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = np.where(ok, data, 0)
    valid[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = ok
    return raw, valid


def read_vrt(vrt: Any, band: int, win: Any, path: Path) -> np.ndarray:
    try:
        return vrt.read(band, window=win)
    except Exception as exc:  # noqa: BLE001 - GDAL read error on a corrupt file
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputDataError(f"cannot read aux data (truncated or corrupt file?): {msg}", path) from None


class SourceReader(ABC):
    """How one kind of aux source fills its layers on a window of the child grid.

    ``ops`` are the :attr:`AuxEntry.op` values (as effective in the slot) this reader serves;
    :meth:`read` returns ``{layer name: float32 [h, w]}`` for the child window ``(c, r, w, h)``
    (it may extend past the grid: outside cells get the slot's fill value). The reader holds no
    state: the stack passed in owns the open datasets, warps and vector indexes.
    """

    ops: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def read(self, stack: AuxStack, slot: _Slot, c: int, r: int, w: int, h: int) -> dict[str, np.ndarray]:
        """The slot's layers on the child window, float32 ``[h, w]`` each."""


class RasterReader(SourceReader):
    """Continuous raster bands (and categorical ones read as class codes: ``nearest``/``mode``):
    warped onto the child grid, or read without a warp where that gives the warp's result."""

    ops = ("value",)

    def read(self, stack: AuxStack, slot: _Slot, c: int, r: int, w: int, h: int) -> dict[str, np.ndarray]:
        return {slot.entry.group: self.read_value(stack, slot, c, r, w, h)}

    def fast_value(self, stack: AuxStack, slot: _Slot, win: Any) -> np.ndarray | None:
        """Continuous layer on an inside-grid child window without a warp (NaN = fill), or None.

        Same results as the ``WarpedVRT`` path (up to float rounding) for: same-size pixels on
        the child grid lines (any of ``average``/``nearest``/``mode``: one pixel per cell);
        integer-finer pixels on the child grid lines with ``average`` (mean of the valid
        pixels of each cell; cells entirely outside the source are filled, where GDAL's
        average lets edge pixels leak into some of them); coarser pixels with ``bilinear``
        (GDAL's kernel: the 2 x 2 source pixels around each cell centre, weights of invalid
        or outside pixels dropped and the rest renormalised; a cell whose centre is outside
        the source or on an invalid pixel is filled).
        """
        al = stack._alignment(slot.source)
        if al is None:
            return None
        c, r, w, h = int(win.col_off), int(win.row_off), int(win.width), int(win.height)
        tol = 1e-6
        on_lines = abs(al.col0 - round(al.col0)) <= tol and abs(al.row0 - round(al.row0)) <= tol
        if abs(al.ratio - 1.0) <= tol and on_lines and slot.resampling in ("average", "nearest", "mode"):
            sc, sr = int(round(al.col0)) + c, int(round(al.row0)) + r
            raw, valid = src_block(stack, slot, sr, sr + h, sc, sc + w)
            out = raw.astype(np.float32)
            out[~valid] = np.nan
            return out
        inv = 1.0 / al.ratio
        f = int(round(inv))
        if al.ratio < 1.0 and f >= 2 and abs(inv - f) <= tol * f and slot.resampling == "average":
            # child grid lines must fall on source grid lines: col0 (in source pixels) integer
            if abs(al.col0 - round(al.col0)) > tol or abs(al.row0 - round(al.row0)) > tol:
                return None
            sc, sr = int(round(al.col0)) + c * f, int(round(al.row0)) + r * f
            raw, valid = src_block(stack, slot, sr, sr + h * f, sc, sc + w * f)
            total = raw.astype(np.float64).reshape(h, f, w, f).sum(axis=(1, 3))
            n = valid.reshape(h, f, w, f).sum(axis=(1, 3))
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(n > 0, total / n, np.nan).astype(np.float32)
        if al.ratio > 1.0 + tol and slot.resampling == "bilinear":
            return self.bilinear(stack, slot, al, c, r, w, h)
        return None


    def bilinear(self, stack: AuxStack, slot: _Slot, al: _Align, c: int, r: int, w: int, h: int) -> np.ndarray:
        """Bilinear upsampling of a coarser same-CRS source, as GDAL's warp kernel; NaN = fill."""
        ds = stack._dataset(slot.source.path)
        u = al.col0 + (np.arange(c, c + w) + 0.5) / al.ratio  # cell centres in source pixels
        v = al.row0 + (np.arange(r, r + h) + 0.5) / al.ratio
        ix = np.floor(u - 0.5).astype(np.int64)
        iy = np.floor(v - 0.5).astype(np.int64)
        wx1, wy1 = u - 0.5 - ix, v - 0.5 - iy
        wx0, wy0 = 1.0 - wx1, 1.0 - wy1
        cs, ce = int(ix.min()), int(ix.max()) + 2
        rs, re_ = int(iy.min()), int(iy.max()) + 2
        raw, valid = src_block(stack, slot, rs, re_, cs, ce)
        jx, jy = ix - cs, iy - rs
        all_valid = bool(valid.all())
        a = raw.astype(np.float64)
        if not all_valid:
            m = valid.astype(np.float64)
            a *= m
        num = a[:, jx] * wx0 + a[:, jx + 1] * wx1  # [source rows, w]
        num = num[jy] * wy0[:, None] + num[jy + 1] * wy1[:, None]
        if all_valid:  # every weight counts: the divisor is 1 (up to rounding)
            inside = ((v >= 0) & (v + 1e-10 <= ds.height))[:, None] & ((u >= 0) & (u + 1e-10 <= ds.width))[None, :]
            out = num.astype(np.float32)
            if not inside.all():
                out[~inside] = np.nan
            return out
        den = m[:, jx] * wx0 + m[:, jx + 1] * wx1
        den = den[jy] * wy0[:, None] + den[jy + 1] * wy1[:, None]
        # As GDAL's warp kernel: a cell is skipped (filled) when its centre is outside the
        # source or on an invalid source pixel (the pixel at floor(centre + 1e-10)).
        inside = ((v >= 0) & (v + 1e-10 <= ds.height))[:, None] & ((u >= 0) & (u + 1e-10 <= ds.width))[None, :]
        px = np.clip(np.floor(u + 1e-10).astype(np.int64) - cs, 0, ce - cs - 1)
        py = np.clip(np.floor(v + 1e-10).astype(np.int64) - rs, 0, re_ - rs - 1)
        ok = inside & valid[py][:, px] & (den >= 1e-5)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(ok, num / np.where(ok, den, 1.0), np.nan).astype(np.float32)


    def read_value(self, stack: AuxStack, slot: _Slot, c: int, r: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w), slot.fill, dtype=np.float32)
        inner = stack._inner(c, r, w, h)
        if inner is None:
            return out
        win, (rs, cs) = inner
        data = self.fast_value(stack, slot, win) if stack.fast else None
        if data is None:
            data = read_vrt(stack._vrt(slot.source, slot.resampling), slot.entry.band, win, slot.source.path)
        data = data.astype(np.float32, copy=False)
        np.copyto(data, np.float32(slot.fill), where=~np.isfinite(data))
        out[rs, cs] = data
        return out


class CategoricalReader(SourceReader):
    """Categorical raster bands: one cover-fraction layer per class, counted on a supersampled
    nearest-neighbour warp (or directly where the source is on the child grid lines)."""

    ops = ("classes",)

    def fast_counts(self, stack: AuxStack, slot: _Slot, win: Any) -> tuple[int, np.ndarray] | None:
        """``(f, per-class pixel counts [n_classes, h, w])`` for an inside-grid window without a warp, or None.

        Applies when the categorical source is on the child grid lines with pixels equal to the
        child cell or an integer ``f`` times finer (``f <= 10``, where the supersampled path is
        exact too): each cell counts its ``f * f`` pixels.
        """
        al = stack._alignment(slot.source)
        if al is None:
            return None
        tol = 1e-6
        inv = 1.0 / al.ratio
        f = int(round(inv))
        if f < 1 or f > 10 or abs(inv - f) > tol * f:
            return None
        if abs(al.col0 - round(al.col0)) > tol or abs(al.row0 - round(al.row0)) > tol:
            return None
        c, r, w, h = int(win.col_off), int(win.row_off), int(win.width), int(win.height)
        sc, sr = int(round(al.col0)) + c * f, int(round(al.row0)) + r * f
        raw, valid = src_block(stack, slot, sr, sr + h * f, sc, sc + w * f)
        classes = slot.entry.classes
        out = np.zeros((len(classes), h, w), dtype=np.float32)
        for i, code in enumerate(classes):
            hit = (raw == code) & valid
            if f == 1:
                out[i] = hit
            else:
                out[i] = hit.reshape(h, f, w, f).sum(axis=(1, 3), dtype=np.int32)
        return f, out


    def read(self, stack: AuxStack, slot: _Slot, c: int, r: int, w: int, h: int) -> dict[str, np.ndarray]:
        classes = slot.entry.classes
        names = slot.entry.layer_names
        n = len(classes)
        k = stack._supersample(slot.source)
        inner = stack._inner(c, r, w, h)
        fast = self.fast_counts(stack, slot, inner[0]) if (n and inner is not None and stack.fast) else None
        if fast is not None and fast[0] == 1 and fast[1].shape[1:] == (h, w):
            return dict(zip(names, fast[1]))  # one pixel per cell: the counts are the fractions (0 or 1)
        counts = np.zeros((n, h, w), dtype=np.float32)  # after the fast path: no second copy at its peak
        if fast is not None:
            f, cnt = fast
            counts[(slice(None), *inner[1])] = cnt
            if f == 1:
                return dict(zip(names, counts))
        elif n:
            # Column chunks keep the k-times finer code array at <= ~4 M samples.
            step = max(1, 4_000_000 // max(1, h * k * k))
            for cc in range(0, w, step):
                cw = min(step, w - cc)
                counts[:, :, cc : cc + cw] = self.count_classes(stack, slot, c + cc, r, cw, h, k)
        # Fractions in place (a cell without a valid sample has all counts 0: 0 / 1 = 0).
        np.divide(counts, np.maximum(counts.sum(axis=0), 1), out=counts)
        return dict(zip(names, counts))


    def count_classes(self, stack: AuxStack, slot: _Slot, c: int, r: int, w: int, h: int, k: int) -> np.ndarray:
        """Samples of each class per child cell, float32 ``[n_classes, h, w]`` (k*k samples per cell)."""
        classes = slot.entry.classes
        n = len(classes)
        inner = stack._inner(c, r, w, h, k)
        if inner is None:
            return np.zeros((n, h, w), dtype=np.float32)
        win, (rs, cs) = inner
        raw = read_vrt(stack._vrt(slot.source, "nearest", k), slot.entry.band, win, slot.source.path)
        codes = np.full((h * k, w * k), np.nan, dtype=raw.dtype)
        codes[rs, cs] = raw
        out = np.zeros((n, h, w), dtype=np.float32)
        for i, code in enumerate(classes):
            hit = (codes == code).view(np.uint8)
            acc = np.zeros((h, w), dtype=np.uint8 if k * k < 256 else np.uint16)
            for dy in range(k):
                for dx in range(k):
                    acc += hit[dy::k, dx::k]
            out[i] = acc
        return out


class VectorReader(SourceReader):
    """Vector sources: line lengths (per class), polygon cover, point counts and point
    attribute sums per child cell, rasterised from the stack's spatial index of the file."""

    ops = ("line_length", "polygon_cover", "point_count", "point_sum")

    def read(self, stack: AuxStack, slot: _Slot, c: int, r: int, w: int, h: int) -> dict[str, np.ndarray]:
        data = stack._vector(slot.source)
        arr = rasterize_window(data, slot.op, _subgrid(stack.grid.transform, c, r), h, w)
        inner = stack._inner(c, r, w, h)
        if inner is None:
            arr[:] = 0.0
        elif arr.shape[1:] != (inner[0].height, inner[0].width):
            keep = np.zeros(arr.shape[1:], dtype=bool)
            keep[inner[1]] = True
            arr[:, ~keep] = 0.0  # outside the child grid: fill rule (0), as for rasters
        return dict(zip(slot.entry.layer_names, arr))


RASTER = RasterReader()
CATEGORICAL = CategoricalReader()
VECTOR = VectorReader()
#: The reader of every slot op; a new source kind is one more :class:`SourceReader` here.
READERS: dict[str, SourceReader] = {op: reader for reader in (RASTER, CATEGORICAL, VECTOR) for op in reader.ops}


def reader_for(op: str) -> SourceReader:
    """The reader of a slot's effective op."""
    try:
        return READERS[op]
    except KeyError:
        raise ValueError(f"no aux reader for op {op!r}") from None
