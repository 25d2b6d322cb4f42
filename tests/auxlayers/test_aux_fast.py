"""The warp-free fast paths of AuxStack (same-CRS sources) give the WarpedVRT path's results."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import raster_files
from rasterio.transform import from_origin
from rasterio.windows import Window

from carbonsr_cli.aux import AuxStack, discover_aux
from carbonsr_cli.aux.readers import CATEGORICAL, RASTER
from carbonsr_cli.grids import ChildGrid

# Child grid of utm_parent: 60 x 80 cells of 100 m from (500000, 5600000).
X0, Y0, CELL = 500_000.0, 5_600_000.0, 100.0

WINDOWS = [
    Window(0, 0, 80, 60),  # whole grid
    Window(-7, -5, 40, 30),  # boundless at the top-left
    Window(61, 47, 40, 30),  # boundless at the bottom-right
    Window(13, 7, 31, 21),  # inside, odd offsets
    Window(0, 20, 80, 12),  # full-width band
    Window(200, 200, 10, 10),  # all outside
]


def write_raster(path: Path, data: np.ndarray, *, transform: object, crs: str, nodata: float | None) -> Path:
    """Write a one-band GeoTIFF of ``data`` ``[rows, cols]`` (its own dtype)."""
    return raster_files.write_raster(path, data, crs, transform, nodata)


def _both(paths: list[Path], cg: ChildGrid, **kw: object) -> tuple[AuxStack, AuxStack]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sources = discover_aux(paths)
        fast = AuxStack(sources, cg, ["2020"], fill_missing=True, **kw)
        slow = AuxStack(sources, cg, ["2020"], fill_missing=True, **kw)
    slow.fast = False
    return fast, slow


def _continuous(tmp_path: Path, name: str, res: float, origin: tuple[float, float], shape: tuple[int, int]) -> Path:
    """Random positive values with a block of nodata; covers only part of the grid."""
    rng = np.random.default_rng(len(name))
    data = rng.gamma(2.0, 3.0, shape).astype(np.float32)
    if "full" not in name:
        data[2:5, 3:9] = -9999.0
        data[rng.random(shape) < 0.03] = -9999.0
    return write_raster(tmp_path / name, data, transform=from_origin(*origin, res, res), crs="EPSG:32632", nodata=-9999.0)


@pytest.mark.parametrize(
    ("name", "res", "origin", "shape", "resampling"),
    [
        # same size, on the child grid lines, 5 cells short of the grid on the left/top
        ("same.tif", CELL, (X0 + 5 * CELL, Y0 - 3 * CELL), (70, 90), "average"),
        ("same_nearest.tif", CELL, (X0 - 4 * CELL, Y0 + 2 * CELL), (50, 70), "nearest"),
        # 2x finer (50 m), on the child grid lines, partial coverage
        ("fine.tif", CELL / 2, (X0 + 2 * CELL, Y0 - 1 * CELL), (110, 150), "average"),
        # 5x coarser (500 m), half a child cell off the grid lines (as the sample lights), partial
        ("coarse.tif", 5 * CELL, (X0 - 2.5 * CELL, Y0 + 2.5 * CELL), (11, 15), "bilinear"),
        # 3x coarser, on the grid lines, starting inside the grid (cells left of it are filled)
        ("coarse3.tif", 3 * CELL, (X0 + 6 * CELL, Y0 - 3 * CELL), (25, 30), "bilinear"),
        # 4x coarser without nodata (the all-valid shortcut), 1.5 cells off the grid lines, partial
        ("coarse_full.tif", 4 * CELL, (X0 + 1.5 * CELL, Y0 - 2.5 * CELL), (12, 16), "bilinear"),
    ],
)
def test_fast_continuous_matches_warp(
    tmp_path: Path, utm_parent: object, name: str, res: float, origin: tuple[float, float], shape: tuple[int, int],
    resampling: str,
) -> None:
    cg = ChildGrid(utm_parent, 10)
    path = _continuous(tmp_path, name, res, origin, shape)
    fast, slow = _both([path], cg, resampling={path.stem: resampling})
    with fast, slow:
        slot = fast._groups[0].per_t[0]
        assert slot.resampling == resampling
        assert RASTER.fast_value(fast, slot, Window(0, 0, 80, 60)) is not None  # the fast path is taken
        # Child cells (whole-grid coordinates) lying entirely inside the source extent.
        c_lo, r_lo = (origin[0] - X0) / CELL, (Y0 - origin[1]) / CELL
        c_hi, r_hi = c_lo + shape[1] * res / CELL, r_lo + shape[0] * res / CELL
        for win in WINDOWS:
            a, b = fast.read(win)[0, 0], slow.read(win)[0, 0]
            assert np.isfinite(a).all()
            cols = np.arange(win.col_off, win.col_off + win.width)
            rows = np.arange(win.row_off, win.row_off + win.height)
            inside = ((rows >= r_lo) & (rows + 1 <= r_hi))[:, None] & ((cols >= c_lo) & (cols + 1 <= c_hi))[None, :]
            if res < CELL:
                # GDAL's average lets edge pixels leak into cells just outside the source; the
                # fast path applies the fill rule there (as the module docstring says).
                np.testing.assert_allclose(a[inside], b[inside], rtol=2e-6, atol=1e-6, err_msg=str(win))
                assert np.all(a[~inside] == np.float32(slot.fill))
            else:
                np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6, err_msg=str(win))
        # fill cells exist (partial coverage / nodata), so the fill rule is exercised
        assert slot.coverage is not None and slot.coverage.nodata > 0


def test_unaligned_or_other_crs_uses_the_warp(tmp_path: Path, utm_parent: object) -> None:
    cg = ChildGrid(utm_parent, 10)
    off = _continuous(tmp_path, "off.tif", CELL, (X0 - 4 * CELL + 30.0, Y0 + 2 * CELL), (70, 90))
    fine3 = _continuous(tmp_path, "fine3.tif", CELL / 3 * 2, (X0 - 400.0, Y0 + 200.0), (110, 150))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stack = AuxStack(discover_aux([off, fine3]), cg, ["2020"], fill_missing=True)
    with stack:
        for g in stack._groups:
            assert RASTER.fast_value(stack, g.per_t[0], Window(0, 0, 80, 60)) is None, g.key


@pytest.mark.parametrize(
    ("res", "origin", "shape"),
    [
        (CELL, (X0 - 3 * CELL, Y0 + 4 * CELL), (50, 75)),  # same size, partial coverage
        (CELL / 2, (X0 + 4 * CELL, Y0 - 2 * CELL), (130, 170)),  # 2x finer
        (CELL / 5, (X0 - 1 * CELL, Y0 + 1 * CELL), (320, 420)),  # 5x finer
    ],
)
def test_fast_categorical_matches_warp_exactly(
    tmp_path: Path, utm_parent: object, res: float, origin: tuple[float, float], shape: tuple[int, int]
) -> None:
    cg = ChildGrid(utm_parent, 10)
    rng = np.random.default_rng(7)
    codes = rng.choice(np.array([10, 20, 30, 50, 255], dtype=np.uint8), size=shape, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    path = write_raster(
        tmp_path / "landcover_x.tif", codes, transform=from_origin(*origin, res, res), crs="EPSG:32632", nodata=255
    )
    fast, slow = _both([path], cg)
    with fast, slow:
        slot = fast._groups[0].per_t[0]
        assert CATEGORICAL.fast_counts(fast, slot, Window(0, 0, 80, 60)) is not None
        for win in WINDOWS:
            a, b = fast.read(win), slow.read(win)
            np.testing.assert_array_equal(a, b, err_msg=str(win))
        full = fast.read(Window(0, 0, 80, 60))[:, 0]
        sums = full.sum(axis=0)
        assert np.all((np.abs(sums - 1) < 1e-6) | (sums == 0))
        if res == CELL:
            assert set(np.unique(full)) <= {0.0, 1.0}


def test_sample_data_fast_equals_warp(sample_dir: Path) -> None:
    """On the sample region the aligned layers (lights, population, land cover, built-up) agree."""
    from carbonsr_cli.grids import ParentGrid

    grid = ParentGrid.from_raster(sample_dir / "emissions_1km.tif", warn=False)
    cg = grid.child(10)
    fast, slow = _both([sample_dir / "aux"], cg)
    fast_slots = 0
    with fast, slow:
        for g in fast._groups:
            s = g.per_t[0]
            if s.op == "value" and RASTER.fast_value(fast, s, Window(0, 0, 8, 8)) is not None:
                fast_slots += 1
            elif s.op == "classes" and CATEGORICAL.fast_counts(fast, s, Window(0, 0, 8, 8)) is not None:
                fast_slots += 1
        assert fast_slots == 4
        for win in (Window(-20, -20, 120, 120), Window(0, 37, cg.width, 50)):
            a, b = fast.read(win), slow.read(win)
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6)
