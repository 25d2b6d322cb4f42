"""The baselines' row loop (``carbonsr_cli.downscale.bands``): bands of whole parent rows,
prepared in several threads; neither the bands nor the threads change a value, and a
dasymetric run never imports torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from carbonsr_cli.tiling import TileLayout, align_rows
import rasterio

from carbonsr_cli.downscale import bands, downscale

ROOT = Path(__file__).resolve().parents[2]


class _Plan:
    """What :func:`bands.baseline_bands` reads of a plan."""

    def __init__(self, height: int, width: int, years: int, factor: int = 10) -> None:
        self.factor = factor
        self.out_bands = list(range(1, years + 1))
        self.child = type("Child", (), {"height": height, "width": width})()
        self.grid = type("Grid", (), {"height": max(1, height // factor), "width": max(1, width // factor)})()
        self.tile_child, self.overlap_parent = 120, 2


@pytest.mark.parametrize(("height", "width", "years"), [(200, 220, 2), (10_000, 10_000, 1), (4_000, 60_000, 20), (10, 10, 1)])
def test_bands_cover_the_rows_in_whole_parent_rows(height: int, width: int, years: int) -> None:
    plan = _Plan(height, width, years)
    got = bands.baseline_bands(plan)  # type: ignore[arg-type]
    assert got[0][0] == 0 and got[-1][1] == height
    assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
    assert all(r0 % 10 == 0 and r1 > r0 and r1 - r0 <= bands.BASELINE_BAND_ROWS for r0, r1 in got)
    tall = max(r1 - r0 for r0, r1 in got)
    assert tall == 10 or tall * width * years * 24 <= bands.BAND_BYTES  # one parent row at least
    unit = align_rows(TileLayout(plan.grid.height, plan.grid.width, 10, 120, 2))  # torchrun parts start on multiples of it
    assert unit % (got[0][1] // 10) == 0 or len(got) == 1


def _run(main: Path, aux: list[str], out: Path, method: str) -> np.ndarray:
    downscale(main, aux, out, method=method, progress=False)
    with rasterio.open(out) as ds:
        return ds.read()


@pytest.mark.parametrize("method", ["uniform", "dasymetric", "dasymetric:population_100m", "points"])
def test_bands_and_threads_change_no_value(sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           method: str) -> None:
    main = sample_dir / "emissions_1km.tif"
    aux = [] if method == "uniform" else [str(sample_dir / "aux")]
    if method == "points":  # the torch fill, with weights cleaned by the reader
        aux.append(f"{sample_dir / 'plants.gpkg'}:co2_t_yr")
    ref = _run(main, aux, tmp_path / "ref.tif", method)
    monkeypatch.setattr(bands, "BASELINE_BAND_ROWS", 20)  # bands of 2 parent rows
    monkeypatch.setattr(bands, "baseline_workers", lambda: 3)
    got = _run(main, aux, tmp_path / "bands.tif", method)
    assert np.array_equal(ref.view(np.uint32), got.view(np.uint32))


def test_dasymetric_command_never_imports_torch(sample_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.tif"
    code = ("import runpy, sys; sys.argv = ['carbonsr', *sys.argv[1:]]; "
            "import atexit; atexit.register(lambda: print('torch' in sys.modules, file=sys.stderr)); "
            "runpy.run_module('carbonsr_cli.cli', run_name='__main__')")
    e = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", code, "downscale", str(sample_dir / "emissions_1km.tif"),
                           "--aux", str(sample_dir / "aux"), "--method", "dasymetric", "-o", str(out), "--quiet"],
                          capture_output=True, text=True, env=e, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "False"  # torch never imported
    with rasterio.open(out) as ds:
        assert ds.tags()["CARBONSR_METHOD"].startswith("dasymetric:")
