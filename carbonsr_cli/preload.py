"""Start slow imports early, in a background thread (issue 20).

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

__all__ = ["preload_torch"]

_started: threading.Thread | None = None


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
