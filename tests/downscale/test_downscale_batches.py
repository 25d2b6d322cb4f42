"""Tests for the batching of tiles in carbonsr_cli.downscale.predict (strided views vs slices)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carbonsr_cli.downscale.predict import BandData, _iter_batches, _tile_views
from carbonsr_cli.tiling import TileLayout


def _chunk(layout: TileLayout, i: int, j0: int, j1: int, channels: int, years: int) -> tuple[BandData, list]:
    """Random inputs covering tiles ``j0:j1`` of tile-row ``i`` (origin = the first tile's corner)."""
    row = layout.row(i)[j0:j1]
    first, last = row[0].child_window, row[-1].child_window
    oy, ox = int(first.row_off), int(first.col_off)
    h = int(first.height)
    w = int(last.col_off + last.width) - ox + 7  # extra columns right of the last tile
    rng = np.random.default_rng(i * 100 + j0)
    data = BandData(i=i, out_rows=(0, 0), totals=None, origin=(oy, ox),
                    aux=rng.random((channels, years, h, w), dtype=np.float32),
                    main=rng.random((years, h, w), dtype=np.float32))
    return data, row


def _sliced(data: BandData, row: list, uniq: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """The reference: every (tile, window) sample cut out one by one, tile-major."""
    oy, ox = data.origin
    auxs, mains = [], []
    for tile in row:
        cw = tile.child_window
        rs = slice(int(cw.row_off) - oy, int(cw.row_off + cw.height) - oy)
        cs = slice(int(cw.col_off) - ox, int(cw.col_off + cw.width) - ox)
        for idx in uniq:
            auxs.append(data.aux[:, idx][:, :, rs, cs])
            mains.append(data.main[idx][None][:, :, rs, cs])
    return np.stack(auxs), np.stack(mains)


@pytest.mark.parametrize(("uniq", "batch"), [([[0]], 4), ([[0, 1, 2]], 3), ([[0, 1], [1, 2]], 5), ([[0, 2]], 4)])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_batches_equal_tile_by_tile_slices(uniq: list[list[int]], batch: int, as_tensor: bool) -> None:
    layout = TileLayout(40, 50, factor=10, tile_child=120, overlap_parent=2)
    data, row = _chunk(layout, i=2, j0=1, j1=7, channels=3, years=3)
    ref_a, ref_m = _sliced(data, row, uniq)
    if as_tensor:  # as the strip feed hands them over on CUDA (here on the CPU)
        data.aux, data.main = torch.from_numpy(data.aux), torch.from_numpy(data.main)
    got = list(_iter_batches(data, row, uniq, batch))
    assert [g[0].shape[0] for g in got][:-1] == [batch] * (len(got) - 1)
    a = np.concatenate([np.asarray(g[0]) for g in got])
    m = np.concatenate([np.asarray(g[1]) for g in got])
    np.testing.assert_array_equal(a, ref_a)
    np.testing.assert_array_equal(m, ref_m)
    fast = len(uniq) == 1 and uniq[0] == list(range(uniq[0][0], uniq[0][-1] + 1))
    if fast:  # the strided-view path was taken, and it hands out contiguous batches
        assert _tile_views(data.aux, data.main, row, [slice(uniq[0][0], uniq[0][-1] + 1)], data.origin) is not None
        assert all(np.asarray(g[0]).flags.c_contiguous and np.asarray(g[1]).flags.c_contiguous for g in got)


def test_single_tile_row_is_batched() -> None:
    layout = TileLayout(12, 12, factor=10, tile_child=120, overlap_parent=2)
    data, row = _chunk(layout, i=0, j0=0, j1=1, channels=2, years=1)
    (a, m), = list(_iter_batches(data, row, [[0]], 8))
    ref_a, ref_m = _sliced(data, row, [[0]])
    np.testing.assert_array_equal(a, ref_a)
    np.testing.assert_array_equal(m, ref_m)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_water_fill_equals_eager_on_cuda() -> None:
    """Bands of a repeated shape replay a CUDA graph of the water-fill: same children."""
    from carbonsr_cli.downscale.predict import _water_fill

    dev = torch.device("cuda")
    rng = np.random.default_rng(5)
    vals = rng.normal(size=(1, 20, 30)).astype(np.float32)
    totals = rng.random((1, 2, 3)) * 100
    totals[0, 0, 0] = np.nan
    graphs: dict = {}
    outs = [_water_fill(vals, totals, 10, dev, torch.float32, graphs).numpy() for _ in range(3)]
    ref = _water_fill(vals, totals, 10, dev, torch.float32, None).numpy()
    assert graphs and all(g.error is None for g in graphs.values())
    assert sum(g.replays for g in graphs.values()) == 2  # eager, capture + replay, replay
    for out in outs:
        np.testing.assert_array_equal(out, ref)
    sums = np.nansum(ref.reshape(1, 2, 10, 3, 10), axis=(2, 4))
    np.testing.assert_allclose(sums[0].ravel()[1:], totals[0].ravel()[1:], rtol=1e-6)
