"""Per-input results kept between runs, keyed by file identity (issue 20).

Three things are computed from the aux files on every run although they depend only on the
file: the coverage sample (the whole raster warped to a decimated grid over the main extent,
``aux/coverage.py``: it decompresses the file), the class scan of a categorical raster and the
layers of a vector file (its classes by length, CRS and bounds: ``aux/discovery.py``; with
them, a run that does not read the vector, e.g. dasymetric on a raster layer, neither imports
geopandas nor reads the file). They are stored in a cache directory and reused while the file
is the same.

**Identity.** An entry is keyed by the file's resolved path, device, inode, size, and
modification and change times in nanoseconds (``st_ctime`` cannot be set back by any tool:
every write, rename or ``touch`` moves it), by the same identity of the GDAL side-car files
that can change what GDAL reads (``.aux.xml``, ``.ovr``, ``.msk``, world files, ``.prj``), by
the GDAL version and by every parameter of the computation. A file changed less than
:data:`RACY_SECONDS` ago is never cached (a second write within the same file-system timestamp
tick could otherwise keep the identity), and an entry is stored only when the identity is the
same after the computation as before it. A changed input is therefore a miss, never a wrong
answer; an unreadable or malformed entry is a miss too.

**Where.** ``$CARBONSR_CACHE_DIR``, else ``$XDG_CACHE_HOME/carbonsr``, else
``~/.cache/carbonsr``; ``CARBONSR_CACHE=0`` turns the cache off. Entries are small (a coverage
sample is at most 512 x 512 float64 per band); the oldest beyond :data:`MAX_ENTRIES` are removed.
A directory that cannot be written just means no cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["cache_dir", "file_identity", "load_array", "load_json", "store_array", "store_json"]

#: Format of the entries; bump it when a cached computation changes.
VERSION = 1
#: Files changed more recently than this (seconds) are not cached.
RACY_SECONDS = 2.0
#: Entries kept per kind (the least recently written beyond it are removed).
MAX_ENTRIES = 512

_SIDECARS_APPENDED = (".aux.xml", ".ovr", ".msk", ".aux")
_SIDECARS_REPLACED = (".tfw", ".tifw", ".wld", ".prj", ".aux", ".ovr")


def cache_dir() -> Path | None:
    """The cache directory, or None when the cache is off (``CARBONSR_CACHE=0``)."""
    if os.environ.get("CARBONSR_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    d = os.environ.get("CARBONSR_CACHE_DIR")
    if not d:
        d = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "carbonsr")
    return Path(d)


def _stat_key(p: Path) -> tuple[Any, ...] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_identity(path: str | os.PathLike[str]) -> tuple[Any, ...] | None:
    """Identity of a file and its GDAL side-cars; None when it must not be cached (missing, not
    a regular file, or changed less than :data:`RACY_SECONDS` ago)."""
    try:
        p = Path(path).resolve()
        st = os.stat(p)
    except (OSError, RuntimeError):
        return None
    if not os.path.isfile(p):
        return None
    if time.time() - max(st.st_mtime, st.st_ctime) < RACY_SECONDS:
        return None
    sidecars = [Path(str(p) + s) for s in _SIDECARS_APPENDED] + [p.with_suffix(s) for s in _SIDECARS_REPLACED]
    side = []
    for s in sidecars:
        k = _stat_key(s)
        if k is not None:
            sst = os.stat(s)
            if time.time() - max(sst.st_mtime, sst.st_ctime) < RACY_SECONDS:
                return None
        side.append((s.name, k))
    return (str(p), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns), tuple(side))


def _gdal_version() -> str:
    try:
        import rasterio

        return str(rasterio.__gdal_version__)
    except Exception:  # noqa: BLE001
        return "?"


def _entry(kind: str, identity: tuple[Any, ...], params: Sequence[Any], suffix: str = ".npy") -> Path | None:
    d = cache_dir()
    if d is None:
        return None
    key = repr((VERSION, kind, identity, tuple(params), _gdal_version())).encode()
    return d / kind / (hashlib.sha256(key).hexdigest() + suffix)


def load_array(kind: str, identity: tuple[Any, ...] | None, params: Sequence[Any]) -> np.ndarray | None:
    """The cached array of ``kind`` for a file of this identity and these parameters, or None."""
    if identity is None:
        return None
    entry = _entry(kind, identity, params)
    if entry is None:
        return None
    try:
        with open(entry, "rb") as fh:
            return np.load(fh, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None


def store_array(kind: str, path: str | os.PathLike[str], identity: tuple[Any, ...] | None,
                params: Sequence[Any], array: np.ndarray) -> None:
    """Keep ``array`` for the file at ``path`` if it still has ``identity`` (taken before the
    computation); any failure to write is ignored."""
    if identity is None or file_identity(path) != identity:
        return
    entry = _entry(kind, identity, params)
    if entry is None:
        return
    try:
        from carbonsr_cli.atomic import atomic_write_bytes

        entry.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        atomic_write_bytes(entry, buf.getvalue())
        _evict(entry.parent)
    except Exception:  # noqa: BLE001 - a cache must never fail a run
        return


def load_json(kind: str, identity: tuple[Any, ...] | None, params: Sequence[Any]) -> Any:
    """The cached JSON value of ``kind`` for a file of this identity and these parameters, or None."""
    if identity is None:
        return None
    entry = _entry(kind, identity, params, ".json")
    if entry is None:
        return None
    try:
        return json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def store_json(kind: str, path: str | os.PathLike[str], identity: tuple[Any, ...] | None,
               params: Sequence[Any], value: Any) -> None:
    """Keep a JSON-serialisable ``value`` like :func:`store_array`."""
    if identity is None or file_identity(path) != identity:
        return
    entry = _entry(kind, identity, params, ".json")
    if entry is None:
        return
    try:
        from carbonsr_cli.atomic import atomic_write_text

        entry.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(entry, json.dumps(value))
        _evict(entry.parent)
    except Exception:  # noqa: BLE001 - a cache must never fail a run
        return


def _evict(directory: Path) -> None:
    entries = [e for e in directory.iterdir() if e.suffix in (".npy", ".json") and not e.name.startswith(".")]
    if len(entries) <= MAX_ENTRIES:
        return
    entries.sort(key=lambda e: e.stat().st_mtime)
    for e in entries[: len(entries) - MAX_ENTRIES]:
        try:
            e.unlink()
        except OSError:
            pass
