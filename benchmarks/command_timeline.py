"""Timeline of one ``carbonsr downscale`` command: when each stage ran, on which thread.

Runs the CLI in this process with the pipeline's functions wrapped (planning, the model's
background load, aux preparation and pre-warp, reader start, warm-up, each tile row's
prediction, water-fill and write, the conservation re-read) and prints, per function, the
first start, last end, number of calls and summed seconds since this script started; the
raw events go to a JSON file. Functions a tree does not have are skipped, so the same script
times trees before and after a change (run it from the tree to time)::

    python benchmarks/command_timeline.py OUT.json downscale MAIN --aux AUX --model M -o OUT.tif --device cuda

Issue 20 used it to find what the 1,000 km model command waits for (benchmarks/README.md,
"Session 12"). Reader processes are timed too (since session 16): a ``sitecustomize`` in a
temporary folder put first on ``PYTHONPATH`` wraps the reader workers' functions (start-up,
imports, loading the stack, each strip read) in every spawned process; their events carry the
thread name ``pid<N>`` and the same clock (``time.perf_counter`` is system-wide on Linux).
"""

from __future__ import annotations

import atexit
import functools
import importlib
import json
import os
import sys
import threading
import time
from typing import Any

T0 = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: ``(module, attribute path)`` of the functions timed.
POINTS = (
    ("carbonsr_cli.preload", "_import_torch"),
    ("carbonsr_cli.downscale.api", "build_plan"),
    ("carbonsr_cli.downscale.api", "run_pipeline"),
    ("carbonsr_cli.downscale.api", "check_written_conservation"),
    ("carbonsr_cli.downscale.planning", "resolve_device"),
    ("carbonsr_cli.downscale.planning", "load_model_for_inference"),
    ("carbonsr_cli.downscale.planning", "discover_aux"),
    ("carbonsr_cli.downscale.planning", "_checked_stack"),
    ("carbonsr_cli.downscale.planning", "_scan_main"),
    ("carbonsr_cli.downscale.planning", "PlannedRun.wait_for_model"),
    ("carbonsr_cli.downscale.model_job", "ModelJob._load"),
    ("carbonsr_cli.downscale.aux_prep", "prepare_aux"),
    ("carbonsr_cli.downscale.engine", "_open_strip_feed"),
    ("carbonsr_cli.downscale.readers", "materialize_warps"),
    ("carbonsr_cli.downscale.readers", "ProcessStripReader.close"),
    ("carbonsr_cli.downscale.readers", "ProcessStripReader.set_stack"),
    ("carbonsr_cli.downscale.readers", "start_reader_pool"),
    ("carbonsr_cli.downscale.strips", "assemble"),
    ("carbonsr_cli.downscale.predict", "_Predictor.warm_up"),
    ("carbonsr_cli.downscale.engine", "_BandReader.read"),
    ("carbonsr_cli.downscale.engine", "_predict_row"),
    ("carbonsr_cli.downscale.engine", "_water_fill"),
    ("carbonsr_cli.downscale.engine", "write_band"),
    ("carbonsr_cli.writer", "RasterWriter.__exit__"),
)

#: Reader-process functions timed in each spawned worker (see :data:`_SITECUSTOMIZE`).
WORKER_POINTS = ("_worker_init", "_worker_warm", "_worker_stack", "_worker_read")

_SITECUSTOMIZE = """
import functools, json, os, sys, time
_dir = os.environ.get("CARBONSR_TIMELINE_WORKERS")
if _dir:
    sys.path.insert(0, os.environ["CARBONSR_TIMELINE_ROOT"])
    _t0 = float(os.environ["CARBONSR_TIMELINE_T0"])
    _path = os.path.join(_dir, "w%d.jsonl" % os.getpid())
    from carbonsr_cli.downscale import readers as _r

    def _wrap(name):
        fn = getattr(_r, name, None)
        if fn is None:
            return

        @functools.wraps(fn)
        def timed(*a, **k):
            s = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                e = time.perf_counter()
                with open(_path, "a") as fh:
                    fh.write(json.dumps(["readers." + name, "pid%d" % os.getpid(), s - _t0, e - _t0]) + "\\n")
        setattr(_r, name, timed)

    for _n in WORKER_POINTS:
        _wrap(_n)
""".replace("WORKER_POINTS", repr(WORKER_POINTS))

_EVENTS: list[tuple[str, str, float, float]] = []
_LOCK = threading.Lock()


def _wrap(modname: str, attr: str) -> None:
    try:
        obj: Any = importlib.import_module(modname)
    except ImportError:
        return
    *owners, name = attr.split(".")
    for part in owners:
        obj = getattr(obj, part, None)
    fn = getattr(obj, name, None) if obj is not None else None
    if fn is None:
        return
    label = f"{modname.rsplit('.', 1)[-1]}.{attr}"

    @functools.wraps(fn)
    def timed(*a: Any, **k: Any) -> Any:
        s = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            e = time.perf_counter()
            with _LOCK:
                _EVENTS.append((label, threading.current_thread().name, s - T0, e - T0))

    setattr(obj, name, timed)


def summary(events: list[tuple[str, str, float, float]]) -> list[tuple[str, float, float, int, float]]:
    """``(label, first start, last end, calls, summed seconds)`` per label, by first start."""
    agg: dict[str, list[float]] = {}
    for label, _thread, s, e in events:
        a = agg.setdefault(label, [s, e, 0, 0.0])
        a[0], a[1], a[2], a[3] = min(a[0], s), max(a[1], e), a[2] + 1, a[3] + e - s
    return sorted(((k, v[0], v[1], int(v[2]), v[3]) for k, v in agg.items()), key=lambda r: r[1])


def _trace_workers() -> str:
    """A folder with the workers' ``sitecustomize`` first on ``PYTHONPATH`` (inherited by spawned
    processes); returns where the workers write their events."""
    import tempfile

    site = tempfile.mkdtemp(prefix="carbonsr-timeline-site-")
    with open(os.path.join(site, "sitecustomize.py"), "w", encoding="utf-8") as fh:
        fh.write(_SITECUSTOMIZE)
    events = tempfile.mkdtemp(prefix="carbonsr-timeline-workers-")
    os.environ["PYTHONPATH"] = os.pathsep.join([site, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ.update(CARBONSR_TIMELINE_WORKERS=events, CARBONSR_TIMELINE_ROOT=ROOT, CARBONSR_TIMELINE_T0=repr(T0))
    return events


def _worker_events(folder: str) -> list[tuple[str, str, float, float]]:
    out: list[tuple[str, str, float, float]] = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), encoding="utf-8") as fh:
            out.extend(tuple(json.loads(line)) for line in fh if line.strip())  # type: ignore[misc]
    return out


def main() -> None:
    out = sys.argv[1]
    sys.path.insert(0, ROOT)
    workers = _trace_workers()
    from carbonsr_cli import cli

    for modname, attr in POINTS:
        _wrap(modname, attr)

    def dump() -> None:  # also runs under the CLI's fast exit (atexit handlers run first)
        end = time.perf_counter() - T0
        events = list(_EVENTS) + _worker_events(workers)
        rows = summary(events)
        with open(out, "w", encoding="utf-8") as fh:
            json.dump({"end": end, "events": events, "summary": rows}, fh)
        print(f"{'stage':<44}{'first s':>9}{'last s':>9}{'calls':>7}{'sum s':>8}", file=sys.stderr)
        for label, s, e, n, tot in rows:
            print(f"{label:<44}{s:>9.2f}{e:>9.2f}{n:>7d}{tot:>8.2f}", file=sys.stderr)
        print(f"{'(exit handlers)':<44}{end:>9.2f}", file=sys.stderr)

    atexit.register(dump)
    sys.argv = ["carbonsr", *sys.argv[2:]]
    cli.main()


if __name__ == "__main__":  # spawned reader processes import this file too: nothing runs there
    main()
