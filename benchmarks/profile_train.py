"""Profile the training step (issue 20): where a step's time goes, and what variants buy.

Builds the training data like ``carbonsr train`` (generated sample region, aux cache, split,
deterministic sampler), then

* times the batch preparation (``build_batch``) and its parts on the host;
* times the optimisation step of ``base`` (T = 3, 120 x 120 patches) for variants: bf16 autocast
  or fp32, ``channels_last_3d`` or contiguous, a host sync after every step (``float(loss)``, as
  the loop did) or not, batch 32 / 64, and (``--compile``) ``torch.compile`` of the U-Net;
* records a few steps with ``torch.profiler`` (top CUDA operators, GPU busy share);
* ``--ddp`` (under ``torchrun``): DDP steps with the per-step host collectives of the loop
  (``mean_float`` of the loss, ``agree_halt``) and without.

Writes a JSON of every figure (``--json``) and prints a readable log. Examples::

    python benchmarks/profile_train.py --device cuda --size-km 200 --json prof.json
    torchrun --nproc-per-node 2 benchmarks/profile_train.py --device cuda --ddp --size-km 96
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def setup(data: Path, cache_dir: Path) -> dict[str, Any]:
    from carbonsr_cli.aux import AuxStack, discover_aux
    from carbonsr_cli.stats import AuxNormalizer, compute_stats
    from carbonsr_cli.train.dataset import AuxCache, load_main, parse_scales
    from carbonsr_cli.train.split import make_block_split

    t0 = time.perf_counter()
    main = load_main([data / "emissions_1km.tif"])
    child = main.grid.child(10)
    stack = AuxStack(discover_aux([data / "aux"]), child, main.years)
    stats = compute_stats(data / "emissions_1km.tif", stack)
    norm = AuxNormalizer.from_stats(stats, stack.names)
    cache = AuxCache.build(stack, norm.apply, child.shape, len(main.years), cache_dir=cache_dir)
    stack.close()
    split = make_block_split(main.grid.height, main.grid.width, valid=main.valid_all_years)
    positions = split.train_positions(main.valid_all_years)
    log(f"setup {time.perf_counter() - t0:.1f} s: cache {cache.array.nbytes / 2**20:.0f} MiB")
    return {"main": main, "cache": cache, "positions": positions, "stats": stats,
            "scales": parse_scales("12:0.5,4:0.25,2:0.25")}


def step_fn(model: Any, b: Any, loss_fn: Any, opt: Any, sched: Any, device: Any, autocast: Any, sync: bool) -> Any:
    """The loop's training step (``loop.training_step`` as of b32510f), optionally without the
    host sync of ``float(loss)``."""
    import torch

    from carbonsr_cli.train.loop import _children
    from models.physics import block_sum

    aux = torch.from_numpy(b.aux).to(device, non_blocking=True)
    mi = torch.from_numpy(b.main).to(device, non_blocking=True)
    totals = torch.from_numpy(b.totals).to(device, non_blocking=True)
    truth = torch.from_numpy(b.truth).to(device, non_blocking=True)
    mask = torch.from_numpy(b.mask).to(device, non_blocking=True)
    with autocast():
        raw, _ = model(aux, mi, context_block=b.scale * 10)
    children = _children(model, raw, totals, b.scale * 10)
    parent = block_sum(children, 10)
    loss = loss_fn(torch.log1p(parent.clamp(min=0)), torch.log1p(truth.double()), mask)
    aux_loss = getattr(model, "aux_loss", None)
    if aux_loss is not None and torch.is_tensor(aux_loss) and aux_loss.requires_grad:
        loss = loss + 0.01 * aux_loss.double()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return float(loss.detach()) if sync else loss.detach()


def build_model(d: dict, device: Any, batch_channels: int, t: int, channels_last: bool, compile_unet: bool = False) -> Any:
    import torch

    from models.config import preset as model_preset
    from models.network import DSTCarbonFormer

    torch.manual_seed(0)
    model = DSTCarbonFormer(model_preset("base", aux_channels=batch_channels, max_years=t)).to(device)
    model.channels_last = channels_last
    if compile_unet:
        model._features = torch.compile(model._features)
    return model


def time_variant(d: dict, batches: list, device: Any, *, precision: str, channels_last: bool, sync: bool,
                 steps: int, warmup: int, compile_unet: bool = False, ddp_ctx: Any = None,
                 host_collectives: bool = False) -> dict[str, Any]:
    import torch

    from carbonsr_cli.train.loop import _autocast_factory
    from models.losses import DualLayerWeightedLoss

    st = d["stats"]["main"]
    t0 = time.perf_counter()
    model = build_model(d, device, batches[0].aux.shape[1], batches[0].aux.shape[2], channels_last, compile_unet)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss_fn = DualLayerWeightedLoss(st["log_nz_over_nnz"], st["cv_log"], mean_log=st.get("mean_log"))
    train_model = model
    if ddp_ctx is not None:
        train_model = ddp_ctx.wrap_model(model)
        loss_fn = ddp_ctx.shard_loss(loss_fn)
    autocast = _autocast_factory(device, precision)
    for k in range(warmup):
        step_fn(train_model, batches[k % len(batches)], loss_fn, opt, sched, device, autocast, True)
    _sync()
    t_warm = time.perf_counter() - t0
    a = time.perf_counter()
    for k in range(steps):
        v = step_fn(train_model, batches[k % len(batches)], loss_fn, opt, sched, device, autocast, sync)
        if host_collectives and ddp_ctx is not None:
            ddp_ctx.mean_float(float(v))
            ddp_ctx.agree_halt(None)
    _sync()
    dt = time.perf_counter() - a
    n = batches[0].aux.shape[0]
    return {"precision": precision, "channels_last": channels_last, "sync": sync, "batch": n, "compile": compile_unet,
            "step_ms": 1000 * dt / steps, "patches_s": n * steps / dt, "warmup_s": t_warm,
            "peak_mib": (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0)}


def prep_profile(d: dict, batch: int, t: int, n: int = 12) -> dict[str, Any]:
    """Host time of build_batch and its parts (one thread)."""
    import numpy as np

    from carbonsr_cli.train.dataset import PatchSampler, Prefetcher, _augment, build_batch, degrade

    main, cache = d["main"], d["cache"]
    sampler = PatchSampler(d["positions"], len(main.years), t, d["scales"], batch, seed=0)
    specs = [sampler.spec(9, s) for s in range(n)]
    res: dict[str, float] = {}

    def tm(name: str, fn: Any) -> None:
        a = time.perf_counter()
        for sp in specs:
            fn(sp)
        res[name] = 1000 * (time.perf_counter() - a) / len(specs)

    tm("build_batch_ms", lambda sp: build_batch(sp, main, cache, factor=10, patch=12, years_window=t))
    tm("aux_window_f32_ms", lambda sp: [cache.window(r * 10, c * 10, 120, y, t) for r, c, y in zip(sp.rows, sp.cols, sp.year0)])
    tm("aux_slice_f16_ms", lambda sp: [cache.array[:, y:y + t, r * 10:r * 10 + 120, c * 10:c * 10 + 120].copy()
                                       for r, c, y in zip(sp.rows, sp.cols, sp.year0)])
    tm("aux_f16_aug_stack_ms", lambda sp: np.stack([_augment(cache.array[:, y:y + t, r * 10:r * 10 + 120, c * 10:c * 10 + 120], ro, fl)
                                                    for r, c, y, ro, fl in zip(sp.rows, sp.cols, sp.year0, sp.rot, sp.flip)]))
    tm("aux_f32_aug_stack_ms", lambda sp: np.stack([_augment(cache.window(r * 10, c * 10, 120, y, t), ro, fl)
                                                    for r, c, y, ro, fl in zip(sp.rows, sp.cols, sp.year0, sp.rot, sp.flip)]))
    truth = np.random.rand(batch, 1, t, 12, 12).astype(np.float32)
    a = time.perf_counter()
    for _ in range(n):
        degrade(truth, 2, 10)
    res["degrade_ms"] = 1000 * (time.perf_counter() - a) / n
    for workers in (2, 4, 8):
        keys = ((11, s) for s in range(n))
        a = time.perf_counter()
        for _ in Prefetcher(lambda e, s: build_batch(sampler.spec(e, s), main, cache, factor=10, patch=12, years_window=t), keys, workers=workers):
            pass
        res[f"prefetch_{workers}w_batches_s"] = n / (time.perf_counter() - a)
    return res


def torch_profile(d: dict, batches: list, device: Any, out: Path | None, precision: str, channels_last: bool) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from carbonsr_cli.train.loop import _autocast_factory
    from models.losses import DualLayerWeightedLoss

    st = d["stats"]["main"]
    model = build_model(d, device, batches[0].aux.shape[1], batches[0].aux.shape[2], channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss_fn = DualLayerWeightedLoss(st["log_nz_over_nnz"], st["cv_log"], mean_log=st.get("mean_log"))
    autocast = _autocast_factory(device, precision)
    for k in range(3):
        step_fn(model, batches[k], loss_fn, opt, sched, device, autocast, True)
    _sync()
    a = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for k in range(4):
            step_fn(model, batches[k], loss_fn, opt, sched, device, autocast, True)
        _sync()
    wall = time.perf_counter() - a
    ka = prof.key_averages()
    table = ka.table(sort_by="self_cuda_time_total", row_limit=35, max_name_column_width=60)
    gpu_us = sum(e.self_device_time_total for e in ka)
    n_kernels = sum(e.count for e in ka if e.device_type == torch.autograd.DeviceType.CUDA)
    if out is not None:
        (out / f"profile_{precision}_cl{int(channels_last)}.txt").write_text(table)
    print(table, flush=True)
    return {"wall_ms_per_step": 1000 * wall / 4, "gpu_busy_ms_per_step": gpu_us / 1000 / 4,
            "kernels_per_step": n_kernels / 4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size-km", type=int, default=200)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--ddp", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from carbonsr_cli.train.dataset import PatchSampler, build_batch

    tmp = Path(tempfile.mkdtemp(prefix="carbonsr_prof_"))
    data = args.data
    if data is None:
        from carbonsr_cli.sample_data import generate_sample_data

        data = tmp / "sample"
        if int(os.environ.get("LOCAL_RANK", "0")) == 0 or not args.ddp:
            generate_sample_data(data, seed=0, size_km=args.size_km, years=(2018, 2019, 2020))
    ctx = None
    if args.ddp:
        from carbonsr_cli import distributed

        ctx = distributed.context(use_cuda=True)
        if ctx.local_rank != 0:  # every rank of this node reads rank 0's sample
            data = Path(ctx.broadcast(str(data)))
        else:
            ctx.broadcast(str(data))
    device = torch.device(args.device)
    if ctx is not None:
        device = ctx.device(device)
    d = setup(data, tmp / f"cache{os.environ.get('RANK', '0')}")
    t = 3
    main_d = d["main"]
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
                           "cpus": os.cpu_count()}
    sampler = PatchSampler(d["positions"], len(main_d.years), t, d["scales"], args.batch_size, seed=0)

    def batches_for(bs: int, n: int = 6) -> list:
        smp = PatchSampler(d["positions"], len(main_d.years), t, d["scales"], bs, seed=0)
        return [build_batch(smp.spec(0, s), main_d, d["cache"], factor=10, patch=12, years_window=t) for s in range(n)]

    batches = batches_for(args.batch_size)
    if ctx is not None:
        rows = []
        for hc in (True, False):
            r = time_variant(d, batches, device, precision="bf16", channels_last=True, sync=True, steps=args.steps,
                             warmup=3, ddp_ctx=ctx, host_collectives=hc)
            r["host_collectives"] = hc
            r["world"] = ctx.world_size
            rows.append(r)
            log(f"ddp world {ctx.world_size} host collectives {hc}: {r['step_ms']:.1f} ms/step, "
                f"{r['patches_s'] * ctx.world_size:.1f} patches/s global")
        res["ddp"] = rows
    else:
        res["prep"] = prep_profile(d, args.batch_size, t)
        log(f"prep: {json.dumps({k: round(v, 1) for k, v in res['prep'].items()})}")
        variants = [
            dict(precision="bf16", channels_last=True, sync=True),
            dict(precision="bf16", channels_last=True, sync=False),
            dict(precision="bf16", channels_last=False, sync=False),
            dict(precision="fp32", channels_last=True, sync=False),
            dict(precision="fp32", channels_last=False, sync=False),
        ]
        res["variants"] = []
        for v in variants:
            r = time_variant(d, batches, device, steps=args.steps, warmup=3, **v)
            res["variants"].append(r)
            log(f"{v}: {r['step_ms']:.1f} ms/step, {r['patches_s']:.1f} patches/s, peak {r['peak_mib']:.0f} MiB")
        b64 = batches_for(2 * args.batch_size, 4)
        for cl in (True, False):
            r = time_variant(d, b64, device, steps=max(1, args.steps // 2), warmup=2, precision="bf16", channels_last=cl, sync=False)
            res["variants"].append(r)
            log(f"batch {2 * args.batch_size} bf16 cl={cl}: {r['step_ms']:.1f} ms/step, {r['patches_s']:.1f} patches/s")
        if not args.no_profile:
            res["profile"] = torch_profile(d, batches, device, args.out, "bf16", True)
            log(f"profile bf16 cl: {res['profile']}")
            res["profile_fp32_contig"] = torch_profile(d, batches, device, args.out, "fp32", False)
            log(f"profile fp32 contiguous: {res['profile_fp32_contig']}")
        if args.json:
            args.json.write_text(json.dumps(res, indent=2, default=str))
        if args.compile:
            for prec in ("bf16",):
                try:
                    r = time_variant(d, batches, device, steps=args.steps, warmup=4, precision=prec, channels_last=False,
                                     sync=False, compile_unet=True)
                    res["variants"].append(r)
                    log(f"compile {prec}: {r['step_ms']:.1f} ms/step, {r['patches_s']:.1f} patches/s, warm-up {r['warmup_s']:.1f} s")
                except Exception as exc:  # noqa: BLE001
                    log(f"compile {prec} failed: {type(exc).__name__}: {exc}")
    if args.json and (ctx is None or ctx.is_main):
        args.json.write_text(json.dumps(res, indent=2, default=str))
    if ctx is not None:
        ctx.cleanup()


if __name__ == "__main__":
    main()
