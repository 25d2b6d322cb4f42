"""Tiles aligned to parent cells, edge padding, smooth blending, bounded iteration."""

from __future__ import annotations

import itertools
import types

import numpy as np
import pytest

from carbonsr_cli.errors import UsageError
from carbonsr_cli.tiling import (
    Blender,
    BlendStream,
    TileLayout,
    blend_weights_1d,
    iter_tile_rows,
    pad_reflect,
)

SHAPES = [(37, 23, 10), (12, 12, 10), (1, 1, 10), (5, 40, 4), (50, 3, 2)]


@pytest.mark.parametrize("ph,pw,f", SHAPES)
def test_cores_partition_raster_and_windows_are_aligned(ph, pw, f) -> None:
    tile = 12 * f
    layout = TileLayout(ph, pw, f, tile, 2)
    cover = np.zeros((ph * f, pw * f), dtype=np.int32)
    seen = np.zeros_like(cover)
    n_rows = 0
    for row in iter_tile_rows(ph, pw, f, tile, 2):
        n_rows += 1
        assert len(row) == layout.n_cols
        for t in row:
            cw, rw, core = t.child_window, t.read_window, t.core
            for w in (cw, rw, core):
                assert all(int(v) % f == 0 for v in (w.col_off, w.row_off, w.width, w.height))
            assert (cw.width, cw.height) == (tile, tile)
            assert all(p % f == 0 for pair in t.pad for p in pair)
            # read window + pad == full tile; valid slice == read window inside the tile
            (pt, pb), (pl, pr) = t.pad
            assert rw.height + pt + pb == tile and rw.width + pl + pr == tile
            assert t.valid[0] == slice(pt, tile - pb) and t.valid[1] == slice(pl, tile - pr)
            assert rw.row_off == cw.row_off + pt and rw.col_off == cw.col_off + pl
            assert t.mask().sum() == rw.height * rw.width
            r0, c0 = int(core.row_off), int(core.col_off)
            cover[r0 : r0 + int(core.height), c0 : c0 + int(core.width)] += 1
            r0, c0 = int(rw.row_off), int(rw.col_off)
            seen[r0 : r0 + int(rw.height), c0 : c0 + int(rw.width)] += 1
            # core inside the read window, with the full margin where the raster allows
            assert rw.row_off <= core.row_off and core.row_off + core.height <= rw.row_off + rw.height
    assert n_rows == layout.n_rows
    assert cover.min() == 1 and cover.max() == 1  # cores partition every child cell exactly once
    assert seen.min() >= 1


def test_stride_and_counts() -> None:
    layout = TileLayout(100, 100, 10, 120, 2)
    assert (layout.tile_parent, layout.stride_parent) == (12, 8)
    assert layout.n_rows == 13 and layout.n_cols == 13
    assert TileLayout(100, 100, 10, 120, 0).stride_parent == 12


@pytest.mark.parametrize(
    "kwargs", [dict(tile_child=125), dict(overlap_parent=6), dict(overlap_parent=-1), dict(factor=1)]
)
def test_bad_layouts(kwargs) -> None:
    args = dict(parent_height=10, parent_width=10, factor=10, tile_child=120, overlap_parent=2)
    args.update(kwargs)
    with pytest.raises(UsageError):
        TileLayout(**args)


def test_iteration_is_lazy() -> None:
    # A 10^7-row raster: creating the iterator and taking two rows must not build all tiles.
    it = iter_tile_rows(10_000_000, 30, 10, 120, 2)
    assert isinstance(it, types.GeneratorType)
    first, second = list(itertools.islice(it, 2))
    assert len(first) == len(second) == 4
    assert second[0].child_window.row_off - first[0].child_window.row_off == 80


def test_weights_partition_of_unity() -> None:
    w = blend_weights_1d(120, 40)
    assert w.min() > 0 and w.max() == 1.0
    # falling end of one tile + rising start of the next (offset by the stride) == 1
    assert np.allclose(w[80:] + w[:40], 1.0, atol=1e-3)  # exact up to the 1e-3 floor
    assert np.allclose((w[80:] + w[:40])[2:-2], 1.0, atol=1e-6)
    assert np.all(np.diff(w[:40]) > 0)


def test_pad_reflect_keeps_parent_blocks_whole() -> None:
    f = 4
    parent = np.arange(6, dtype=np.float32).reshape(2, 3)
    child = np.kron(parent, np.ones((f, f), np.float32))[None]  # [1, 8, 12]
    padded, mask = pad_reflect(child, ((2 * f, f), (f, 3 * f)))
    assert padded.shape == (1, 8 + 3 * f, 12 + 4 * f) and mask.shape == padded.shape[1:]
    assert mask.sum() == 8 * 12 and np.array_equal(padded[0][mask].reshape(8, 12), child[0])
    blocks = padded[0].reshape(padded.shape[1] // f, f, padded.shape[2] // f, f)
    assert np.all(blocks == blocks[:, :1, :, :1])  # every f x f block is constant
    # mirrored: the block just above the data equals the first data row of blocks
    assert np.array_equal(blocks[1, 0, 1:-3, 0], parent[0])


def test_pad_reflect_larger_than_array() -> None:
    a = np.array([[1.0, 2.0]])
    padded, mask = pad_reflect(a, ((3, 3), (5, 5)))
    assert padded.shape == (7, 12) and mask.sum() == 2
    assert set(np.unique(padded)) == {1.0, 2.0}


def _run_stream(ph: int, pw: int, f: int, field: np.ndarray, channels: int = 2) -> np.ndarray:
    """Blend tiles whose predictions are crops of ``field`` (garbage in the padding)."""
    layout = TileLayout(ph, pw, f, 12 * f, 2)
    stream = BlendStream(layout, channels)
    out = np.full((channels, ph * f, pw * f), np.nan, np.float32)
    windows = []
    for i, row in enumerate(layout.rows()):
        preds = []
        for t in row:
            p = np.full((channels, *t.shape), -1e6, np.float32)
            rw = t.read_window
            r0, c0 = int(rw.row_off), int(rw.col_off)
            p[(slice(None), *t.valid)] = field[:, r0 : r0 + int(rw.height), c0 : c0 + int(rw.width)]
            preds.append(p)
        for window, band in stream.push(i, row, preds):
            windows.append(window)
            r0 = int(window.row_off)
            assert np.all(np.isnan(out[:, r0 : r0 + int(window.height)]))  # each row handed back once
            out[:, r0 : r0 + int(window.height)] = band
    # bands are contiguous, parent-aligned and cover the raster
    assert windows[0].row_off == 0
    assert sum(int(w.height) for w in windows) == ph * f
    assert all(int(w.row_off) % f == 0 and int(w.height) % f == 0 for w in windows)
    return out


@pytest.mark.parametrize("ph,pw,f", SHAPES)
def test_blend_constant_returns_constant(ph, pw, f) -> None:
    field = np.full((2, ph * f, pw * f), 3.25, np.float32)
    out = _run_stream(ph, pw, f, field)
    assert np.allclose(out, 3.25, atol=1e-5)


def test_blend_reconstructs_consistent_predictions() -> None:
    ph, pw, f = 29, 17, 10
    rr, cc = np.mgrid[0 : ph * f, 0 : pw * f].astype(np.float32)
    field = np.stack([np.sin(rr / 37.0) + cc / 100.0, rr / 50.0 - np.cos(cc / 23.0)])
    out = _run_stream(ph, pw, f, field)
    assert np.allclose(out, field, atol=1e-4)


def test_blender_weighted_average_in_overlap() -> None:
    from rasterio.windows import Window

    b = Blender(4, 6, channels=1)
    b.add(np.full((4, 4), 1.0), Window(0, 0, 4, 4), weights=np.full((4, 4), 1.0, np.float32))
    b.add(np.full((4, 4), 4.0), Window(2, 0, 4, 4), weights=np.full((4, 4), 2.0, np.float32))
    out = b.finalize()[0]
    assert np.allclose(out[:, :2], 1.0) and np.allclose(out[:, 2:4], 3.0) and np.allclose(out[:, 4:], 4.0)
    empty = Blender(2, 2).finalize()
    assert np.isnan(empty).all()
    import torch

    dev = Blender(3, 4, device=torch.device("cpu"))  # the torch path (CUDA in use)
    dev.add(torch.ones(2, 2), Window(0, 0, 2, 2))
    band = dev.finalize().numpy()
    assert np.isnan(band[0, 2:]).all() and np.isnan(band[0, :, 2:]).all() and (band[0, :2, :2] == 1).all()


@pytest.mark.parametrize("ph,pw,overlap", [(30, 41, 2), (13, 9, 1), (25, 25, 0), (8, 30, 5), (1, 1, 2)])
def test_device_blend_stream_matches_numpy(ph: int, pw: int, overlap: int) -> None:
    """The torch BlendStream (CUDA path; one ``fold`` per tile row) hands back the numpy bands."""
    import torch

    lay = TileLayout(ph, pw, 2, 24, overlap)
    rng = np.random.default_rng(0)
    host = BlendStream(lay, channels=2)
    dev = BlendStream(lay, channels=2, device=torch.device("cpu"))
    rows_out = 0
    for i, row in enumerate(lay.rows()):
        preds = [rng.standard_normal((2, *t.shape)).astype(np.float32) for t in row]
        got_h = host.push(i, row, preds)
        got_d = dev.push(i, row, [torch.from_numpy(p) for p in preds])
        assert len(got_h) == len(got_d)
        for (wh, bh), (wd, bd) in zip(got_h, got_d):
            assert wh == wd
            bd = bd.numpy()
            assert np.array_equal(np.isnan(bh), np.isnan(bd))
            assert np.allclose(bh, bd, rtol=1e-5, atol=1e-6, equal_nan=True)
            rows_out += int(wh.height)
    assert rows_out == lay.child_height


def test_device_blend_stream_uploads_tile_weights_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device stream keeps its tile weights for every band: an upload per tile row (a
    pageable copy) would wait for the GPU's queued work once per row."""
    import torch

    from carbonsr_cli import tiling

    calls = []
    weights = tiling.Tile.weights

    def counted(self: tiling.Tile) -> np.ndarray:
        calls.append(1)
        return weights(self)

    monkeypatch.setattr(tiling.Tile, "weights", counted)
    lay = TileLayout(40, 30, 2, 24, 2)
    stream = BlendStream(lay, channels=1, device=torch.device("cpu"))
    rows = 0
    for i, row in enumerate(lay.rows()):
        assert len(row) >= 2
        rows += 1
        stream.push(i, row, [torch.zeros((1, *t.shape)) for t in row])
    assert rows >= 3 and stream.done == lay.child_height
    assert len(calls) == 1
