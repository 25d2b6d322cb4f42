"""Row strips of the model path: assembly equals a direct read of each tile row, reads happen once."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import numpy as np
import pytest
import rasterio
from ds_helpers import assert_conserves

from carbonsr_cli.downscale import downscale
from carbonsr_cli.downscale.readers import StripFeed, reader_config
from carbonsr_cli.downscale.strips import StripGeometry, assemble, symmetric_index
from carbonsr_cli.tiling import TileLayout, pad_reflect

F = 2  # small factor keeps the arrays small; the geometry is the same for any factor


def _values(c: int, r: int, w: int, h: int, channels: int = 3) -> np.ndarray:
    """A deterministic ``[C, 1, h, w]`` field encoding channel, child row and child col."""
    rows = np.arange(r, r + h)[:, None]
    cols = np.arange(c, c + w)[None, :]
    return np.stack([(ch * 1_000_000 + rows * 1000 + cols).astype(np.float32)[None] for ch in range(channels)])


def _direct(geom: StripGeometry, i: int, j: int) -> np.ndarray:
    """The pre-strip reading: the clipped extent of the tile row, then ``pad_reflect``."""
    lay = geom.layout
    er0, er1 = geom.row_extent(i)
    ec0, ec1 = geom.col_extent(j)
    rr0, rr1 = max(er0, 0), min(er1, lay.parent_height)
    cc0, cc1 = max(ec0, 0), min(ec1, lay.parent_width)
    raw = _values(cc0 * F, rr0 * F, (cc1 - cc0) * F, (rr1 - rr0) * F)
    pad = ((rr0 - er0) * F, (er1 - rr1) * F), ((cc0 - ec0) * F, (ec1 - cc1) * F)
    return pad_reflect(raw, pad)[0]


def _chunks(n_cols: int, k: int) -> tuple[tuple[int, int], ...]:
    return tuple((j, min(j + k, n_cols)) for j in range(0, n_cols, k))


def test_symmetric_index_matches_numpy_pad() -> None:
    for n in (1, 2, 5):
        for start, stop in ((-7, n + 9), (-1, n), (0, n + 3)):
            a = np.arange(n)
            want = np.pad(a, (max(-start, 0), max(stop - n, 0)), mode="symmetric")
            assert np.array_equal(a[symmetric_index(start, stop, n)], want), (n, start, stop)


@pytest.mark.parametrize("ph,pw", [(1, 1), (3, 5), (8, 8), (13, 9), (30, 41)])
@pytest.mark.parametrize("overlap", [0, 1, 2, 4, 5])
def test_assembled_rows_equal_direct_reads(ph: int, pw: int, overlap: int) -> None:
    """Every tile row and chunk, for grids smaller and larger than a tile and every overlap."""
    lay = TileLayout(ph, pw, F, 12 * F, overlap)
    for chunk in (1, 2, lay.n_cols):
        geom = StripGeometry(lay, _chunks(lay.n_cols, chunk), F)
        strips = {
            (k, j): _values(int(w.col_off), int(w.row_off), int(w.width), int(w.height))
            for k in range(geom.n_strips) for j in range(len(geom.chunks))
            for w in [geom.child_window(k, j)] if w.height > 0
        }
        rows_read = sum(int(geom.child_window(k, 0).height) for k in range(geom.n_strips))
        assert rows_read == ph * F  # every row is read exactly once
        for i in range(lay.n_rows):
            for j in range(len(geom.chunks)):
                got = assemble(geom, i, j, {k: strips[(k, j)] for k in geom.strips_of_row(i)}, None)
                want = _direct(geom, i, j)
                assert got.shape == want.shape and np.array_equal(got, want), (i, j)
                assert not any(np.shares_memory(got, s) for s in strips.values())


def test_assemble_reorders_channels() -> None:
    lay = TileLayout(20, 20, F, 12 * F, 2)
    geom = StripGeometry(lay, _chunks(lay.n_cols, lay.n_cols), F)
    strips = {k: _values(*(int(v) for v in (geom.child_window(k, 0).col_off, geom.child_window(k, 0).row_off,
                                              geom.child_window(k, 0).width, geom.child_window(k, 0).height)))
              for k in range(geom.n_strips)}
    got = assemble(geom, 1, 0, strips, [2, 0])
    want = _direct(geom, 1, 0)[[2, 0]]
    assert np.array_equal(got, want)


class _CountingReader:
    """Fake strip reader: tracks strips held and read."""

    def __init__(self, geom: StripGeometry, capacity: int) -> None:
        self.geom, self.capacity = geom, capacity
        self.held: set[tuple[int, int]] = set()
        self.reads: list[tuple[int, int]] = []
        self.max_held = 0

    def submit(self, k: int, j: int) -> cf.Future:
        assert (k, j) not in self.held and len(self.held) < self.capacity
        self.held.add((k, j))
        self.reads.append((k, j))
        self.max_held = max(self.max_held, len(self.held))
        w = self.geom.child_window(k, j)
        fut: cf.Future = cf.Future()
        fut.set_result(_values(int(w.col_off), int(w.row_off), int(w.width), int(w.height)))
        return fut

    def release(self, k: int, j: int) -> None:
        self.held.remove((k, j))


def test_feed_reads_each_strip_once_within_capacity() -> None:
    lay = TileLayout(37, 29, F, 12 * F, 2)
    geom = StripGeometry(lay, _chunks(lay.n_cols, 2), F)
    span = max(len(geom.strips_of_row(i)) for i in range(lay.n_rows))
    reader = _CountingReader(geom, capacity=(span + 1) * len(geom.chunks) + 3)
    feed = StripFeed(reader, geom, ahead=3)
    for i in range(lay.n_rows):
        for j in range(len(geom.chunks)):
            got = assemble(geom, i, j, feed.get(i, j), None)
            assert np.array_equal(got, _direct(geom, i, j))
            feed.done(i, j)
    assert sorted(reader.reads) == sorted(set(reader.reads)) == sorted(feed.order)
    assert reader.held == set()  # everything released
    assert reader.max_held <= reader.capacity


def test_reader_config_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARBONSR_READ_PROCS", raising=False)
    monkeypatch.delenv("CARBONSR_READ_THREADS", raising=False)
    assert reader_config(100_000_000, cpu_count=2) == (1, False)
    assert reader_config(100_000_000, cpu_count=16) == (4, True)
    assert reader_config(100_000_000, cpu_count=8) == (4, True)
    assert reader_config(100_000_000, cpu_count=6) == (4, True)
    assert reader_config(1_000_000, cpu_count=16) == (2, False)
    monkeypatch.setenv("CARBONSR_READ_PROCS", "3")
    assert reader_config(1, cpu_count=2) == (3, True)


def test_writer_cache_room_only_when_readers_are_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The output writer's GDAL cache shrinks to its block rows + 64 MiB only when no aux layer
    is read in this process (reader processes); else the writer keeps its 256 MiB default."""
    from types import SimpleNamespace

    from carbonsr_cli.downscale import engine

    monkeypatch.delenv("CARBONSR_READ_THREADS", raising=False)
    plan = SimpleNamespace(aux_names=["lights"], child=SimpleNamespace(width=10_000, height=10_000))
    monkeypatch.setenv("CARBONSR_READ_PROCS", "3")
    assert engine._writer_read_room(plan, True) == engine.WRITER_READ_ROOM
    assert engine._writer_read_room(plan, False) is None  # baselines read their layer here
    assert engine._writer_read_room(plan, True, writers=2) is None  # an uncertainty file too
    assert engine._writer_read_room(SimpleNamespace(aux_names=[], child=plan.child), True) is None
    monkeypatch.delenv("CARBONSR_READ_PROCS")
    monkeypatch.setenv("CARBONSR_READ_THREADS", "2")
    assert engine._writer_read_room(plan, True) is None


def _thread_and_process_runs(
    region: dict, ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Path]:
    """Downscale ``region`` with one reader thread, then two reader processes; both conserve."""
    outs = {}
    for mode, env in (("threads", "CARBONSR_READ_THREADS"), ("procs", "CARBONSR_READ_PROCS")):
        monkeypatch.delenv("CARBONSR_READ_PROCS", raising=False)
        monkeypatch.delenv("CARBONSR_READ_THREADS", raising=False)
        monkeypatch.setenv(env, "2" if mode == "procs" else "1")
        out = outs[mode] = tmp_path / f"{mode}.tif"
        s = downscale(region["main"], [region["aux"]], out, checkpoint=ckpt, device="cpu", progress=False,
                      batch_size=4)
        assert s.conservation.ok
        assert_conserves(out, region["main"], 10)
    return outs


def test_reader_processes_give_the_thread_result(
    small_region: dict, small_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spawned reader processes with shared-memory strips write the same file as one thread.

    Pre-warping (process mode only) is switched off here so that the results must be equal;
    ``test_prewarped_layers_match_per_strip_warps`` covers it.
    """
    from carbonsr_cli.downscale import engine, readers

    monkeypatch.setattr(engine, "CHUNK_BYTES", 1)  # several column chunks per tile row
    monkeypatch.setattr(readers, "materialize_warps", lambda stack, work_dir: None)
    made: list[str] = []
    for cls in (readers.ThreadStripReader, readers.ProcessStripReader):
        def init(self: object, *a: object, _cls: type = cls, _real: object = cls.__init__, **k: object) -> None:
            made.append(_cls.__name__)
            _real(self, *a, **k)  # type: ignore[operator]

        monkeypatch.setattr(cls, "__init__", init)
    outs = _thread_and_process_runs(small_region, small_ckpt, tmp_path, monkeypatch)
    assert made == ["ThreadStripReader", "ProcessStripReader"]
    with rasterio.open(outs["threads"]) as a, rasterio.open(outs["procs"]) as b:
        assert np.array_equal(a.read(), b.read())


def test_blending_on_the_device_matches_the_host(
    small_region: dict, small_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA path keeps predictions on the device and blends there (torch Blender); forced
    here on the CPU device, it must write what the numpy Blender writes."""
    from carbonsr_cli.downscale import predict

    outs = {}
    for mode in ("host", "device"):
        if mode == "device":
            real = predict._Predictor.__init__

            def init(self: object, *a: object, **k: object) -> None:
                real(self, *a, **k)  # type: ignore[arg-type]
                self.on_device = True  # type: ignore[attr-defined]

            monkeypatch.setattr(predict._Predictor, "__init__", init)
        out = outs[mode] = tmp_path / f"{mode}.tif"
        s = downscale(small_region["main"], [small_region["aux"]], out, checkpoint=small_ckpt, device="cpu",
                      progress=False, batch_size=4)
        assert s.conservation.ok
        assert_conserves(out, small_region["main"], 10)
    with rasterio.open(outs["host"]) as a, rasterio.open(outs["device"]) as b:
        va, vb = a.read(masked=True), b.read(masked=True)
    assert np.array_equal(va.mask, vb.mask)
    assert np.allclose(va.filled(0), vb.filled(0), rtol=1e-5, atol=1e-7)


def test_error_in_a_reader_process_reaches_the_caller(tmp_path: Path) -> None:
    """An InputDataError raised in a worker arrives as that error; closing frees the slots."""
    import os

    from ds_helpers import FailingStack

    from carbonsr_cli.downscale.readers import ProcessStripReader
    from carbonsr_cli.errors import InputDataError

    lay = TileLayout(30, 12, F, 12 * F, 2)
    geom = StripGeometry(lay, _chunks(lay.n_cols, lay.n_cols), F)
    stack = FailingStack(2, fail_from=20 * F, path=str(tmp_path / "bad.tif"))
    reader = ProcessStripReader(stack, geom, 1, capacity=6)
    reader.set_stack(stack)
    names = [s.name for s in reader.slots]
    feed = StripFeed(reader, geom, ahead=2)
    try:
        got = assemble(geom, 0, 0, feed.get(0, 0), None)
        ec0, ec1 = geom.col_extent(0)
        assert got.shape == (2, 1, 12 * F, (ec1 - ec0) * F)
        feed.done(0, 0)
        with pytest.raises(InputDataError, match="truncated or corrupt") as ei:
            for i in range(1, lay.n_rows):
                feed.get(i, 0)
                feed.done(i, 0)
        assert str(tmp_path / "bad.tif") in str(ei.value)
    finally:
        feed.close()
    if os.path.isdir("/dev/shm"):
        assert not [n for n in names if os.path.exists(f"/dev/shm/{n.lstrip('/')}")]


class _FakeEvent:
    """Stands in for a CUDA event: records whether the reader waited for it."""

    def __init__(self) -> None:
        self.waited = False

    def synchronize(self) -> None:
        self.waited = True


def test_page_locked_slots_wait_for_their_copy_and_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA copy logic of reader processes, with the CUDA calls replaced: a slot is locked
    once, its slot goes back to the free list only after its copy's event, it is unlocked at
    close; when locking fails, strips go through the staging copy (``to_device``)."""
    import torch
    from ds_helpers import ValuesStack

    from carbonsr_cli.downscale import readers

    lay = TileLayout(30, 12, F, 12 * F, 2)
    geom = StripGeometry(lay, _chunks(lay.n_cols, lay.n_cols), F)
    locked: list[int] = []
    unlocked: list[int] = []
    events: list[_FakeEvent] = []

    def copy(array: np.ndarray, device: object) -> tuple[object, _FakeEvent]:
        events.append(_FakeEvent())
        return torch.from_numpy(array.copy()), events[-1]

    monkeypatch.setattr(readers, "page_lock", lambda address, size, device: locked.append(address) or True)
    monkeypatch.setattr(readers, "page_unlock", unlocked.append)
    monkeypatch.setattr(readers, "copy_page_locked", copy)
    stack = ValuesStack(2)
    reader = readers.ProcessStripReader(stack, geom, 1, capacity=6)
    reader.set_stack(stack)
    try:
        arrays = {k: reader.submit(k, 0).result() for k in range(3)}
        tensors = {k: reader.device_copy(k, 0, arrays[k], torch.device("cpu")) for k in range(3)}
        for k in range(3):
            assert np.array_equal(tensors[k].numpy(), stack.read(geom.child_window(k, 0)))
        assert len(locked) == 3 and len(events) == 3
        reader.release(0, 0)
        assert events[0].waited and not events[1].waited
        again = reader.submit(3, 0).result()  # reuses the released slot: locked already
        reader.device_copy(3, 0, again, torch.device("cpu"))
        assert len(locked) == 3
    finally:
        reader.close()
    assert sorted(unlocked) == sorted(locked) and all(e.waited for e in events[1:])

    monkeypatch.setattr(readers, "page_lock", lambda address, size, device: False)
    staged: list[np.ndarray] = []
    monkeypatch.setattr(readers, "to_device", lambda array, device: staged.append(array) or torch.from_numpy(array))
    reader = readers.ProcessStripReader(stack, geom, 1, capacity=6)
    reader.set_stack(stack)
    try:
        arr = reader.submit(0, 0).result()
        reader.device_copy(0, 0, arr, torch.device("cpu"))
        assert reader.lock_failed and len(staged) == 1 and reader.locked == {}
    finally:
        reader.close()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_page_locked_strips_reach_the_device_unchanged() -> None:
    """CUDA: strips copied straight from page-locked shared-memory slots, with slots reused
    under a small capacity, assemble to the direct read of every tile row."""
    import torch
    from ds_helpers import ValuesStack

    from carbonsr_cli.downscale.readers import ProcessStripReader

    lay = TileLayout(37, 29, F, 12 * F, 2)
    geom = StripGeometry(lay, _chunks(lay.n_cols, 2), F)
    span = max(len(geom.strips_of_row(i)) for i in range(lay.n_rows))
    stack = ValuesStack(3)
    reader = ProcessStripReader(stack, geom, 2, capacity=(span + 1) * len(geom.chunks) + 2)
    reader.set_stack(stack)
    feed = StripFeed(reader, geom, ahead=2, device=torch.device("cuda"))
    try:
        for i in range(lay.n_rows):
            for j in range(len(geom.chunks)):
                got = assemble(geom, i, j, feed.get(i, j), None)
                torch.cuda.synchronize()
                assert np.array_equal(got.cpu().numpy(), _direct(geom, i, j))
                feed.done(i, j)
        assert reader.locked and not reader.lock_failed
    finally:
        feed.close()
    assert reader.locked == {}


def test_prewarped_layers_match_per_strip_warps(
    small_region: dict, small_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reader processes warp the EPSG:4326 / EPSG:3857 layers once up front; the result stays
    within GDAL's approximate-transformer differences of the per-strip warps, conserves, and
    the hidden warp folder is gone afterwards."""
    from carbonsr_cli.downscale import readers

    made: list[Path] = []
    real = readers.materialize_warps

    def spy(stack: object, work_dir: Path) -> Path | None:
        folder = real(stack, work_dir)
        made.append(folder)  # type: ignore[arg-type]
        assert folder is not None and len(list(folder.iterdir())) == 2  # lights (4326) and pop (3857)
        return folder

    monkeypatch.setattr(readers, "materialize_warps", spy)
    outs = _thread_and_process_runs(small_region, small_ckpt, tmp_path, monkeypatch)
    assert len(made) == 1 and not made[0].exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    with rasterio.open(outs["threads"]) as a, rasterio.open(outs["procs"]) as b:
        va, vb = a.read(masked=True), b.read(masked=True)
    assert np.array_equal(va.mask, vb.mask)
    d = np.abs(va - vb).filled(0)
    assert d.sum() <= 1e-3 * np.abs(va).filled(0).sum()
    assert np.allclose(va.filled(0), vb.filled(0), rtol=2e-2, atol=1e-3)
