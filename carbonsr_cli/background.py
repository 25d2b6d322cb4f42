"""One function run in a daemon thread, its result or exception kept in a future.

The command's start-up overlaps work that needs none of the inputs (hashing the checkpoint,
loading the model, preparing the aux stack) with planning; the caller takes the outcome from
the future later, on its own thread, where an exception is raised again as if the work had
run there. Daemon threads: a command that fails meanwhile does not wait for them at exit.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["in_background"]


def in_background(fn: Callable[..., Any], *args: Any, name: str) -> tuple[cf.Future, threading.Thread]:
    """Start ``fn(*args)`` in a daemon thread called ``name``; returns ``(future, thread)``:
    the future gets ``fn``'s return value or the exception it raised."""
    future: cf.Future = cf.Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - raised again by future.result(), on the caller's thread
            future.set_exception(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return future, thread
