"""Process start-up and shutdown of a command (issue 20): slow imports started early in a
background thread, and whether the process may skip the interpreter's shutdown.

``import torch`` takes 1.5-3 s, and a command that needs it usually has other work to do first
(open and scan the main raster, discover the aux layers, check their coverage: much of it in
GDAL, which releases the GIL). :func:`preload_torch` starts the import in a daemon thread; the
first ``import torch`` of the main thread then waits only for what is left of it (Python's
import lock makes the two one import). Nothing else changes: when the background import fails,
the main thread's own import raises as it would have.
"""

from __future__ import annotations

import sys
import threading

__all__ = ["allow_fast_exit", "fast_exit_allowed", "preload_torch"]

_started: threading.Thread | None = None
_fast_exit = False


def allow_fast_exit() -> None:
    """Mark the command as done with every file it wrote closed: ``cli.main`` may then end the
    process with ``os._exit`` after the exit handlers instead of the interpreter's shutdown."""
    global _fast_exit
    _fast_exit = True


def fast_exit_allowed() -> bool:
    """Whether :func:`allow_fast_exit` was called in this process."""
    return _fast_exit


def _import_torch() -> None:
    try:
        import torch  # noqa: F401
    except BaseException:  # noqa: BLE001 - the main thread's own import reports it
        pass


def preload_torch() -> None:
    """Import torch in a background thread, once per process (a no-op when it is imported)."""
    global _started
    if _started is not None or "torch" in sys.modules:
        return
    _started = threading.Thread(target=_import_torch, name="carbonsr-import-torch", daemon=True)
    _started.start()
