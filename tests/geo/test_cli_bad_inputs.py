"""End to end through the CLI: each bad input gives one ``error: <path>: ...`` line, a non-zero
exit code and no output file (``carbonsr downscale --method uniform``, no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine
from typer.testing import CliRunner

from carbonsr_cli.cli import app


def _run(args):
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stderr


def _bad_inputs(tmp_path, make_raster):
    good = make_raster("good.tif", np.ones((4, 4), "float32"), nodata=-1.0)
    text = tmp_path / "text.tif"
    text.write_text("not a GeoTIFF\n")
    full = make_raster("full.tif", np.random.default_rng(0).random((64, 64)).astype("float32"), nodata=-1.0)
    trunc = tmp_path / "truncated.tif"
    trunc.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    nocrs = make_raster("nocrs.tif", np.ones((4, 4), "float32"), crs=None, nodata=-1.0)
    rot = make_raster("rotated.tif", np.ones((4, 4), "float32"), nodata=-1.0,
                      transform=Affine(1000.0, 100.0, 500000.0, 100.0, -1000.0, 4000000.0))
    return {
        "missing": (tmp_path / "missing.tif", 1),
        "text": (text, 1),
        "truncated": (trunc, 1),
        "nocrs": (nocrs, 1),
        "rotated": (rot, 1),
    }, good


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "nocrs", "rotated"])
def test_bad_main_raster(tmp_path, make_raster, case) -> None:
    cases, _ = _bad_inputs(tmp_path, make_raster)
    path, code = cases[case]
    out = tmp_path / "out" / "result.tif"
    out.parent.mkdir()
    rc, err = _run(["downscale", str(path), "--method", "uniform", "-o", str(out)])
    assert rc == code, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and path.name in lines[0], err
    assert list(out.parent.iterdir()) == []


def test_output_exists_and_unwritable(tmp_path, make_raster) -> None:
    good = make_raster("good.tif", np.ones((4, 4), "float32"), nodata=-1.0)
    exists = tmp_path / "exists.tif"
    exists.write_bytes(b"keep me")
    rc, err = _run(["downscale", str(good), "--method", "uniform", "-o", str(exists)])
    assert rc == 1 and "exists.tif" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert exists.read_bytes() == b"keep me"
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    rc, err = _run(["downscale", str(good), "--method", "uniform", "-o", str(blocker / "out.tif")])
    assert rc == 1 and "blocker" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "exists.tif", "good.tif"]
    # and the good case really writes a file (so the failures above are meaningful)
    ok = tmp_path / "ok.tif"
    rc, err = _run(["downscale", str(good), "--method", "uniform", "-o", str(ok), "--quiet"])
    assert rc == 0, err
    assert ok.exists()
