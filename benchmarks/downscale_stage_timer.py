"""Run ``carbonsr downscale`` (the CLI, in this process) with stage timers; one JSON per rank.

For the multi-GPU measurement of issue 21: where the command's time goes on each rank
(import, planning, the rank's pipeline, waiting for the other ranks, rank 0's assembly of the
parts, the conservation re-read). Works with and without ``torchrun``::

    python benchmarks/downscale_stage_timer.py OUT_DIR downscale MAIN --aux AUX --model M -o OUT
    torchrun --nproc-per-node 2 benchmarks/downscale_stage_timer.py OUT_DIR downscale ...

Writes ``OUT_DIR/stages_rank<k>.json``: seconds since this script started for each stage's
start and end, and each stage's duration.
"""

from __future__ import annotations

import json
import os
import sys
import time

T0 = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    out_dir = sys.argv[1]
    argv = sys.argv[2:]
    events: dict[str, list[tuple[float, float]]] = {}

    def wrap(mod: object, name: str, label: str) -> None:
        fn = getattr(mod, name, None)
        if fn is None:
            return

        def wrapper(*a: object, **k: object) -> object:
            s = time.perf_counter() - T0
            try:
                return fn(*a, **k)
            finally:
                events.setdefault(label, []).append((s, time.perf_counter() - T0))

        setattr(mod, name, wrapper)

    import importlib

    import torch  # noqa: F401 - counted as import time

    from carbonsr_cli import cli

    def mod(name: str) -> object | None:
        try:
            return importlib.import_module(name)
        except ImportError:
            return None

    t_import = time.perf_counter() - T0
    # the package layout (carbonsr_cli/downscale/: api, engine, check, distributed) ...
    api, engine, dist = mod("carbonsr_cli.downscale.api"), mod("carbonsr_cli.downscale.engine"), mod("carbonsr_cli.downscale.distributed")
    for m in (api, dist):
        if m is not None:
            wrap(m, "run_pipeline", "pipeline")
            wrap(m, "check_written_conservation", "conservation_check")
    if api is not None:
        wrap(api, "_downscale", "downscale_call")
        wrap(api, "_run", "run_and_check")
    if dist is not None:
        wrap(dist, "_assemble", "assemble")
    if engine is not None:
        wrap(engine, "_open_strip_feed", "open_feed")
    # ... and the flat modules before it (downscale.py, downscale_pipeline.py, downscale_distributed.py)
    old, pipe, olddist = mod("carbonsr_cli.downscale"), mod("carbonsr_cli.downscale_pipeline"), mod("carbonsr_cli.downscale_distributed")
    if api is None and old is not None:
        wrap(old, "downscale", "downscale_call")
        wrap(old, "_run_and_check", "run_and_check")
        wrap(old, "run_pipeline", "pipeline")
        wrap(old, "check_written_conservation", "conservation_check")
    if pipe is not None:
        wrap(pipe, "run_pipeline", "pipeline")
        wrap(pipe, "_open_strip_feed", "open_feed")
    if olddist is not None:
        wrap(olddist, "_assemble", "assemble")
    downscale_pipeline = engine or pipe
    code = 0
    sys.argv = ["carbonsr", *argv]
    try:
        cli.main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    rank = os.environ.get("RANK", "0")
    res = {"rank": rank, "import_s": t_import, "exit": code, "end_s": time.perf_counter() - T0,
           "events": events, "durations": {k: sum(b - a for a, b in v) for k, v in events.items()},
           "loop": dict(getattr(downscale_pipeline, "LAST_RUN_SECONDS", {}) or {})}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"stages_rank{rank}.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    sys.exit(code)


if __name__ == "__main__":
    main()
