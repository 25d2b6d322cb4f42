"""Training throughput: patches/s and the share of time spent preparing batches.

Generates its own sample region (``generate_sample_data(..., size_km=N)``) unless
``--data`` points at one, builds the training data exactly as ``carbonsr train`` does
(aux aligned and cached once, spatial split, deterministic sampler), then times:

1. *synchronous*: batch preparation and the optimisation step timed separately
   (``torch.cuda.synchronize`` around the step on CUDA), giving the data-loading share;
2. *prefetched*: the same steps with batches prepared ahead in worker threads, as in
   training (end-to-end patches/s).

Prints one table row per configuration. Examples::

    python benchmarks/bench_train.py --device cpu --preset tiny --steps 5
    python benchmarks/bench_train.py --device cuda --preset base --years-window 3 --size-km 400 \\
        --batch-size 32 --precision bf16 fp32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _gpu_util() -> str:
    try:
        import torch

        return f"{torch.cuda.utilization()}%"
    except Exception:  # noqa: BLE001 - pynvml missing or no GPU
        return "n/a"


def main() -> None:  # noqa: D103
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="existing sample directory (default: generate one)")
    ap.add_argument("--size-km", type=int, default=96)
    ap.add_argument("--years", type=int, default=3, help="years of generated data")
    ap.add_argument("--preset", nargs="+", default=["tiny"])
    ap.add_argument("--years-window", type=int, nargs="+", default=[1])
    ap.add_argument("--precision", nargs="+", default=["auto"], help="auto, bf16, fp32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scales", default="12:0.5,4:0.25,2:0.25")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()

    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    from carbonsr_cli.aux import AuxStack, discover_aux
    from carbonsr_cli.stats import AuxNormalizer, compute_stats
    from carbonsr_cli.train.dataset import AuxCache, PatchSampler, Prefetcher, build_batch, load_main, parse_scales
    from carbonsr_cli.train.loop import _autocast_factory, resolve_device, training_step
    from carbonsr_cli.train.split import make_block_split
    from models.config import preset as model_preset
    from models.losses import DualLayerWeightedLoss
    from models.network import DSTCarbonFormer

    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    tmp = None
    data = args.data
    if data is None:
        from carbonsr_cli.sample_data import generate_sample_data

        tmp = tempfile.TemporaryDirectory(prefix="carbonsr_bench_")
        data = Path(tmp.name) / "sample"
        t0 = time.perf_counter()
        generate_sample_data(data, seed=0, size_km=args.size_km, years=tuple(range(2019, 2019 + args.years)))
        console.print(f"generated {args.size_km} km sample in {time.perf_counter() - t0:.1f} s")
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    main = load_main([data / "emissions_1km.tif"])
    child = main.grid.child(10)
    stack = AuxStack(discover_aux([data / "aux"]), child, main.years)
    stats = compute_stats(data / "emissions_1km.tif", stack)
    norm = AuxNormalizer.from_stats(stats, stack.names)
    t1 = time.perf_counter()
    cache = AuxCache.build(stack, norm.apply, child.shape, len(main.years), cache_dir=Path(tmp.name if tmp else ".") / "cache")
    t2 = time.perf_counter()
    stack.close()
    console.print(
        f"setup: stats {t1 - t0:.1f} s, aux cache {t2 - t1:.1f} s ({cache.array.nbytes / 2**20:.0f} MiB, "
        f"{cache.channels} layers x {len(main.years)} years x {child.height}x{child.width})"
    )
    split = make_block_split(main.grid.height, main.grid.width, valid=main.valid_all_years)
    positions = split.train_positions(main.valid_all_years)
    scales = parse_scales(args.scales)
    st = stats["main"]

    table = Table(title=f"training throughput on {device} ({torch.get_num_threads()} CPU threads)")
    for col in ("preset", "params", "T", "precision", "batch", "prep ms/batch", "step ms", "data share",
                "patches/s (sync)", "patches/s (prefetch)", "peak GPU MiB", "GPU util"):
        table.add_column(col, justify="right")
    for preset_name in args.preset:
        for t in args.years_window:
            if t > len(main.years):
                continue
            for precision in args.precision:
                torch.manual_seed(0)
                mcfg = model_preset(preset_name, aux_channels=cache.channels, max_years=max(t, 1))
                model = DSTCarbonFormer(mcfg).to(device)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
                loss_fn = DualLayerWeightedLoss(st["log_nz_over_nnz"], st["cv_log"])
                autocast = _autocast_factory(device, precision)
                sampler = PatchSampler(positions, len(main.years), t, scales, args.batch_size, seed=0)

                def make(e: int, s: int) -> object:
                    return build_batch(sampler.spec(e, s), main, cache, factor=10, patch=12, years_window=t)

                def sync() -> None:
                    if device.type == "cuda":
                        torch.cuda.synchronize()

                kw = dict(device=device, autocast=autocast, factor=10, moe_weight=0.01, grad_clip=1.0)
                for s in range(args.warmup):
                    training_step(model, make(0, s), loss_fn, opt, sched, **kw)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                prep, step_t = [], []
                for s in range(args.steps):
                    a = time.perf_counter()
                    b = make(1, s)
                    c = time.perf_counter()
                    sync()
                    training_step(model, b, loss_fn, opt, sched, **kw)
                    sync()
                    d = time.perf_counter()
                    prep.append(c - a)
                    step_t.append(d - c)
                a = time.perf_counter()
                util = "n/a"
                for k, b in enumerate(Prefetcher(make, ((2, s) for s in range(args.steps)), workers=args.workers)):
                    training_step(model, b, loss_fn, opt, sched, **kw)
                    if k == args.steps // 2 and device.type == "cuda":
                        util = _gpu_util()
                sync()
                pre_total = time.perf_counter() - a
                p_ms, s_ms = 1000 * float(np.mean(prep)), 1000 * float(np.mean(step_t))
                peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if device.type == "cuda" else "-"
                table.add_row(
                    preset_name, f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M", str(t), precision,
                    str(args.batch_size), f"{p_ms:.1f}", f"{s_ms:.1f}", f"{100 * p_ms / (p_ms + s_ms):.1f}%",
                    f"{args.batch_size / ((p_ms + s_ms) / 1000):.1f}", f"{args.batch_size * args.steps / pre_total:.1f}",
                    peak, util,
                )
    console.print(table)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
