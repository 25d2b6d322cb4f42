"""Atomic output files: write to a temporary file next to the destination, rename on success.

Used by the raster writer, checkpoints and JSON outputs, so that an error, a full disk or
Ctrl-C never leaves a half-written file under the name the user asked for. The temporary
file lives in the destination directory (same file system, so the final ``os.replace`` is
atomic) and is named ``.<dest name>.<host>-<pid>-<random>.tmp<dest suffix>`` (hidden, and
keeping the extension so that GDAL picks the right driver). It gets the mode a plain
``open()`` would give (``0666 & ~umask``), or the mode of the file it replaces.

A run killed with SIGKILL cannot remove its temporary files; the next run writing the same
output removes those whose process (on this host) is gone (:func:`remove_stale`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from carbonsr_cli.errors import OutputError

__all__ = [
    "check_output_path",
    "check_not_an_input",
    "same_file",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "remove_quietly",
    "current_umask",
    "owner_tag",
    "remove_stale",
]

#: This host, reduced to letters and digits (temporary names carry it with the process id).
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"


def owner_tag() -> str:
    """``<host>-<pid>``: marks temporary files and folders so that a later run can tell
    whether the process that made them is still alive."""
    return f"{_HOST}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale(directory: str | os.PathLike[str], prefix: str) -> list[Path]:
    """Remove ``directory/<prefix><host>-<pid>-...`` entries left by dead processes of this host.

    Entries of live processes, of other hosts (a shared network folder) and names that do not
    follow the pattern are kept. Never raises.

    Returns:
        The paths removed.
    """
    removed: list[Path] = []
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if not name.startswith(prefix):
                continue
            m = re.match(r"([A-Za-z0-9]+)-(\d+)[-.]", name[len(prefix):])
            if not m or m.group(1) != _HOST or _pid_alive(int(m.group(2))):
                continue
            q = Path(directory) / name
            if q.is_dir() and not q.is_symlink():
                shutil.rmtree(q, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    q.unlink()
            if not os.path.lexists(q):
                removed.append(q)
    return removed

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


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True if ``a`` and ``b`` name the same file: same path after resolving links, or
    hard links to one inode (``os.path.samefile``). Missing files compare by resolved path."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    try:
        return os.path.samefile(pa, pb)
    except OSError:
        return pa.resolve() == pb.resolve()


def check_not_an_input(
    dest: str | os.PathLike[str] | None, inputs: dict[str, list[str | os.PathLike[str]] | str | os.PathLike[str] | None]
) -> None:
    """Refuse an output that is (a path or a hard link to) one of the command's inputs.

    Call it before any work starts, for every file a command writes.

    Args:
        dest: The output path (``None`` or ``"-"`` for stdout: nothing to check).
        inputs: Role (``"main raster"``, ``"aux layer"``, ...) -> path or paths (``None`` skipped).
            Directories and globs among aux paths are expanded first by the caller.

    Raises:
        OutputError: ``dest`` names an input (exit code 1); nothing has been written.
    """
    if dest is None or str(dest) == "-":
        return
    for role, paths in inputs.items():
        if paths is None:
            continue
        items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        for src in items:
            if src is None or str(src) == "-":
                continue
            if same_file(dest, src):
                raise OutputError(f"output is the {role} ({src}); choose another output file", Path(dest))


def current_umask() -> int:
    """The process umask (read from /proc on Linux, else by setting and restoring it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    remove_stale(dest.parent, f".{dest.name}.")  # left by a killed run writing the same output
    try:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.{owner_tag()}-", suffix=f".{tag}{dest.suffix}")
    except OSError as exc:
        raise _oserror_to_output(exc, dest.parent) from None
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 & ~umask),
        # or keep the mode of the file it replaces, as cp or GDAL would.
        mode = 0o666 & ~current_umask()
        with contextlib.suppress(OSError):
            if dest.exists():
                mode = dest.stat().st_mode & 0o7777
        os.fchmod(fd, mode)
    finally:
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
