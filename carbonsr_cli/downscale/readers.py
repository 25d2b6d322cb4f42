"""Readers of the aux row strips of the model path, and the feed that schedules them.

Readers: aux reading (GDAL warps, class counting, vector rasterising) holds the GIL for much
of its time. On the 16-core GPU host four reader threads read a 500 x 500 km region no faster
than one (6.0 s vs 5.6 s), and pickling the results of reader processes through a pipe cost
more than the reading. :class:`ProcessStripReader` therefore uses spawned worker processes
(they never import torch) that write every strip into a shared-memory slot the main process
reads without a copy; :class:`ThreadStripReader` (one or two threads) serves small rasters and
small machines. :func:`reader_config` picks one.

:class:`StripFeed` schedules reads ahead of the row loop and releases strips no later tile row
needs (CUDA: each strip is copied to the device once). With processes,
:func:`materialize_warps` first warps every continuous layer that needs a warp onto the child
grid into a hidden folder next to the output (removed at the end).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import math
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from carbonsr_cli.atomic import owner_tag, remove_stale
from carbonsr_cli import cpus  # cpus.available_cpus looked up at call time (tests patch it)
from carbonsr_cli.devices import copy_page_locked, page_lock, page_unlock, to_device
from carbonsr_cli.errors import CarbonSRWarning

if TYPE_CHECKING:  # pragma: no cover
    from carbonsr_cli.downscale.strips import StripGeometry

__all__ = ["ProcessStripReader", "StripFeed", "ThreadStripReader", "materialize_warps", "reader_config",
           "remove_killed_leftovers", "start_reader_pool"]


#: Child cells of a raster from which :func:`reader_config` switches to reader processes.
PROCESS_MIN_CELLS = 16_000_000



#: Most reader processes (memory: ~300 MB each at 1,000 km; see :func:`reader_config`).
MAX_PROCESSES = 4



#: GDAL block cache of each reader process (MB); GDAL's default is 5% of the RAM per process.
WORKER_GDAL_CACHE_MB = 32



def reader_config(child_cells: int, cpu_count: int | None = None) -> tuple[int, bool]:
    """``(readers, use_processes)`` for the model path's aux reading.

    Processes when the output has at least :data:`PROCESS_MIN_CELLS` cells and the machine
    has 6 or more cores (``min(MAX_PROCESSES, cores - 2)`` of them: the main thread drives the
    model and a writer thread compresses); else one thread (two from 4 cores). Spawning a
    worker costs ~1-3 s (imports, aux index), which small rasters would not win back. Each
    worker holds ~250-300 MB. On the 16-core GPU host (1,000 km, base, layers needing a warp
    pre-warped by :func:`materialize_warps`; one run, session 5): 3 workers 16.3 s with 3.6 GB
    for the whole process tree (PSS), 5 workers 17.1 s / 3.9 GB, 8 workers 15.7 s / 4.6 GB.
    Since the row loop got faster (sessions 12-16) 3 workers are busy ~95 % of it; interleaved
    runs of the command (16-core H200 host, same inputs) gave 5 workers a lower median wall
    than 3 in every comparison: 10.07 vs 10.20 s (session 16), 9.68 vs 9.99 s and 9.65 vs 9.78 s
    (session 17, two trees), the row loop 0.1-0.5 s shorter; 7 workers 10.30 s (their imports
    slow the start). But the process tree's memory crosses the 4 GB target of
    ``benchmarks/run.py`` with more than 3 (session 18, one host, its "PSS incl. readers" row,
    1,000 km, ``base``): 3 workers 3,812 MB (command 9.80 s), 4 workers 4,118 MB (9.03 s), 5
    workers 4,342 MB (9.09 s). Session 19 made room for a fourth: strips are copied to CUDA
    straight from their page-locked slots (no page-locked staging blocks cached beside them)
    and the output writer's GDAL cache holds three block rows plus 64 MiB instead of 256 MiB.
    With 4 workers the tree then held 3,602 MB (``run.py``, one host), and the command took
    10.64 s against 10.91 s with 3 (interleaved, 4 runs each; the tree before both changes,
    3 workers: 11.62 s). ``CARBONSR_READ_PROCS=3`` saves ~300 MB.
    ``CARBONSR_READ_PROCS=N`` / ``CARBONSR_READ_THREADS=N`` override.
    """
    for var, procs in (("CARBONSR_READ_PROCS", True), ("CARBONSR_READ_THREADS", False)):
        env = os.environ.get(var, "").strip()
        if env.isdigit() and int(env) > 0:
            return int(env), procs

    cores = cpu_count or cpus.available_cpus(respect_omp=False)
    if cores >= 6 and child_cells >= PROCESS_MIN_CELLS:
        return min(MAX_PROCESSES, cores - 2), True
    return (2 if cores >= 4 else 1), False



class ThreadStripReader:
    """Reads strips in threads, each with its own AuxStack handles; results are numpy arrays."""

    def __init__(self, stack: Any, geom: StripGeometry, n_threads: int) -> None:
        self.stack = stack
        self.geom = geom
        self.local = threading.local()
        self.stacks: list[Any] = []
        self.ex = cf.ThreadPoolExecutor(max_workers=max(1, n_threads), thread_name_prefix="carbonsr-read")
        self.capacity = 10**9  # no slot limit (memory is bounded by the caller's read-ahead)
        self.cleanup_dir: Path | None = None  # removed by close()

    def _read(self, k: int, j: int) -> np.ndarray:
        st = getattr(self.local, "stack", None)
        if st is None:
            st = self.local.stack = self.stack.copy()
            self.stacks.append(st)
        return st.read(self.geom.child_window(k, j))

    def submit(self, k: int, j: int) -> cf.Future:
        """Start reading strip ``(k, j)``; the future gives ``[C, T, h, w]`` float32."""
        return self.ex.submit(self._read, k, j)

    def device_copy(self, k: int, j: int, array: np.ndarray, device: Any) -> Any:
        """Strip ``(k, j)`` (``array``, from :meth:`submit`) as a tensor on the CUDA ``device``."""
        return to_device(array, device)

    def release(self, k: int, j: int) -> None:
        """Strip no longer needed (nothing to free for threads)."""

    def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)
        for st in [*self.stacks, self.stack]:
            with contextlib.suppress(Exception):
                st.close()
        remove_dir(self.cleanup_dir)
        self.cleanup_dir = None



def _worker_init(cache_mb: int) -> None:
    """Initializer of a reader process (the slots are attached on first use, the stack comes later)."""
    os.environ.setdefault("GDAL_CACHEMAX", str(cache_mb))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER["slots"] = {}
    import atexit

    atexit.register(_worker_exit)



def _worker_warm() -> int:
    """First task of a worker: import what reading needs while the main process prepares."""
    import rasterio  # noqa: F401
    import shapely  # noqa: F401

    import carbonsr_cli.aux  # noqa: F401

    return os.getpid()



def _worker_stack(stack_path: str) -> Any:
    """The pickled AuxStack at ``stack_path``, loaded once per worker."""
    if _WORKER.get("stack_path") != stack_path:
        import pickle

        with open(stack_path, "rb") as fh:
            _WORKER["stack"] = pickle.load(fh)  # written by ProcessStripReader from the caller's own AuxStack
        _WORKER["stack_path"] = stack_path
    return _WORKER["stack"]



def _worker_exit() -> None:
    """Close the datasets and detach the slots before the interpreter tears modules down."""
    stack = _WORKER.pop("stack", None)
    if stack is not None:
        with contextlib.suppress(Exception):
            stack.close()
    for shm in _WORKER.pop("slots", {}).values():
        with contextlib.suppress(Exception):
            shm.close()



def _attach(name: str) -> Any:
    """Attach to a shared-memory block created by the main process (without owning it)."""
    from multiprocessing import shared_memory

    try:
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]  # Python >= 3.13
    except TypeError:
        # Python < 3.13 registers every attached block with the (shared) resource tracker,
        # which would unlink it when this worker exits: attach without registering.
        from multiprocessing import resource_tracker

        register = resource_tracker.register
        resource_tracker.register = lambda *a, **k: None  # type: ignore[assignment]
        try:
            return shared_memory.SharedMemory(name=name)
        finally:
            resource_tracker.register = register  # type: ignore[assignment]



def _worker_read(stack_path: str, window: Any, slot: str) -> tuple[int, ...]:
    """Read one strip into the shared-memory block named ``slot``; returns its shape."""
    stack = _worker_stack(stack_path)
    shm = _WORKER["slots"].get(slot)
    if shm is None:
        shm = _WORKER["slots"][slot] = _attach(slot)
    shape = (stack.channels, len(stack.years), int(window.height), int(window.width))
    out = np.ndarray(shape, dtype=np.float32, buffer=shm.buf)
    stack.read(window, out=out)
    return shape



def remove_killed_leftovers(work_dir: Path) -> list[Path]:
    """Remove what killed downscale runs (``kill -9``) of this host left behind.

    Pre-warp folders ``.carbonsr-warp-<host>-<pid>-*`` in ``work_dir`` (the output's folder),
    reader payloads ``carbonsr-aux-<host>-<pid>-*.pkl`` in the temp folder and shared-memory
    blocks ``/dev/shm/carbonsr-<host>-<pid>-*``, each only when its process is gone.
    """
    import tempfile

    removed = remove_stale(work_dir, ".carbonsr-warp-")
    removed += remove_stale(tempfile.gettempdir(), "carbonsr-aux-")
    if os.path.isdir("/dev/shm"):
        removed += remove_stale("/dev/shm", "carbonsr-")
    return removed



def materialize_warps(stack: Any, work_dir: Path) -> Path | None:
    """Warp the stack's layers that need a warp once, into a hidden folder of ``work_dir``.

    Returns the folder (remove it with :func:`remove_dir` after the readers are closed), or
    None when nothing needed a warp. Writing problems (disk full, read-only folder) only cost
    speed: the layers are then warped per strip, with a warning.
    """
    import tempfile
    import warnings

    if not stack.warp_targets():
        return None
    remove_stale(work_dir, ".carbonsr-warp-")  # left by a killed run (kill -9) in this folder
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".carbonsr-warp-{owner_tag()}-", dir=work_dir))
    except OSError as exc:
        warnings.warn(f"{work_dir}: cannot create a folder for pre-warped aux layers ({exc}); warping per strip",
                      CarbonSRWarning, stacklevel=2)
        return None
    try:

        stack.materialize_warps(folder, threads=cpus.available_cpus(respect_omp=False))
    except OSError as exc:
        remove_dir(folder)
        warnings.warn(f"{work_dir}: cannot write pre-warped aux layers ({exc}); warping per strip",
                      CarbonSRWarning, stacklevel=2)
        return None
    except BaseException:
        remove_dir(folder)
        raise
    return folder



def remove_dir(folder: Path | None) -> None:
    """Remove a folder made by :func:`materialize_warps` (best effort)."""
    if folder is not None:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)



def start_reader_pool(n_procs: int) -> cf.ProcessPoolExecutor:
    """Spawn ``n_procs`` reader processes now (they import what reading needs meanwhile) for a
    :class:`ProcessStripReader`; the geometry of the strips need not be known yet."""
    import multiprocessing as mp

    pool = cf.ProcessPoolExecutor(max_workers=max(1, n_procs), mp_context=mp.get_context("spawn"),
                                  initializer=_worker_init, initargs=(WORKER_GDAL_CACHE_MB,))
    for _ in range(max(1, n_procs)):
        pool.submit(_worker_warm)  # spawns the workers now
    return pool



class ProcessStripReader:
    """Reads strips in spawned worker processes into shared-memory slots.

    ``capacity`` strips may be held at once (submitted and not released); the caller must
    not exceed it. Results are numpy views onto the slots, valid until :meth:`release`.
    """

    def __init__(self, stack: Any, geom: StripGeometry, n_procs: int, capacity: int, cleanup_dir: Path | None = None,
                 pool: cf.ProcessPoolExecutor | None = None) -> None:
        """Create the slots and start the workers; reading waits for :meth:`set_stack`.

        ``stack`` gives the strip shape (channels, years) only; the stack the workers read is
        the one passed to :meth:`set_stack` (e.g. after :func:`materialize_warps` changed it),
        so that spawning and importing in the workers overlaps the caller's preparation.
        ``pool``: workers started earlier by :func:`start_reader_pool` (owned by this reader
        from now on), else ``n_procs`` are started here.
        """
        from multiprocessing import shared_memory

        self.geom = geom
        self.stack: Any = None
        self.cleanup_dir = cleanup_dir  # removed by close(), after the workers and the stack
        c, t = stack.channels, len(stack.years)
        f = geom.factor
        width = max(geom.clipped_cols(j)[1] - geom.clipped_cols(j)[0] for j in range(len(geom.chunks))) * f
        self.slot_bytes = max(1, c * t * geom.layout.stride_parent * f * width * 4)
        self.capacity = max(2, int(capacity))
        self.slots: list[Any] = []
        self.locked: dict[int, int] = {}  # slot -> address, page-locked for CUDA copies
        self.lock_failed = False
        self.copies: dict[int, Any] = {}  # slot -> CUDA event of its last copy to the device
        self.stack_path = ""
        try:

            named = os.path.isdir("/dev/shm")  # Linux: named blocks, so a later run can find them
            if named:  # blocks of killed runs (when the resource tracker died too)
                remove_stale("/dev/shm", "carbonsr-")
            tag = f"carbonsr-{owner_tag()}-{os.urandom(3).hex()}"
            for k in range(self.capacity):
                self.slots.append(shared_memory.SharedMemory(name=f"{tag}-{k}" if named else None, create=True,
                                                             size=self.slot_bytes))
            self.free = list(range(self.capacity))
            self.held: dict[tuple[int, int], int] = {}
            self.ex = pool if pool is not None else start_reader_pool(n_procs)
        except BaseException:
            self._unlink()
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            raise

    def set_stack(self, stack: Any) -> None:
        """The stack to read (owned and closed by this reader from now on).

        It goes to the workers through a file: a large spawn payload blocks the parent forever
        if a worker dies before reading it.
        """
        import pickle
        import tempfile

        self.stack = stack

        remove_stale(tempfile.gettempdir(), "carbonsr-aux-")  # left by killed runs
        fd, self.stack_path = tempfile.mkstemp(prefix=f"carbonsr-aux-{owner_tag()}-", suffix=".pkl")
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(stack.reader_copy(), fh, protocol=pickle.HIGHEST_PROTOCOL)

    def submit(self, k: int, j: int) -> cf.Future:
        """Start reading strip ``(k, j)`` into a free slot; the future gives a view ``[C, T, h, w]``."""
        slot = self.free.pop()
        self.held[(k, j)] = slot
        if not self.stack_path:
            raise RuntimeError("ProcessStripReader.set_stack() was not called")
        inner = self.ex.submit(_worker_read, self.stack_path, self.geom.child_window(k, j), self.slots[slot].name)
        outer: cf.Future = cf.Future()

        def done(fut: cf.Future) -> None:
            if outer.cancelled() or not self.slots:  # cancelled, or the reader is closed
                return
            with contextlib.suppress(cf.InvalidStateError):
                if fut.cancelled():
                    outer.cancel()
                elif fut.exception() is not None:
                    outer.set_exception(fut.exception())  # type: ignore[arg-type]
                else:
                    n = math.prod(fut.result())
                    outer.set_result(np.ndarray(fut.result(), dtype=np.float32, buffer=self.slots[slot].buf[: n * 4]))

        inner.add_done_callback(done)
        return outer

    def device_copy(self, k: int, j: int, array: np.ndarray, device: Any) -> Any:
        """Strip ``(k, j)`` (``array``, a view of its slot) as a tensor on the CUDA ``device``.

        Each slot is page-locked on its first copy (:func:`~carbonsr_cli.devices.page_lock`),
        so copies read the slot directly: no staging copy in page-locked memory (45 MB per
        1,000 km strip) and no page-locked blocks cached beside the slots. :meth:`release`
        waits for the copy before the slot can be written again. Where locking fails, strips
        go through :func:`~carbonsr_cli.devices.to_device`.
        """
        slot = self.held[(k, j)]
        if slot not in self.locked and not self.lock_failed:
            address = np.frombuffer(self.slots[slot].buf, dtype=np.uint8).ctypes.data
            if page_lock(address, self.slot_bytes, device):
                self.locked[slot] = address
            else:
                self.lock_failed = True
        if slot not in self.locked:
            return to_device(array, device)
        tensor, self.copies[slot] = copy_page_locked(array, device)
        return tensor

    def release(self, k: int, j: int) -> None:
        """Give strip ``(k, j)``'s slot back (its array must no longer be used)."""
        slot = self.held.pop((k, j), None)
        if slot is not None:
            copy = self.copies.pop(slot, None)
            if copy is not None:
                copy.synchronize()  # the device copy has read the slot (queued a tile row ago)
            self.free.append(slot)

    def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)
        self._unlink()
        if self.stack is not None:
            with contextlib.suppress(Exception):
                self.stack.close()
        remove_dir(self.cleanup_dir)
        self.cleanup_dir = None

    def _unlink(self) -> None:
        if self.stack_path:
            with contextlib.suppress(OSError):
                os.unlink(self.stack_path)
            self.stack_path = ""
        for copy in self.copies.values():
            with contextlib.suppress(Exception):
                copy.synchronize()
        self.copies = {}
        for address in self.locked.values():
            page_unlock(address)  # before the slot is unmapped
        self.locked = {}
        for s in self.slots:
            with contextlib.suppress(Exception):
                s.close()
            with contextlib.suppress(Exception):
                s.unlink()
        self.slots = []


_WORKER: dict[str, Any] = {}



class StripFeed:
    """Schedules strip reads ahead of the tile rows and hands out assembled aux inputs.

    Strips are submitted in ``(k, j)`` order, at most ``ahead`` beyond those the current
    tile row needs (and never more than the reader's capacity); a strip is released once no
    later tile row needs it.
    """

    def __init__(self, reader: Any, geom: StripGeometry, ahead: int, device: Any = None) -> None:
        self.reader = reader
        self.device = device if device is not None and getattr(device, "type", "cpu") == "cuda" else None
        self.on_device: dict[tuple[int, int], Any] = {}
        self.lock = threading.Lock()
        self.geom = geom
        self.order = [(k, j) for k in range(geom.n_strips) for j in range(len(geom.chunks))
                      if geom.strip_rows(k)[1] > geom.strip_rows(k)[0]]
        self.pos = {key: n for n, key in enumerate(self.order)}
        self.next = 0  # position of the next strip to submit
        self.need = 0  # position of the last strip the current tile row needs
        self.futures: dict[tuple[int, int], cf.Future] = {}
        self.ahead = max(0, ahead)

    def _fill(self) -> None:
        """Submit strips up to ``need + ahead`` in read order, as far as the reader's capacity allows."""
        cap = self.reader.capacity
        while self.next < len(self.order) and self.next <= self.need + self.ahead and len(self.futures) < cap:
            key = self.order[self.next]
            self.futures[key] = self.reader.submit(*key)
            self.next += 1

    def get(self, i: int, j: int) -> dict[int, Any]:
        """Strips of chunk ``j`` that tile row ``i`` needs, ``k -> [C, T, h, w]`` (waits for them).

        With a CUDA device every strip is copied there once (tile rows share strips) and the
        values are tensors on the device; else numpy arrays.
        """
        ks = self.geom.strips_of_row(i)
        try:
            with self.lock:
                self.need = max(self.need, max(self.pos[(k, j)] for k in ks))
                self._fill()
                if any((k, j) not in self.futures for k in ks):
                    raise RuntimeError(f"strip reader capacity {self.reader.capacity} too small for tile row {i}")
                futs = {k: self.futures[(k, j)] for k in ks}
            out = {k: fut.result() for k, fut in futs.items()}
        except cf.process.BrokenProcessPool:
            if isinstance(self.reader, ThreadStripReader):
                raise
            self._fall_back_to_threads()
            return self.get(i, j)
        if self.device is None:
            return out

        for k in ks:
            with self.lock:
                t = self.on_device.get((k, j))
            if t is None:
                t = self.reader.device_copy(k, j, out[k], self.device)  # does not wait for queued GPU work
                with self.lock:
                    self.on_device[(k, j)] = t
            out[k] = t
        return out

    def _fall_back_to_threads(self) -> None:
        """Reader processes died or could not start: read the outstanding strips with a thread.

        Spawned workers import the caller's main module; a script that calls ``downscale()``
        without an ``if __name__ == "__main__":`` guard cannot start them.
        """
        import warnings

        warnings.warn(
            "aux reader processes could not run (a script calling downscale() needs an "
            "'if __name__ == \"__main__\":' guard); reading with one thread instead", CarbonSRWarning, stacklevel=3,
        )
        old = self.reader
        with self.lock:
            self.reader = ThreadStripReader(old.stack, self.geom, 1)
            self.reader.cleanup_dir, old.cleanup_dir = old.cleanup_dir, None  # pre-warped files stay in use
            old.stack = old.stack.copy()  # the old reader closes its own copy
            keys = list(self.futures)
            self.futures = {key: self.reader.submit(*key) for key in keys}
        with contextlib.suppress(Exception):
            old.close()

    def done(self, i: int, j: int) -> None:
        """Tile row ``i`` chunk ``j`` is computed: release the strips later rows do not need."""
        keep_from = self.geom.release_before(i + 1)
        with self.lock:
            for key in [key for key in self.futures if key[1] == j and key[0] < keep_from]:
                self.futures.pop(key)
                self.on_device.pop(key, None)
                self.reader.release(*key)
            self._fill()

    def close(self) -> None:
        """Cancel pending reads and close the reader (its processes, slots and datasets)."""
        with self.lock:
            for fut in self.futures.values():
                fut.cancel()
            self.futures.clear()
            self.on_device.clear()
        self.reader.close()
