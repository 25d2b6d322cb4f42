"""Training throughput: patches/s and the share of time spent preparing batches.

Generates its own sample region (``generate_sample_data(..., size_km=N)``) unless
``--data`` points at one, builds the training data exactly as ``carbonsr train`` does
(aux aligned and cached once, spatial split, deterministic sampler), then times:

1. *synchronous*: batch preparation and the optimisation step timed separately
   (``torch.cuda.synchronize`` around the step on CUDA), giving the data-loading share;
2. *prefetched*: the same steps with batches prepared ahead in worker threads, as in
   training (end-to-end patches/s): on CUDA, as ``carbonsr train`` does since issue 20,
   float16 aux in page-locked memory and no host sync inside the timed steps
   (``legacy=True``: float32 batches in pageable memory and ``float(loss)`` after every step,
   the loop before issue 20); ``compile=True``: the U-Net compiled as with ``compile="on"``.

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
from typing import Any


def _gpu_util() -> str:
    try:
        import torch

        return f"{torch.cuda.utilization()}%"
    except Exception:  # noqa: BLE001 - pynvml missing or no GPU
        return "n/a"


def measure(
    data: Path,
    *,
    device_name: str = "auto",
    presets: list[str] | None = None,
    windows: list[int] | None = None,
    precisions: list[str] | None = None,
    batch_size: int = 8,
    steps: int = 10,
    warmup: int = 2,
    workers: int = 2,
    scales_spec: str = "12:0.5,4:0.25,2:0.25",
    cache_dir: Path | None = None,
    log: Any = print,
    compile: bool = False,
    legacy: bool = False,
) -> list[dict[str, Any]]:
    """Time training steps on the sample region ``data``; one dict per configuration.

    Keys: ``preset, params, T, precision, batch, prep_ms, step_ms, data_share`` (synchronous:
    preparation / (preparation + step)), ``pps_sync``, ``pps_prefetch`` (patches/s with batches
    prepared by ``workers`` threads, as in training), ``wait_share`` (share of the prefetched
    run's wall time the training loop spent waiting for a batch), ``gpu_peak_mib``, ``gpu_util``,
    ``compile`` and ``warmup_s`` (seconds of the warm-up steps, the compile included).
    """
    import numpy as np
    import torch

    from carbonsr_cli.aux import AuxStack, discover_aux
    from carbonsr_cli.stats import AuxNormalizer, compute_stats
    from carbonsr_cli.train.dataset import AuxCache, PatchSampler, Prefetcher, build_batch, load_main, parse_scales
    from carbonsr_cli.train.loop import _autocast_factory, resolve_device, training_step
    from carbonsr_cli.train.step import CompiledUNet
    from carbonsr_cli.train.split import make_block_split
    from models.config import preset as model_preset
    from models.losses import DualLayerWeightedLoss
    from models.network import DSTCarbonFormer

    presets = presets or ["tiny"]
    windows = windows or [1]
    precisions = precisions or ["auto"]
    device = resolve_device(device_name)
    t0 = time.perf_counter()
    main = load_main([data / "emissions_1km.tif"])
    child = main.grid.child(10)
    stack = AuxStack(discover_aux([data / "aux"]), child, main.years)
    stats = compute_stats(data / "emissions_1km.tif", stack)
    norm = AuxNormalizer.from_stats(stats, stack.names)
    t1 = time.perf_counter()
    cache = AuxCache.build(stack, norm.apply, child.shape, len(main.years), cache_dir=cache_dir or data / "cache")
    t2 = time.perf_counter()
    stack.close()
    log(
        f"setup: stats {t1 - t0:.1f} s, aux cache {t2 - t1:.1f} s ({cache.array.nbytes / 2**20:.0f} MiB, "
        f"{cache.channels} layers x {len(main.years)} years x {child.height}x{child.width})"
    )
    split = make_block_split(main.grid.height, main.grid.width, valid=main.valid_all_years)
    positions = split.train_positions(main.valid_all_years)
    scales = parse_scales(scales_spec)
    st = stats["main"]
    rows: list[dict[str, Any]] = []
    for preset_name in presets:
        for t in windows:
            if t > len(main.years):
                continue
            for precision in precisions:
                torch.manual_seed(0)
                mcfg = model_preset(preset_name, aux_channels=cache.channels, max_years=max(t, 1))
                model = DSTCarbonFormer(mcfg).to(device)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
                loss_fn = DualLayerWeightedLoss(st["log_nz_over_nnz"], st["cv_log"])
                autocast = _autocast_factory(device, precision)
                sampler = PatchSampler(positions, len(main.years), t, scales, batch_size, seed=0)

                fast = device.type == "cuda" and not legacy
                batch_kw: dict[str, Any] = dict(aux_dtype=np.float16, pin=True) if fast else {}

                def make(e: int, s: int, sampler: Any = sampler, t: int = t) -> object:
                    return build_batch(sampler.spec(e, s), main, cache, factor=10, patch=12, years_window=t, **batch_kw)

                def sync() -> None:
                    if device.type == "cuda":
                        torch.cuda.synchronize()

                if compile:
                    CompiledUNet(model, device)  # installed on the model: training forwards use it
                kw = dict(device=device, autocast=autocast, factor=10, moe_weight=0.01, grad_clip=1.0)
                w0 = time.perf_counter()
                for s in range(warmup):
                    training_step(model, make(0, s), loss_fn, opt, sched, **kw)
                sync()
                warm_s = time.perf_counter() - w0
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                prep, step_t = [], []
                for s in range(steps):
                    a = time.perf_counter()
                    b = make(1, s)
                    c = time.perf_counter()
                    sync()
                    training_step(model, b, loss_fn, opt, sched, **kw)
                    sync()
                    d = time.perf_counter()
                    prep.append(c - a)
                    step_t.append(d - c)
                sync()
                a = time.perf_counter()
                util = "n/a"
                wait = 0.0
                it = iter(Prefetcher(make, ((2, s) for s in range(steps)), workers=workers))
                for k in range(steps):
                    w0 = time.perf_counter()
                    b = next(it)
                    wait += time.perf_counter() - w0
                    training_step(model, b, loss_fn, opt, sched, sync=not fast, **kw)
                    if k == steps // 2 and device.type == "cuda":
                        util = _gpu_util()
                sync()
                pre_total = time.perf_counter() - a
                p_ms, s_ms = 1000 * float(np.mean(prep)), 1000 * float(np.mean(step_t))
                rows.append({
                    "preset": preset_name, "params": sum(p.numel() for p in model.parameters()), "T": t,
                    "precision": precision, "batch": batch_size, "prep_ms": p_ms, "step_ms": s_ms,
                    "data_share": p_ms / (p_ms + s_ms), "pps_sync": batch_size / ((p_ms + s_ms) / 1000),
                    "pps_prefetch": batch_size * steps / pre_total, "wait_share": wait / pre_total,
                    "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
                    "gpu_util": util, "device": str(device), "compile": bool(compile), "legacy": bool(legacy or not fast),
                    "warmup_s": warm_s,
                })
                del model, opt
    return rows


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
    ap.add_argument("--compile", action="store_true", help="compile the U-Net (as compile='on' in training)")
    ap.add_argument("--legacy", action="store_true", help="float32 pageable batches and a host sync per step (before issue 20)")
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=max(160, Console().width))  # logs keep every column unabridged
    tmp = None
    data = args.data
    if data is None:
        from carbonsr_cli.sample_data import generate_sample_data

        tmp = tempfile.TemporaryDirectory(prefix="carbonsr_bench_")
        data = Path(tmp.name) / "sample"
        t0 = time.perf_counter()
        generate_sample_data(data, seed=0, size_km=args.size_km, years=tuple(range(2019, 2019 + args.years)))
        console.print(f"generated {args.size_km} km sample in {time.perf_counter() - t0:.1f} s")
    rows = measure(
        data, device_name=args.device, presets=args.preset, windows=args.years_window, precisions=args.precision,
        batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, workers=args.workers,
        scales_spec=args.scales, cache_dir=Path(tmp.name if tmp else ".") / "cache", log=console.print,
        compile=args.compile, legacy=args.legacy,
    )
    table = Table(title=f"training throughput ({torch.get_num_threads()} CPU threads)")
    for col in ("preset", "params", "T", "precision", "batch", "prep ms/batch", "step ms", "data share",
                "patches/s (sync)", "patches/s (prefetch)", "wait share (prefetch)", "peak GPU MiB", "GPU util"):
        table.add_column(col, justify="right")
    for r in rows:
        peak = f"{r['gpu_peak_mib']:.0f}" if r["gpu_peak_mib"] is not None else "-"
        table.add_row(
            r["preset"], f"{r['params'] / 1e6:.2f} M", str(r["T"]), r["precision"], str(r["batch"]),
            f"{r['prep_ms']:.1f}", f"{r['step_ms']:.1f}", f"{100 * r['data_share']:.1f}%", f"{r['pps_sync']:.1f}",
            f"{r['pps_prefetch']:.1f}", f"{100 * r['wait_share']:.1f}%", peak, r["gpu_util"],
        )
    console.print(table)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
