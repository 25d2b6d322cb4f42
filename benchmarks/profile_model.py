"""Inference variants of a model preset (memory format, precision, batch, torch.compile) + profile.

Times the forward pass on ``[B, C_aux, T, 120, 120]`` random inputs (the downscaling tile) for
each variant and prints patches/s, then the top CUDA kernels of the default variant
(``torch.profiler``). Example::

    python benchmarks/profile_model.py --device cuda --preset base --aux 14 --compile
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:  # noqa: D103
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--aux", type=int, default=14, help="aux channels")
    ap.add_argument("--T", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (and its compile time)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    import contextlib

    import torch

    from models.config import preset
    from models.network import DSTCarbonFormer

    dev = torch.device(args.device)
    torch.manual_seed(0)
    net = DSTCarbonFormer(preset(args.preset, args.aux, max_years=max(args.T, 1))).to(dev).eval()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timeit(fn, b: int, prec: str) -> float:
        a = torch.randn(b, args.aux, args.T, 120, 120, device=dev)
        m = torch.rand(b, 1, args.T, 120, 120, device=dev)
        ctx = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if prec == "bf16" else contextlib.nullcontext
        with torch.inference_mode(), ctx():
            for _ in range(2):
                fn(a, m)
            sync()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                fn(a, m)
            sync()
        return b * args.iters / (time.perf_counter() - t0)

    print(f"{'variant':<28} {'batch':>6} {'patches/s':>10}")
    for cl in (True, False):
        net.channels_last = cl
        for prec in ("fp32", "bf16"):
            for b in args.batches:
                pps = timeit(lambda a, m: net(a, m), b, prec)
                print(f"{('channels_last_3d' if cl else 'contiguous') + ' ' + prec:<28} {b:>6} {pps:>10.0f}", flush=True)
    net.channels_last = True
    if dev.type == "cuda":
        # What the downscaling pipeline runs: a bf16 copy of the model, full batches replayed
        # from a CUDA graph (models/inference.py); checked against eager float32.
        from models.inference import GraphedForward, low_precision_copy

        low = low_precision_copy(net)
        b = args.batches[0]
        a = torch.randn(b, args.aux, args.T, 120, 120, device=dev)
        m = torch.rand(b, 1, args.T, 120, 120, device=dev)
        with torch.inference_mode():
            ref = net(a, m)[0]
        def contiguous(a_: torch.Tensor, m_: torch.Tensor) -> torch.Tensor:
            low.channels_last = False
            try:
                return low(a_, m_)[0].float()
            finally:
                low.channels_last = True

        variants = {
            "bf16 weights eager": lambda a_, m_: low(a_, m_)[0].float(),
            "bf16 weights contiguous": contiguous,
            "bf16 weights graph": GraphedForward(lambda a_, m_: low(a_, m_)[0].float()),
            "fp32 graph": GraphedForward(lambda a_, m_: net(a_, m_)[0].float()),
        }
        for name, fn in variants.items():
            pps = timeit(fn, b, "fp32")
            with torch.inference_mode():
                diff = float((fn(a, m) - ref).abs().max())
            err = getattr(fn, "error", None)
            print(f"{name:<28} {b:>6} {pps:>10.0f}  max |diff| vs fp32 eager {diff:.2e}"
                  + (f"  CAPTURE FAILED: {err}" if err else ""), flush=True)
    if args.compile:
        t0 = time.perf_counter()
        cnet = torch.compile(net)
        for prec in ("bf16", "fp32"):
            t0 = time.perf_counter()
            pps = timeit(lambda a, m: cnet(a, m), args.batches[0], prec)
            print(f"{'compiled ' + prec:<28} {args.batches[0]:>6} {pps:>10.0f}  (first call incl. compile "
                  f"{time.perf_counter() - t0:.1f} s)", flush=True)
    if args.profile and dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        b = args.batches[0]
        a = torch.randn(b, args.aux, args.T, 120, 120, device=dev)
        m = torch.rand(b, 1, args.T, 120, 120, device=dev)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            net(a, m)
            sync()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    net(a, m)
                sync()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
