"""The cache of per-input aux work (coverage samples, class scans): keyed by file identity, it
never answers for a file that has changed (issue 20)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from aux_helpers import write_raster
from rasterio.transform import from_origin

from carbonsr_cli.aux import AuxStack, cache, discover_aux
from carbonsr_cli.aux import coverage as coverage_mod


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("CARBONSR_CACHE_DIR", str(d))
    monkeypatch.delenv("CARBONSR_CACHE", raising=False)
    monkeypatch.setattr(cache, "RACY_SECONDS", 0.0)  # the test files are fresh
    return d


def _layer(path: Path, value: float, dtype: str = "float32") -> Path:
    # 100 m cells over the 6 x 8 km of utm_parent, uncompressed: every rewrite has the same size
    data = np.full((60, 80), value, dtype=dtype)
    data[0, 0] = value + 1  # not constant, so the fill value is a real mean
    return write_raster(path, data, transform=from_origin(500_000.0, 5_600_000.0, 100.0, 100.0),
                        crs="EPSG:32632", nodata=None)


def _fill(path: Path, utm_parent: object) -> float:
    stack = AuxStack(discover_aux([path]), utm_parent.child(10), ["2020"])
    try:
        (cov,) = stack.coverage()
        return cov.fill_value
    finally:
        stack.close()


def _rewrite(path: Path, value: float, dtype: str = "float32") -> None:
    size = path.stat().st_size
    time.sleep(0.05)  # past the file system's timestamp tick (RACY_SECONDS does this in real runs)
    _layer(path, value, dtype)
    assert path.stat().st_size == size


def test_coverage_sample_is_reused_for_the_same_file(tmp_path: Path, utm_parent: object, cache_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    p = _layer(tmp_path / "lights.tif", 5.0)
    first = _fill(p, utm_parent)
    assert len(list((cache_dir / "coverage").glob("*.npy"))) == 1

    def no_read(*a: object, **k: object) -> None:
        raise AssertionError("the sample was read again")

    monkeypatch.setattr(coverage_mod, "open_raster", no_read)  # a hit opens no handle of its own
    assert _fill(p, utm_parent) == first


def test_changed_file_is_never_answered_from_the_cache(tmp_path: Path, utm_parent: object, cache_dir: Path) -> None:
    p = _layer(tmp_path / "lights.tif", 5.0)
    assert _fill(p, utm_parent) == pytest.approx(5.0 + 1 / 4800)
    before = p.stat()
    _rewrite(p, 7.0)  # same size, new content
    assert _fill(p, utm_parent) == pytest.approx(7.0 + 1 / 4800)
    # the modification time put back (cp -p, rsync -t): the change time still tells
    os.utime(p, ns=(before.st_atime_ns, before.st_mtime_ns))
    _rewrite(p, 9.0)
    os.utime(p, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert p.stat().st_mtime_ns == before.st_mtime_ns
    assert _fill(p, utm_parent) == pytest.approx(9.0 + 1 / 4800)
    # a side-car that GDAL reads (here: a nodata value in .aux.xml) is part of the identity
    Path(str(p) + ".aux.xml").write_text(
        '<PAMDataset><PAMRasterBand band="1"><NoDataValue>10</NoDataValue></PAMRasterBand></PAMDataset>')
    time.sleep(0.05)
    assert _fill(p, utm_parent) == pytest.approx(9.0)


def test_replaced_file_is_a_miss(tmp_path: Path, utm_parent: object, cache_dir: Path) -> None:
    p = _layer(tmp_path / "lights.tif", 5.0)
    assert _fill(p, utm_parent) == pytest.approx(5.0 + 1 / 4800)
    other = _layer(tmp_path / "other.tif", 3.0)
    os.replace(other, p)  # a new file (inode) under the same name
    assert _fill(p, utm_parent) == pytest.approx(3.0 + 1 / 4800)


def test_class_scan_follows_the_file(tmp_path: Path, cache_dir: Path) -> None:
    p = _layer(tmp_path / "landcover.tif", 1, dtype="uint8")
    names = [n for s in discover_aux([p]) for n in s.layers]
    assert names == ["landcover:class1", "landcover:class2"]
    assert len(list((cache_dir / "classes").glob("*.npy"))) == 1
    assert [n for s in discover_aux([p]) for n in s.layers] == names  # from the cache
    _rewrite(p, 4, dtype="uint8")
    assert [n for s in discover_aux([p]) for n in s.layers] == ["landcover:class4", "landcover:class5"]


def test_fresh_files_and_cache_off_store_nothing(tmp_path: Path, utm_parent: object, cache_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    p = _layer(tmp_path / "lights.tif", 5.0)
    monkeypatch.setattr(cache, "RACY_SECONDS", 3600.0)  # written just now: may still change
    assert cache.file_identity(p) is None
    _fill(p, utm_parent)
    assert not cache_dir.exists()
    monkeypatch.setattr(cache, "RACY_SECONDS", 0.0)
    monkeypatch.setenv("CARBONSR_CACHE", "0")
    _fill(p, utm_parent)
    assert not cache_dir.exists()


def test_unwritable_or_corrupt_cache_is_a_miss(tmp_path: Path, utm_parent: object, cache_dir: Path) -> None:
    p = _layer(tmp_path / "lights.tif", 5.0)
    first = _fill(p, utm_parent)
    (entry,) = (cache_dir / "coverage").glob("*.npy")
    entry.write_bytes(b"not an array")
    assert _fill(p, utm_parent) == first


def _roads(path: Path, classes: tuple[str, str]) -> Path:
    import geopandas as gpd
    from shapely.geometry import LineString

    x0, y0 = 500_000.0, 5_600_000.0
    gdf = gpd.GeoDataFrame(
        {"class": list(classes)},
        geometry=[LineString([(x0 + 100, y0 - 500), (x0 + 7_900, y0 - 500)]),
                  LineString([(x0 + 500, y0 - 100), (x0 + 500, y0 - 5_900)])],
        crs="EPSG:32632",
    )
    if path.exists():
        time.sleep(0.05)
        path.unlink()
    gdf.to_file(path, driver="GPKG")
    return path


def test_vector_layers_are_kept_and_the_frame_read_on_use(tmp_path: Path, utm_parent: object, cache_dir: Path) -> None:
    p = _roads(tmp_path / "roads.gpkg", ("primary", "track"))
    (first,) = discover_aux([p])
    assert first.gdf is not None and first.layers == ["roads:length", "roads:length:primary", "roads:length:track"]
    (kept,) = discover_aux([p])
    assert kept.gdf is None and kept.layers == first.layers and kept.class_attr == first.class_attr
    assert kept.vector_bounds() == tuple(float(v) for v in first.gdf.total_bounds)
    child = utm_parent.child(10)
    stacks = [AuxStack([s], child, ["2020"]) for s in (first, kept)]
    try:
        from rasterio.windows import Window

        w = Window(0, 0, child.width, child.height)
        np.testing.assert_array_equal(stacks[0].read(w), stacks[1].read(w))
        assert [c.covered for c in stacks[0].coverage()] == [c.covered for c in stacks[1].coverage()]
    finally:
        for s in stacks:
            s.close()
    _roads(p, ("motorway", "track"))  # new classes: the cached layers must not be used
    (changed,) = discover_aux([p])
    assert changed.layers == ["roads:length", "roads:length:motorway", "roads:length:track"]


def test_vector_changed_after_discovery_is_an_error(tmp_path: Path, cache_dir: Path) -> None:
    from carbonsr_cli.errors import InputDataError

    p = _roads(tmp_path / "roads.gpkg", ("primary", "track"))
    discover_aux([p])
    (kept,) = discover_aux([p])
    assert kept.gdf is None
    _roads(p, ("motorway", "track"))
    with pytest.raises(InputDataError, match="changed"):
        kept.frame()
