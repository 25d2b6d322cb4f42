"""Atomic output files: write to a temporary file next to the destination, rename on success.

Used by the raster writer, checkpoints and JSON outputs, so that an error, a full disk or
Ctrl-C never leaves a half-written file under the name the user asked for. The temporary
file lives in the destination directory (same file system, so the final ``os.replace`` is
atomic) and is named ``.<dest name>.<random>.tmp<dest suffix>`` (hidden, and keeping the
extension so that GDAL picks the right driver).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from carbonsr_cli.errors import OutputError

__all__ = ["check_output_path", "atomic_path", "atomic_write_bytes", "atomic_write_text", "remove_quietly"]

#: Side-car files GDAL may create next to a raster; removed together with a temp raster.
_SIDECARS = (".aux.xml", ".ovr", ".msk", ".ovr.tmp", ".msk.ovr.tmp")  # last two: GDAL COG driver


def _oserror_to_output(exc: OSError, path: Path) -> OutputError:
    """Map an OSError while writing ``path`` to a one-line ``OutputError``."""
    if exc.errno == errno.ENOSPC:
        return OutputError("disk full while writing; free some space or choose another directory", path)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError("directory is not writable (permission denied or read-only file system)", path)
    if exc.errno in (errno.ENOTDIR, errno.ENOENT):
        return OutputError("output directory does not exist or is not a directory", path)
    return OutputError(f"cannot write: {exc.strerror or exc}", path)


def check_output_path(dest: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Check that ``dest`` can be written, before any work starts.

    Args:
        dest: Output file path.
        overwrite: Allow replacing an existing file.

    Returns:
        ``dest`` as an absolute ``Path``.

    Raises:
        OutputError: dest exists (without ``overwrite``) or is a directory; its directory does
            not exist, is not a directory, or is not writable.
    """
    p = Path(dest).expanduser().absolute()
    if p.is_dir():
        raise OutputError("is a directory; give an output file name", p)
    if p.exists() and not overwrite:
        raise OutputError("already exists; use --overwrite to replace it", p)
    parent = p.parent
    if not parent.exists():
        # A regular file somewhere above the destination, or a missing directory.
        raise OutputError("output directory does not exist (create it first)", parent)
    if not parent.is_dir():
        raise OutputError("output directory is not a directory", parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError("output directory is not writable", parent)
    return p


def remove_quietly(path: str | os.PathLike[str]) -> None:
    """Remove a file and its GDAL side-cars if they exist; never raises."""
    p = Path(path)
    for candidate in (p, *(Path(str(p) + s) for s in _SIDECARS)):
        with contextlib.suppress(OSError):
            candidate.unlink()


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_temp_path(dest: Path, tag: str = "tmp") -> Path:
    """Reserve (create empty) a hidden temp file in ``dest``'s directory and return its path.

    Raises:
        OutputError: the directory is not writable, missing, or the disk is full.
    """
    try:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=f".{tag}{dest.suffix}")
    except OSError as exc:
        raise _oserror_to_output(exc, dest.parent) from None
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], overwrite: bool = False, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; rename it to ``dest`` if the block succeeds.

    The temp file exists (empty) when yielded; writers may replace or overwrite it. On any
    exception, ``KeyboardInterrupt`` included, the temp file (and GDAL side-cars) is removed
    and the exception re-raised; an ``OSError`` with ``ENOSPC``/``EACCES`` becomes an
    ``OutputError`` naming ``dest``.

    Args:
        dest: Final path.
        overwrite: Allow replacing an existing ``dest`` (checked before and at rename).
        fsync: Flush the file (and the directory entry) to disk before/after renaming.

    Raises:
        OutputError: see :func:`check_output_path`; disk full; rename failed.
    """
    final = check_output_path(dest, overwrite)
    tmp = make_temp_path(final)
    try:
        try:
            yield tmp
        except OSError as exc:
            if exc.errno == errno.ENOSPC:  # disk full while the body wrote the temp file
                raise _oserror_to_output(exc, final) from exc
            raise  # other OSErrors (e.g. an unreadable input) keep their own path
        if not tmp.exists():
            raise OutputError("temporary output vanished before it could be renamed", tmp)
        if final.exists() and not overwrite:
            raise OutputError("already exists (created while we were writing); use --overwrite", final)
        if fsync:
            _fsync_file(tmp)
        try:
            os.replace(tmp, final)
        except OSError as exc:
            raise _oserror_to_output(exc, final) from exc
        if fsync:
            _fsync_dir(final.parent)
    except BaseException:
        remove_quietly(tmp)
        raise
    finally:
        # Side-cars of the temp file (e.g. .aux.xml written by GDAL) never survive.
        for s in _SIDECARS:
            with contextlib.suppress(OSError):
                Path(str(tmp) + s).unlink()


def atomic_write_bytes(dest: str | os.PathLike[str], data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``dest`` atomically (temp file + fsync + rename).

    Args:
        dest: Final path.
        data: File content.
        overwrite: Allow replacing an existing file (default True: checkpoints and JSON
            side files are refreshed in place).

    Returns:
        The absolute destination path.
    """
    with atomic_path(dest, overwrite) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(dest).expanduser().absolute()


def atomic_write_text(dest: str | os.PathLike[str], text: str, *, overwrite: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``dest`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(dest, text.encode("utf-8"), overwrite=overwrite)
