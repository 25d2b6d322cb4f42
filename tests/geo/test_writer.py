"""RasterWriter: round trip, COG, atomicity (errors, Ctrl-C, existing/unwritable outputs)."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.windows import Window

from carbonsr_cli import __version__
from carbonsr_cli.errors import OutputError, UsageError
from carbonsr_cli.grids import ParentGrid
from carbonsr_cli.writer import RasterWriter


@pytest.fixture
def child():
    g = ParentGrid(CRS.from_epsg(32633), from_origin(500000.0, 4000000.0, 1000.0, 1000.0), 70, 60,
                   -1.0, ("2019", "2020"), "main.tif")
    return g.child(10)  # 600 x 700 child cells: several 512 blocks, partial at the edges


def _write_all(w: RasterWriter, data: np.ndarray, step: int = 120) -> None:
    h = data.shape[1]
    for r in range(0, h, step):
        hh = min(step, h - r)
        w.write(data[:, r : r + hh], Window(0, r, data.shape[2], hh))


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_round_trip(tmp_path, child) -> None:
    rng = np.random.default_rng(1)
    data = rng.random((2, child.height, child.width)).astype(np.float32)
    data[:, :5, :5] = -1.0
    dest = tmp_path / "out.tif"
    with RasterWriter(dest, child, count=2, nodata=-1.0, band_descriptions=["2019", "2020"],
                      tags={"model_sha256": "abc"}, units="t CO2 / cell / yr", source="main.tif") as w:
        _write_all(w, data)
        assert not dest.exists()  # nothing under the final name while writing
    assert _listing(tmp_path) == ["out.tif"]
    with rasterio.open(dest) as ds:
        assert ds.driver == "GTiff"
        assert (ds.count, ds.height, ds.width) == (2, 600, 700)
        assert ds.dtypes == ("float32", "float32")
        assert ds.block_shapes[0] == (512, 512)
        assert ds.profile["tiled"] is True
        assert ds.compression.name.lower() == "deflate"
        assert ds.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "3"
        assert ds.nodata == -1.0
        assert ds.descriptions == ("2019", "2020")
        assert ds.crs == child.crs and ds.transform.almost_equals(child.transform)
        tags = ds.tags()
        assert tags["CARBONSR_UNITS"] == "t CO2 / cell / yr" and tags["CARBONSR_FACTOR"] == "10"
        assert tags["CARBONSR_SOURCE"] == "main.tif" and tags["CARBONSR_VERSION"] == __version__
        assert tags["TIFFTAG_SOFTWARE"] == f"carbonsr {__version__}" and tags["TIFFTAG_DATETIME"]
        assert ds.units == ("t CO2 / cell / yr",) * 2
        assert ds.tags(1)["YEAR"] == "2019" and ds.tags(2)["YEAR"] == "2020"
        assert tags["model_sha256"] == "abc"
        assert np.array_equal(ds.read(), data)


def test_integer_output_uses_predictor_2(tmp_path, child) -> None:
    dest = tmp_path / "int.tif"
    with RasterWriter(dest, child, count=1, dtype="uint16", nodata=0) as w:
        w.write(np.ones((child.height, child.width), np.uint16), Window(0, 0, child.width, child.height))
    with rasterio.open(dest) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "2" and ds.dtypes[0] == "uint16"


@pytest.mark.parametrize("compress", ["zstd", "none"])
def test_other_compressions(tmp_path, child, compress) -> None:
    dest = tmp_path / f"{compress}.tif"
    with RasterWriter(dest, child, count=1, compress=compress) as w:
        w.write(np.zeros((10, 10), np.float32), Window(0, 0, 10, 10))
    with rasterio.open(dest) as ds:
        assert (ds.compression is None) == (compress == "none")


def test_unknown_compression(tmp_path, child) -> None:
    with pytest.raises(UsageError, match="compression"):
        RasterWriter(tmp_path / "x.tif", child, count=1, compress="jpeg2000")


def test_cog_has_overviews_and_tiles(tmp_path) -> None:
    g = ParentGrid(CRS.from_epsg(4326), from_origin(10.0, 50.0, 1 / 120, 1 / 120), 150, 120, -1.0, ("2020",))
    c = g.child(10)  # 1200 x 1500 child cells
    data = np.random.default_rng(2).random((1, c.height, c.width)).astype(np.float32)
    dest = tmp_path / "cog.tif"
    with RasterWriter(dest, c, count=1, nodata=-1.0, band_descriptions=["2020"], cog=True, units="t/cell/yr") as w:
        _write_all(w, data, step=240)
    assert _listing(tmp_path) == ["cog.tif"]
    with rasterio.open(dest) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.block_shapes[0] == (512, 512)
        assert ds.overviews(1) == [2, 4]  # 1500 px wide: overviews until one 512 block fits
        assert ds.descriptions == ("2020",) and ds.tags()["CARBONSR_UNITS"] == "t/cell/yr"
        assert ds.nodata == -1.0
        assert np.array_equal(ds.read(), data)


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("cog", [False, True])
def test_exception_mid_write_leaves_nothing(tmp_path, child, exc_type, cog) -> None:
    dest = tmp_path / "out.tif"
    with pytest.raises(exc_type):
        with RasterWriter(dest, child, count=2, cog=cog) as w:
            w.write(np.ones((2, 120, child.width), np.float32), Window(0, 0, child.width, 120))
            raise exc_type("stop")
    assert _listing(tmp_path) == []


def test_existing_output_refused(tmp_path, child) -> None:
    dest = tmp_path / "out.tif"
    dest.write_bytes(b"old")
    with pytest.raises(OutputError, match="--overwrite") as ei:
        RasterWriter(dest, child, count=1).__enter__()
    assert str(dest) in str(ei.value)
    assert dest.read_bytes() == b"old" and _listing(tmp_path) == ["out.tif"]
    with RasterWriter(dest, child, count=1, overwrite=True) as w:
        w.write(np.zeros((1, 10, 10), np.float32), Window(0, 0, 10, 10))
    with rasterio.open(dest) as ds:
        assert ds.width == child.width


def test_unwritable_directory_under_a_file(tmp_path, child) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    dest = blocker / "out.tif"
    with pytest.raises(OutputError) as ei:
        with RasterWriter(dest, child, count=1):
            pass
    assert str(blocker) in str(ei.value)
    assert _listing(tmp_path) == ["afile"]


def test_permission_denied(tmp_path, child, monkeypatch) -> None:
    import tempfile

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(OutputError, match="not writable") as ei:
        with RasterWriter(tmp_path / "out.tif", child, count=1):
            pass
    assert str(tmp_path) in str(ei.value)
    assert _listing(tmp_path) == []


def test_disk_full_while_writing(tmp_path, child, monkeypatch) -> None:
    from rasterio.errors import RasterioIOError

    dest = tmp_path / "out.tif"
    with pytest.raises(OutputError, match="disk full") as ei:
        with RasterWriter(dest, child, count=1) as w:

            def full(*a, **k):
                raise RasterioIOError("Write error: No space left on device")

            monkeypatch.setattr(type(w._ds), "write", full)
            w.write(np.zeros((1, 10, 10), np.float32), Window(0, 0, 10, 10))
    assert str(dest) in str(ei.value)
    assert _listing(tmp_path) == []


def test_write_checks_shape_and_window(tmp_path, child) -> None:
    with pytest.raises(ValueError):
        with RasterWriter(tmp_path / "o.tif", child, count=2) as w:
            w.write(np.zeros((1, 10, 10), np.float32), Window(0, 0, 10, 10))
    with pytest.raises(ValueError, match="past"):
        with RasterWriter(tmp_path / "o.tif", child, count=1) as w:
            w.write(np.zeros((1, 10, 10), np.float32), Window(child.width - 5, 0, 10, 10))
    assert _listing(tmp_path) == []


def test_read_room_sizes_the_block_cache_and_keeps_the_values(tmp_path, child) -> None:
    """With ``read_room`` the cache is three 512-row block rows of every band plus the room
    (at least 256 MiB without it); written in 120-row steps through that small cache, the
    values are the same as through the default cache."""
    data = np.random.default_rng(3).gamma(0.5, 2.0, (2, child.height, child.width)).astype(np.float32)
    block_row = 512 * 1024 * 4 * 2  # 700 columns round up to two 512 blocks; 2 bands of float32
    small = RasterWriter(tmp_path / "small.tif", child, count=2, read_room=1 << 20)
    assert small.cache_bytes() == 3 * block_row + (1 << 20)
    assert RasterWriter(tmp_path / "x.tif", child, count=2).cache_bytes() == 256 * 2**20
    with small as w:
        _write_all(w, data)
    with RasterWriter(tmp_path / "default.tif", child, count=2) as w:
        _write_all(w, data)
    with rasterio.open(tmp_path / "small.tif") as a, rasterio.open(tmp_path / "default.tif") as b:
        assert np.array_equal(a.read(), data) and np.array_equal(b.read(), data)


@pytest.mark.slow
def test_streaming_20k_output_peak_rss_below_1_5_gb() -> None:
    """benchmarks/bench_writer.py exits non-zero if peak RSS reaches 1.5 GiB (several minutes)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_writer.py"
    res = subprocess.run([sys.executable, str(script), "--size", "20000"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "peak RSS" in res.stdout
