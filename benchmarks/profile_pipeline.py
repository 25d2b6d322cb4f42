"""Profile a window of tile rows of a model downscaling run with ``torch.profiler``.

Runs ``carbonsr_cli.downscale.downscale()`` and records tile rows ``START .. STOP`` (counted in
``_predict_row`` calls): how long the window took on the host, how much of it the GPU spent
in kernels (busy share), and the top operators by GPU time. Example::

    python benchmarks/profile_pipeline.py region/emissions_1km.tif --aux region/aux \\
        --model base.pth --rows 40 60 --trace trace.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:  # noqa: D103
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("main")
    ap.add_argument("--aux", nargs="+", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rows", nargs=2, type=int, default=[40, 60], metavar=("START", "STOP"))
    ap.add_argument("--trace", type=Path, default=None, help="also write a Chrome trace of the window")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from carbonsr_cli.downscale import engine as dp
    from carbonsr_cli.downscale import downscale

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    state = {"calls": 0, "t0": 0.0, "wall": 0.0}
    start, stop = args.rows
    inner = dp._predict_row

    def predict_row(*a, **k):  # noqa: ANN002, ANN003, ANN202
        n = state["calls"]
        state["calls"] += 1
        if n == start:
            torch.cuda.synchronize()
            prof.start()
            state["t0"] = time.perf_counter()
        if n == stop:
            torch.cuda.synchronize()
            state["wall"] = time.perf_counter() - state["t0"]
            prof.stop()
        return inner(*a, **k)

    dp._predict_row = predict_row
    with tempfile.TemporaryDirectory() as tmp:
        s = downscale(args.main, args.aux, Path(tmp) / "out.tif", method="model", checkpoint=args.model,
                      device=args.device, progress=False, check=False)
    print(f"run {s.seconds:.2f} s, {s.tiles} tiles, rows profiled {start}..{stop} of {state['calls']}")
    if not state["wall"]:
        print("the window was not reached")
        return
    avgs = prof.key_averages()

    def dev_self(e) -> float:  # noqa: ANN001
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    busy = sum(dev_self(e) for e in avgs) / 1e6
    print(f"window: host {state['wall']:.3f} s, GPU kernels {busy:.3f} s, busy share {100 * busy / state['wall']:.0f}%")
    print(avgs.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
    print(avgs.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    main()
