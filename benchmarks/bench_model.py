"""Benchmark DSTCarbonFormer: parameters, patches/s and peak memory per patch.

Measures, for each preset x years T x precision: forward (eval, no grad) and forward+backward
(train mode, ``raw.mean() + aux_loss``) throughput in patches per second on 120 x 120 patches,
and on CUDA the peak allocated memory per patch (``torch.cuda.max_memory_allocated`` / batch).
Timings use warm-up iterations and ``torch.cuda.synchronize``.

Examples::

    python benchmarks/bench_model.py --device cpu --iters 3 --batch 4
    python benchmarks/bench_model.py --device cuda --batch 256 --iters 20 --compile
    python benchmarks/bench_model.py --device cuda --batch 256 --contiguous   # memory format A/B
    python benchmarks/bench_model.py --device cuda --presets base --years 1 --dtypes bf16 \\
        --batch 512 --physics
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.config import preset  # noqa: E402
from models.network import DSTCarbonFormer, count_parameters  # noqa: E402

AUX_CHANNELS = 6
BLOCK = 10


@dataclass
class Row:
    """One line of the result table."""

    preset: str
    params: int
    years: int
    dtype: str
    batch: int
    fwd: float  # patches/s
    train: float  # patches/s
    fwd_mb: float  # MB per patch (CUDA only, else NaN)
    train_mb: float
    compiled: bool


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[None]:
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _timed(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> tuple[float, float]:
    """Seconds per call and peak CUDA memory in bytes (NaN on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    dt = (time.perf_counter() - t0) / iters
    peak = float(torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else float("nan")
    return dt, peak


def _maybe_compile(model: torch.nn.Module, enabled: bool) -> tuple[torch.nn.Module, bool]:
    if not enabled:
        return model, False
    try:
        return torch.compile(model), True  # type: ignore[return-value]
    except Exception as exc:  # noqa: BLE001 - any backend failure means eager fallback
        warnings.warn(f"torch.compile failed ({exc}); using eager mode", stacklevel=2)
        return model, False


def bench_one(
    name: str, years: int, dtype: str, device: torch.device, batch: int, size: int,
    warmup: int, iters: int, compile_model: bool, physics: bool, channels_last: bool = True,
) -> Row:
    """Benchmark one preset / T / precision combination."""
    torch.manual_seed(0)
    model = DSTCarbonFormer(preset(name, AUX_CHANNELS)).to(device)
    model.channels_last = channels_last
    params = count_parameters(model)
    run_model, compiled = _maybe_compile(model, compile_model)
    aux = torch.randn(batch, AUX_CHANNELS, years, size, size, device=device)
    main = torch.rand(batch, 1, years, size, size, device=device) * 5
    totals = None
    if physics:
        totals = torch.rand(batch, 1, years, size // BLOCK, size // BLOCK, device=device, dtype=torch.float64) * 100
    extra = (totals, BLOCK) if physics else ()

    def forward() -> None:
        with torch.no_grad(), _autocast(device, dtype):
            run_model(aux, main, *extra)

    def train_step() -> None:
        with _autocast(device, dtype):
            raw, constrained = run_model(aux, main, *extra)
            loss = raw.float().mean() + 0.01 * model.aux_loss
            if constrained is not None:
                loss = loss + constrained.float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def attempt(fn: Callable[[], None]) -> tuple[float, float]:
        nonlocal run_model, compiled
        try:
            return _timed(fn, device, warmup, iters)
        except Exception as exc:  # noqa: BLE001 - compiled graph failed at run time
            if not compiled:
                raise
            warnings.warn(f"compiled model failed ({type(exc).__name__}: {exc}); eager fallback", stacklevel=2)
            run_model, compiled = model, False
            return _timed(fn, device, warmup, iters)

    model.eval()
    fwd_s, fwd_mem = attempt(forward)
    model.train()
    train_s, train_mem = attempt(train_step)
    mb = 1024.0 * 1024.0
    return Row(name, params, years, dtype, batch, batch / fwd_s, batch / train_s,
               fwd_mem / batch / mb, train_mem / batch / mb, compiled)


def _fmt_mb(x: float) -> str:
    return "-" if x != x else f"{x:.1f}"


def print_table(rows: list[Row], device: torch.device) -> None:
    """Print the results as a fixed-width table."""
    head = (f"{'preset':<7}{'params':>10}{'T':>3}{'dtype':>6}{'batch':>6}{'fwd p/s':>10}"
            f"{'f+b p/s':>10}{'fwd MB/p':>10}{'f+b MB/p':>10}{'compiled':>9}")
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()})")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.preset:<7}{r.params:>10,}{r.years:>3}{r.dtype:>6}{r.batch:>6}{r.fwd:>10.1f}{r.train:>10.1f}"
              f"{_fmt_mb(r.fwd_mb):>10}{_fmt_mb(r.train_mb):>10}{'yes' if r.compiled else 'no':>9}")


def _csv(text: str) -> Iterator[str]:
    return (x.strip() for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--presets", default="tiny,base", help="comma-separated presets (default tiny,base)")
    p.add_argument("--years", default="1,3", help="comma-separated T values (default 1,3)")
    p.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 autocast (default both)")
    p.add_argument("--batch", type=int, default=None, help="patches per batch (default 4 cpu, 128 cuda)")
    p.add_argument("--size", type=int, default=120, help="patch edge in child cells (default 120)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 1 cpu, 5 cuda)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 3 cpu, 20 cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (eager fallback on failure)")
    p.add_argument("--physics", action="store_true", help="include the float64 water-filling (block 10)")
    p.add_argument("--contiguous", action="store_true",
                   help="run in the default contiguous memory format instead of channels_last_3d")
    args = p.parse_args(argv)

    if args.physics and args.size % BLOCK:
        p.error(f"--physics needs --size a multiple of {BLOCK}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    on_gpu = device.type == "cuda"
    batch = args.batch or (128 if on_gpu else 4)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    iters = args.iters or (20 if on_gpu else 3)

    rows = []
    for name in _csv(args.presets):
        for years in (int(y) for y in _csv(args.years)):
            for dtype in _csv(args.dtypes):
                if dtype not in ("fp32", "bf16"):
                    p.error(f"unknown dtype {dtype!r}")
                rows.append(bench_one(name, years, dtype, device, batch, args.size, warmup, iters,
                                      args.compile, args.physics, not args.contiguous))
                print(f"  done {name} T={years} {dtype}", file=sys.stderr, flush=True)
    print_table(rows, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
