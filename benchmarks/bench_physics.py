"""Benchmark: water-filling projection throughput (blocks/s) next to baselines and the model.

Times, in float64 on ``--device``:

- ``water_fill`` (models/physics.py) at block 10 (inference: one parent cell) and block 120
  (training: a 12 x 12 parent-cell coarse block), no-grad and (block 120) forward+backward;
- a plain batched sort-based projection (sort, cumsum, threshold, clamp; no NaN handling, no
  exact-sum correction) as the reference;
- the uniform and dasymetric baselines (models/baselines.py);
- one model forward pass (``DSTCarbonFormer``, preset ``--model``) over the same area, so the
  projection's share of downscaling time is known (target < 5 %).

Usage:
    python benchmarks/bench_physics.py --device cpu
    python benchmarks/bench_physics.py --device cuda --blocks 4000000 --train-blocks 20000

Reference figures: a plain sort-based float64 batched projection does about 0.2 M blocks/s on 2
CPU cores and about 40 M blocks/s on an H100.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def plain_projection(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Reference: textbook batched sort-based simplex projection, rows of ``v [N, n]``."""
    n = v.shape[-1]
    srt = torch.sort(v, dim=-1, descending=True).values
    cs = srt.cumsum(dim=-1) - s.unsqueeze(-1)
    k = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    rho = (srt * k > cs).sum(dim=-1, keepdim=True).clamp(min=1)
    tau = cs.gather(-1, rho - 1) / rho
    return (v - tau).clamp(min=0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Best wall time of ``repeat`` runs after one warm-up, seconds."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--blocks", type=int, default=None,
                    help="blocks of 10x10 (default 200,000 on CPU, 4,000,000 on CUDA)")
    ap.add_argument("--train-blocks", type=int, default=None,
                    help="blocks of 120x120 (default 200 on CPU, 20,000 on CUDA)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per case; the best is reported (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--model", default="tiny", help="model preset for the forward-pass comparison; 'none' skips")
    ap.add_argument("--aux-channels", type=int, default=8, help="aux channels of the model (default 8)")
    ap.add_argument("--batch", type=int, default=None, help="model batch of 120x120 patches (default 2 CPU, 16 CUDA)")
    args = ap.parse_args(argv)

    from models.baselines import dasymetric_fill, uniform_fill
    from models.physics import from_blocks, to_blocks, water_fill

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n10 = args.blocks or (4_000_000 if cuda else 200_000)
    n120 = args.train_blocks or (20_000 if cuda else 200)
    f64 = torch.float64
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows: list[tuple[str, int, float, float]] = []  # name, block, blocks/s, relative to plain

    for block, n in ((10, n10), (120, n120)):
        # Lognormal raw values (like expm1 of a log-domain prediction), random totals.
        v = torch.exp(torch.randn(n, block * block, generator=gen, dtype=f64) * 1.5).to(device)
        s = (torch.rand(n, generator=gen, dtype=f64) * 1000).to(device)
        # lay out as [B, 1, T, H, W]: one image row of blocks per batch element
        per_row = 100 if block == 10 else 10
        n_img = n // per_row
        shape = (n_img, 1, 1, block, block * per_row)
        vals = from_blocks(v[: n_img * per_row], shape, block)
        tot = s[: n_img * per_row].reshape(n_img, 1, 1, 1, per_row)
        nb = n_img * per_row
        vb, sb = v[:nb], s[:nb]
        with torch.no_grad():
            t_plain = timeit(lambda: plain_projection(vb, sb), device, args.repeat)
            t_wf = timeit(lambda: water_fill(vals, tot, block), device, args.repeat)
            t_wf32 = timeit(lambda: water_fill(vals, tot, block, out_dtype=torch.float32), device, args.repeat)
            t_uni = timeit(lambda: uniform_fill(tot, block), device, args.repeat)
            t_das = timeit(lambda: dasymetric_fill(tot, vals, block), device, args.repeat)
        rows.append(("plain sort-based (reference)", block, nb / t_plain, 1.0))
        rows.append(("water_fill float64", block, nb / t_wf, t_plain / t_wf))
        rows.append(("water_fill -> float32 output", block, nb / t_wf32, t_plain / t_wf32))
        if block == 120:
            vg = vals.clone().requires_grad_()

            def fwd_bwd() -> None:
                water_fill(vg, tot, block).sum().backward()

            t_bw = timeit(fwd_bwd, device, args.repeat)
            rows.append(("water_fill forward+backward", block, nb / t_bw, t_plain / t_bw))
        rows.append(("uniform baseline", block, nb / t_uni, t_plain / t_uni))
        rows.append(("dasymetric baseline", block, nb / t_das, t_plain / t_das))
        # sanity: same result as the reference
        with torch.no_grad():
            err = (to_blocks(water_fill(vals, tot, block), block) - plain_projection(vb, sb)).abs().max().item()
        assert err <= 1e-9 * float(sb.max()), err

    dev_name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {dev_name}; torch {torch.__version__}; float64 computation")
    print(f"{'case':<32} {'block':>5} {'blocks/s':>14} {'vs plain':>9}")
    for name, block, rate, rel in rows:
        print(f"{name:<32} {block:>5} {rate:>14,.0f} {rel:>8.2f}x")

    if args.model != "none":
        from models.config import preset
        from models.network import DSTCarbonFormer

        batch = args.batch or (16 if cuda else 2)
        model = DSTCarbonFormer(preset(args.model, args.aux_channels)).to(device).eval()
        aux = torch.randn(batch, args.aux_channels, 1, 120, 120, generator=gen).to(device)
        main_in = torch.rand(batch, 1, 1, 120, 120, generator=gen).to(device)
        with torch.inference_mode():
            t_model = timeit(lambda: model(aux, main_in), device, args.repeat)
        blocks_per_patch = 144  # 12 x 12 parent cells of 10 x 10 children
        rate10 = next(r for n, b, r, _ in rows if n == "water_fill float64" and b == 10)
        t_proj = batch * blocks_per_patch / rate10
        print(f"\nmodel '{args.model}' forward, {batch} x 120x120 patches (T=1): {t_model * 1e3:.1f} ms "
              f"= {batch * blocks_per_patch / t_model:,.0f} parent cells/s")
        print(f"water_fill for the same area: {t_proj * 1e3:.2f} ms = {t_proj / (t_model + t_proj):.1%} of "
              "model + projection time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
