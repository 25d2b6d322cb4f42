"""One command for every speed figure of issue 10: downscaling, training, physics, memory.

Generates its own synthetic input (``carbonsr sample-data``), then measures:

* **downscaling** end to end through ``carbonsr_cli.downscale.downscale()`` (reading, model,
  blending, water-filling, writing and the conservation re-read): ``uniform`` (the I/O limit)
  and the ``base`` model (plus ``tiny`` on the CPU) on a ``size x size`` km region, one year,
  every aux layer of the sample (one of them in EPSG:4326). Each run is a separate process,
  so its peak RSS is its own. Per-stage times (read, model, water-fill, write) come from
  timers wrapped around the pipeline's functions.
* **physics**: the float64 water-filling's share of the model run's downscaling time.
* **training**: ``base``, T = 3, batch 32 (CUDA) in bf16 and fp32: patches/s with batches
  prepared by worker threads as in ``carbonsr train``, and the share of wall time the loop
  waits for data (plus the synchronous preparation / step ratio).
* **commands** (issue 20): ``carbonsr downscale`` as a user runs it (a child process timed from
  outside) with ``uniform``, ``dasymetric`` and the model (``base`` on CUDA, ``tiny`` on the
  CPU) on the same region, split into stages (import, planning, coverage, stats, loop, check,
  print, exit; see ``command_stages.py``), after one warm-up run of each (``--command-repeat``
  runs each, median; 0 leaves them out).

Prints one table (figure, value, reference, ratio, target), the stage breakdown and the
command stage table.

Usage::

    python benchmarks/run.py                       # auto device; 1000 km on CUDA, 100 km on CPU
    python benchmarks/run.py --device cpu --quick  # small and quick (< 3 min on 2 cores)
    python benchmarks/run.py --device cuda --size-km 1000 --json results.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from memory_peak import PeakSampler  # noqa: E402  (the process tree's peak PSS)


def _peak_rss_mb() -> float:
    """Peak RSS of this process in MiB: ``VmHWM`` on Linux (``ru_maxrss`` survives exec, so a
    child started by a big parent would report the parent's peak), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


# ------------------------------------------------------------------------------------------
# Downscale worker (runs in its own process)
# ------------------------------------------------------------------------------------------


def _install_timers(device: str) -> tuple[dict[str, float], Any]:
    """Wrap the pipeline's stage functions with accumulators (seconds).

    Host stages accumulate wall-clock time. GPU stages (model, batch slicing, blending,
    water-fill) on CUDA accumulate the time between two CUDA events recorded around each call
    (no host synchronisation, which would serialise the pipeline being measured): the span
    from the end of the work queued before the call to the end of the call's own work.
    Returns the accumulator and a function that adds the event times (call it at the end).
    """
    import threading

    import torch

    from carbonsr_cli.downscale import bands as bd
    from carbonsr_cli.downscale import engine as dp
    from carbonsr_cli import tiling
    from carbonsr_cli import writer as wr

    acc: dict[str, float] = {"read": 0.0, "model": 0.0, "water_fill": 0.0, "baseline_fill": 0.0, "write": 0.0,
                             "finish": 0.0, "open_feed": 0.0, "predict_row": 0.0, "blend": 0.0}
    events: dict[str, list[Any]] = {}
    lock = threading.Lock()
    cuda = (device.startswith("cuda") or device == "auto") and torch.cuda.is_available()

    def timed(name: str, fn: Any, gpu: bool = False) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            ev = gpu and cuda
            if ev:
                e0 = torch.cuda.Event(enable_timing=True)
                e0.record()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if ev:
                    e1 = torch.cuda.Event(enable_timing=True)
                    e1.record()
                    with lock:
                        events.setdefault(name, []).append((e0, e1))
                else:
                    with lock:
                        acc[name] += time.perf_counter() - t0

        return wrapper

    def collect() -> None:
        if cuda:
            torch.cuda.synchronize()
        for name, pairs in events.items():
            acc[name] += sum(e0.elapsed_time(e1) for e0, e1 in pairs) / 1000.0

    dp._BandReader.read = timed("read", dp._BandReader.read)
    bd._RowReader.read = timed("read", bd._RowReader.read)  # baselines: in the preparing threads
    dp._Predictor.__call__ = timed("model", dp._Predictor.__call__, gpu=True)
    dp._water_fill = timed("water_fill", dp._water_fill, gpu=True)
    bd.baseline_fill = timed("baseline_fill", bd.baseline_fill)  # preparing threads
    dp.finish_band = timed("finish", dp.finish_band)  # writer thread; waits for the GPU copy
    bd.finish_band = timed("finish", bd.finish_band)  # baselines: preparing threads
    wr.RasterWriter.write = timed("write", wr.RasterWriter.write)
    dp._open_strip_feed = timed("open_feed", dp._open_strip_feed)  # reader start-up and pre-warp
    dp._predict_row = timed("predict_row", dp._predict_row, gpu=True)  # model + batch slicing
    tiling.BlendStream.push = timed("blend", tiling.BlendStream.push, gpu=True)
    return acc, collect


def downscale_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one ``downscale()`` in this process; figures, stage times and peak RSS."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    acc, collect_gpu_times = _install_timers(spec["device"])
    if spec.get("stub_model"):
        # Everything of the model path but the network: the "prediction" is the main input
        # itself (log1p of the uniform share), so reading and warping the aux layers, batching,
        # blending, water-filling and writing still run. The floor the model path cannot beat.
        from carbonsr_cli.downscale import engine as dp

        dp._Predictor._choose = lambda self, a, m: (lambda a_, m_: m_.float())
    from carbonsr_cli.downscale import downscale

    sampler = PeakSampler(every=0.2, details=False)
    t0 = time.perf_counter()
    s = downscale(spec["main"], spec["aux"], spec["out"], method=spec["method"], checkpoint=spec.get("checkpoint"),
                  device=spec["device"], batch_size=spec.get("batch_size"), overwrite=True, progress=False,
                  check=True)
    wall = time.perf_counter() - t0
    tree_pss = sampler.stop()["total_pss_mb"]
    collect_gpu_times()
    from carbonsr_cli.downscale import engine as dp
    from carbonsr_cli.downscale import readers

    acc["read_wait"] = dp.LAST_RUN_SECONDS.get("read_wait", 0.0)
    acc["loop"] = dp.LAST_RUN_SECONDS.get("total", 0.0)  # the row loop, after readers are open
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest reader process, MiB
    n_read, procs = (readers.reader_config(s.child_cells) if spec["method"] == "model" else (1, False))
    return {
        "readers": f"{n_read} {'processes' if procs else 'threads'}", "child_rss_mb": kids if procs else 0.0,
        "total_rss_mb": tree_pss if procs else _peak_rss_mb(),
        "label": spec["label"], "device": s.device, "precision": s.precision, "area_km2": s.area_km2,
        "years": len(s.years), "tiles": s.tiles, "seconds": s.seconds, "wall_with_check": wall,
        "km2_per_s": s.km2_per_s, "peak_rss_mb": _peak_rss_mb(), "conservation_ok": bool(s.conservation.ok),
        "max_rel_error": s.conservation.max_rel_error, "stages": acc, "notes": list(s.notes),
        "gpu_peak_mb": (torch.cuda.max_memory_allocated() / 2**20) if s.device.startswith("cuda") else None,
    }


def train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Training throughput rows (``bench_train.measure``) in this process: one row per entry of
    ``spec["configs"]`` (``precision``, ``compile``, ``steps``), or per precision of
    ``spec["precisions"]`` (eager)."""
    import bench_train

    configs = spec.get("configs") or [{"precision": p, "compile": False} for p in spec["precisions"]]
    rows = []
    for c in configs:
        rows += bench_train.measure(
            Path(spec["data"]), device_name=spec["device"], presets=[spec["preset"]], windows=[spec["T"]],
            precisions=[c["precision"]], batch_size=spec["batch"], steps=c.get("steps", spec["steps"]),
            warmup=c.get("warmup", spec["warmup"]), workers=spec["workers"], cache_dir=Path(spec["cache"]),
            log=lambda m: print(m, file=sys.stderr), compile=bool(c.get("compile")), legacy=bool(c.get("legacy")),
        )
    return {"rows": rows, "peak_rss_mb": _peak_rss_mb()}


def train_run_worker(spec: dict[str, Any]) -> dict[str, Any] | None:
    """One ``carbonsr train`` run (``loop.train``) in this process, or in each rank under torchrun:
    patches/s after warm-up (``RunResult.throughput``) and the validation scores. Rank 0 reports."""
    from carbonsr_cli import distributed
    from carbonsr_cli.train.config import TrainConfig
    from carbonsr_cli.train.loop import train

    data = Path(spec["data"])
    cfg = TrainConfig(
        main=[str(data / "emissions_1km.tif")], aux=[str(data / "aux")], preset=spec["preset"], years_window=spec["T"],
        batch_size=spec["batch"], epochs=spec["epochs"], steps_per_epoch=spec["steps_per_epoch"],
        precision=spec["precision"], device=spec["device"], runs_dir=spec["runs"], name=spec["name"],
        compile=spec["compile"], workers=spec["workers"], progress=False, patience=0, seed=0,
        autosave_every=10**9, snapshot_every=10**9, max_val_windows=spec.get("max_val_windows", 256),
    )
    t0 = time.perf_counter()
    res = train(cfg)
    wall = time.perf_counter() - t0
    ctx = distributed.get_context()
    if not ctx.is_main:
        return None
    return {"world": ctx.world_size, "wall_s": wall, "throughput": res.throughput, "best_score": res.best_score,
            "initial_score": res.initial_score, "global_step": res.global_step,
            "history": [{k: h[k] for k in ("epoch", "global_step", "train_loss", "val_score")} for h in res.history]}


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]


def _gpu_env() -> dict[str, str]:
    """NVLink multicast stays off (required by the GPU machines); set before any process starts."""
    return {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def gpus_train(td: Path, work: Path, n: int, *, steps_per_epoch: int, epochs: int, batch: int, compile_: str,
               device: str, preset: str = "base") -> dict[str, Any]:
    """The same training on 1 GPU (global batch ``batch``) and on ``n`` GPUs under torchrun (global
    batch ``n * batch``: the per-GPU batch is kept), each a separate process."""
    out: dict[str, Any] = {}
    for k in (1, n):
        spec = {"data": str(td), "runs": str(work / "gpus_runs"), "name": f"g{k}", "preset": preset, "T": 3,
                "batch": batch * k, "epochs": epochs, "steps_per_epoch": steps_per_epoch, "precision": "bf16",
                "device": device, "compile": compile_, "workers": 2}
        env = dict(_gpu_env(), CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(k)), OMP_NUM_THREADS="4")
        t0 = time.perf_counter()
        r = _child("train-run", spec, launcher=_torchrun(k) if k > 1 else None, env=env)
        r["command_wall_s"] = time.perf_counter() - t0
        out[str(k)] = r
        thr = r.get("throughput") or {}
        _log(f"train {k} GPU(s), global batch {batch * k}: {thr.get('patches_per_s', float('nan')):.1f} patches/s "
             f"after warm-up, wait {100 * thr.get('data_wait_share', float('nan')):.1f}%, val score "
             f"{r['history'][-1]['val_score'] if r['history'] else float('nan'):.4f}, wall {r['command_wall_s']:.1f} s")
    return out


def gpus_downscale(sd: Any, ckpt: Path, work: Path, n: int, repeat: int = 2) -> dict[str, Any]:
    """``carbonsr downscale`` (the CLI, timed from outside, with per-rank stage timers) on 1 GPU,
    on ``n`` GPUs in one process (``--device cuda:0,...``) and on ``n`` GPUs under torchrun,
    ``repeat`` times each in turn (medians); whether the outputs equal the 1-GPU file."""
    import statistics

    import numpy as np
    import rasterio
    from rasterio.windows import Window

    out: dict[str, Any] = {}
    timer = str(ROOT / "benchmarks" / "downscale_stage_timer.py")
    devices = ",".join(f"cuda:{i}" for i in range(n))
    ways = {"1": ([sys.executable], "cuda:0"), "inproc": ([sys.executable], devices), "torchrun": (_torchrun(n), "cuda")}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in ways}
    for _ in range(max(1, repeat)):
        for key, (launcher, device) in ways.items():
            dst, js, st = work / f"gpus_out_{key}.tif", work / f"gpus_out_{key}.json", work / f"gpus_stages_{key}"
            cmd = launcher + [timer, str(st), "downscale", str(sd.emissions), "--aux", str(sd.aux_dir), "--model", str(ckpt),
                              "-o", str(dst), "-q", "--overwrite", "--json", str(js), "--device", device]
            env = dict(os.environ, **_gpu_env(), CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(n)))
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"downscale ({key}) failed:\n{proc.stderr[-3000:]}")
            summ = json.loads(js.read_text())
            ranks = [json.loads(p.read_text()) for p in sorted(st.glob("stages_rank*.json"))]
            runs[key].append({
                "wall_s": wall, "pipeline_s": summ["seconds"], "check_s": summ.get("check_seconds"), "device": summ.get("device"),
                "conservation_ok": summ.get("conservation", {}).get("ok") if isinstance(summ.get("conservation"), dict) else None,
                "ranks": [{"import_s": r["import_s"], "end_s": r["end_s"], **{k2: round(v, 3) for k2, v in r["durations"].items()}}
                          for r in ranks]})
            _log(f"downscale {key} ({device}): pipeline {summ['seconds']:.2f} s, command {wall:.2f} s")
    for key, rs in runs.items():
        out[key] = dict(rs[-1], wall_s=statistics.median(r["wall_s"] for r in rs),
                        pipeline_s=statistics.median(r["pipeline_s"] for r in rs),
                        walls=[round(r["wall_s"], 2) for r in rs], pipelines=[round(r["pipeline_s"], 2) for r in rs])
    out[str(n)] = out["inproc"]
    for key in ("inproc", "torchrun"):
        same, worst = True, 0.0
        with rasterio.open(work / "gpus_out_1.tif") as a, rasterio.open(work / f"gpus_out_{key}.tif") as b:
            for r in range(0, a.height, 2000):
                w = Window(0, r, a.width, min(2000, a.height - r))
                x, y = a.read(window=w), b.read(window=w)
                same &= bool(np.array_equal(x, y, equal_nan=True))
                with np.errstate(all="ignore"):
                    d = np.abs(x.astype(np.float64) - y) / np.maximum(np.abs(x.astype(np.float64)), 1e-30)
                worst = max(worst, float(np.nanmax(d)) if d.size else 0.0)
        out[key]["identical"], out[key]["max_rel_diff"] = same, worst
    for key in ways:
        (work / f"gpus_out_{key}.tif").unlink(missing_ok=True)
    return out


def _child(kind: str, spec: dict[str, Any], launcher: list[str] | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    env = dict(os.environ, **spec.get("env", {}), **(env or {}))
    cmd = (launcher or [sys.executable]) + [__file__, "--worker", kind, json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} run {spec.get('label', spec.get('name', ''))} failed:\n{proc.stderr[-4000:]}")
    if proc.stderr.strip():
        print(proc.stderr.strip()[-2000:], file=sys.stderr)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------


def _git_rev() -> str:
    if os.environ.get("CARBONSR_COMMIT"):  # a copied tree whose .git is not the one it came from
        return os.environ["CARBONSR_COMMIT"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return f"uncommitted tree on top of {rev}" if dirty else rev
    except Exception:  # noqa: BLE001 - not a git checkout (e.g. a copied tree)
        return os.environ.get("CARBONSR_COMMIT", "unknown")


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {os.cpu_count()} CPU cores"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def _log(msg: str) -> None:
    print(f"# [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    """Parse arguments, generate data, run every measurement, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--size-km", type=int, default=None,
                    help="edge of the downscaling region in km (default: 1000 on CUDA, 100 on CPU, 24 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="24 km region, 48 km training region, batch 2 and 2 steps on the CPU")
    ap.add_argument("--batch-size", type=int, default=None, help="downscale tiles per batch (default: downscale's)")
    ap.add_argument("--train-size-km", type=int, default=None, help="training region (default 200 CUDA, 48 CPU)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-downscale", action="store_true", help="no single-process downscale rows")
    ap.add_argument("--gpus", type=int, default=0,
                    help="also run training (1 GPU vs N GPUs under torchrun, global batch N x 32) and "
                         "downscaling (the CLI on 1 vs N GPUs) as separate processes: the multi-GPU rows")
    ap.add_argument("--gpus-skip-downscale", action="store_true", help="with --gpus: training rows only")
    ap.add_argument("--gpus-steps", type=int, default=150, help="with --gpus: steps per epoch (2 epochs)")
    ap.add_argument("--compile", default="on", help="training rows: compile the U-Net (on/off), as TrainConfig.compile")
    ap.add_argument("--ablate", action="store_true",
                    help="also run base with 8 reader threads, 8 reader processes and the first-pass settings "
                         "(1 reader thread, batch 32) for the ratios")
    ap.add_argument("--variants", nargs="*", default=[],
                    help="extra downscale runs: base-eager (no CUDA graph), base-nomodel (the model path with the "
                         "network replaced by its input: the floor of reading, warping, blending, water-filling and "
                         "writing), base-8threads, base-8procs, base-1reader-b32")
    ap.add_argument("--command-repeat", type=int, default=1,
                    help="runs of each downscale command for the command stage table (median; 0: no table)")
    ap.add_argument("--workdir", type=Path, default=None, help="where data and outputs go (default: a temp dir)")
    ap.add_argument("--data", type=Path, default=None,
                    help="an existing sample-data folder (emissions_1km.tif, aux/) to downscale instead of "
                         "generating one; --size-km is then only the label of the rows")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure as JSON")
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, spec = args.worker
        fn = {"downscale": downscale_worker, "train": train_worker, "train-run": train_run_worker}[kind]
        result = fn(json.loads(spec))
        if result is not None:  # torchrun: rank 0 only
            print(json.dumps(result), flush=True)
        return

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device.startswith("cuda")
    size = args.size_km or (24 if args.quick else (1000 if gpu else 100))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="carbonsr_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                           "device": _device_name(device), "commit": _git_rev(), "size_km": size}

    from bench_downscale import _make_checkpoint

    from carbonsr_cli.aux import discover_aux, layer_names
    from carbonsr_cli.sample_data import generate_sample_data

    need_region = not args.skip_downscale or (args.gpus > 1 and not args.gpus_skip_downscale)
    sd, aux_names = None, []
    if need_region and args.data is not None:
        from types import SimpleNamespace

        sd = SimpleNamespace(emissions=args.data / "emissions_1km.tif", aux_dir=args.data / "aux")
        _log(f"data: {args.data}")
    elif need_region:
        t0 = time.perf_counter()
        sd = generate_sample_data(work / f"region{size}", size_km=size, years=(2020,), overwrite=True)
        res["sample_s"] = time.perf_counter() - t0
        _log(f"sample-data {size} km, 1 year: {res['sample_s']:.1f} s")
    if need_region:
        aux_names = layer_names(discover_aux([sd.aux_dir]))
        res["aux_layers"] = len(aux_names)

    methods = [] if args.skip_downscale else (["uniform", "base"] if gpu else ["uniform", "tiny", "base"])
    if args.ablate and methods:
        methods += ["base-eager", "base-8threads", "base-8procs", "base-1reader-b32"]
    methods += [v for v in args.variants if v not in methods and methods]
    res["downscale"] = {}
    for m in methods:
        assert sd is not None
        spec: dict[str, Any] = {"label": m, "main": str(sd.emissions), "aux": [str(sd.aux_dir)],
                                "out": str(work / f"out_{m}.tif"), "device": device, "batch_size": args.batch_size}
        if m == "uniform":
            spec.update(method="uniform", aux=[])
        else:
            preset_name = m.split("-")[0]
            spec.update(method="model",
                        checkpoint=str(_make_checkpoint(work / f"{preset_name}.pth", preset_name, aux_names, 1)))
            if m.endswith("-1reader-b32"):
                spec.update(batch_size=32, env={"CARBONSR_READ_THREADS": "1"})
            if m.endswith("-8threads"):
                spec.update(env={"CARBONSR_READ_THREADS": "8"})
            if m.endswith("-eager"):
                spec.update(env={"CARBONSR_CUDA_GRAPHS": "0"})
            if m.endswith("-nomodel"):
                spec.update(stub_model=True)
            if m.endswith("-8procs"):
                spec.update(env={"CARBONSR_READ_PROCS": "8"})
        r = _child("downscale", spec)
        res["downscale"][m] = r
        _log(f"downscale {m}: {r['seconds']:.2f} s, {r['km2_per_s']:,.0f} km2/s, RSS {r['peak_rss_mb']:.0f} MB, "
             f"conserved {r['conservation_ok']}, stages {json.dumps({k: round(v, 2) for k, v in r['stages'].items()})}")
        Path(spec["out"]).unlink(missing_ok=True)

    if methods and args.command_repeat > 0:
        assert sd is not None
        res["commands"] = command_stage_runs(sd.emissions.parent, work, aux_names, "base" if gpu else "tiny", device,
                                             args.command_repeat)

    td = None
    if not args.skip_train or args.gpus > 1:
        tsize = args.train_size_km or (48 if (args.quick or not gpu) else 200)
        t0 = time.perf_counter()
        td = generate_sample_data(work / f"train{tsize}", size_km=tsize, years=(2018, 2019, 2020), overwrite=True)
        _log(f"training sample {tsize} km, 3 years: {time.perf_counter() - t0:.1f} s")
    if not args.skip_train:
        assert td is not None
        comp = args.compile == "on"
        # CUDA: the U-Net compiled (as carbonsr train with compile=on/auto), then eager bf16 and fp32.
        configs = ([{"precision": "bf16", "compile": True}] if comp else []) + [
            {"precision": "bf16", "compile": False}, {"precision": "fp32", "compile": False, "steps": 10}]
        tspec = {"data": str(td.root if hasattr(td, "root") else td.emissions.parent), "device": device,
                 # CPU: fp32 only (bf16 autocast is many times slower on CPUs without bf16 units).
                 "preset": "base", "T": 3, "precisions": ["fp32"], "configs": configs if gpu else None,
                 "batch": 32 if gpu else (2 if args.quick else 4),
                 "steps": 20 if gpu else (2 if args.quick else 4), "warmup": 3 if gpu else 1,
                 "workers": 2, "cache": str(work / "train_cache")}
        res["train"] = _child("train", tspec)["rows"]
        for r in res["train"]:
            _log(f"train {r['preset']} T={r['T']} {r['precision']}{' compiled' if r.get('compile') else ''}: "
                 f"{r['pps_prefetch']:.1f} patches/s, wait {100 * r['wait_share']:.1f}%, "
                 f"sync data share {100 * r['data_share']:.1f}%, warm-up {r.get('warmup_s', 0):.1f} s")
    if args.gpus > 1:
        res["gpus"] = {"n": args.gpus}
        if not args.gpus_skip_train:
            assert td is not None
            res["gpus"]["train"] = gpus_train(
                td.root, work, args.gpus, steps_per_epoch=args.gpus_steps, epochs=2, batch=32 if gpu else 2,
                compile_=args.compile if gpu else "off", device=device, preset="base" if gpu else "tiny")
        if not args.gpus_skip_downscale:
            assert sd is not None
            ck = _make_checkpoint(work / "base.pth", "base", aux_names, 1)
            res["gpus"]["downscale"] = gpus_downscale(sd, ck, work, args.gpus, repeat=args.gpus_repeat)

    table = _table(res, gpu)
    print(f"carbonsr benchmark  {res['date']}  device: {res['device']}  commit: {res['commit']}")
    print(table)
    if res.get("commands"):
        from command_stages import table as stage_table

        print()
        print(f"carbonsr downscale commands, {size} km, seconds (median of {args.command_repeat}; timed from outside, "
              f"after a warm-up run; model preset {res['commands']['preset']}):")
        print(stage_table({"this": res["commands"]["runs"]}, ["this"]))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))


def command_stage_runs(data: Path, work: Path, aux_names: list[str], preset: str, device: str,
                       repeat: int) -> dict[str, Any]:
    """Each ``carbonsr downscale`` command of ``command_stages.commands`` (uniform, dasymetric, the
    model with a random ``preset`` checkpoint) run once to warm up, then ``repeat`` times; their
    stage seconds (``{"preset", "runs": {method: [stages, ...]}}``)."""
    from bench_downscale import _make_checkpoint
    from command_stages import commands, run_once

    ckpt = _make_checkpoint(work / f"{preset}.pth", preset, aux_names, 1)
    runs: dict[str, list[dict[str, float]]] = {}
    env = {"CARBONSR_CACHE_DIR": str(work / "cache")}  # the cache of per-input work, as a repeated command finds it
    for m, cmd in commands(data, work, ckpt, ["uniform", "dasymetric", "model"], device).items():
        run_once(ROOT, cmd, sys.executable, env)
        runs[m] = [run_once(ROOT, cmd, sys.executable, env) for _ in range(repeat)]
        _log(f"command {m}: wall {statistics.median(r['wall'] for r in runs[m]):.2f} s")
        (work / f"out_{m}.tif").unlink(missing_ok=True)
    return {"preset": preset, "runs": runs}


def _train_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Training rows of the table: compiled bf16 (the target figure on CUDA), eager bf16, fp32."""
    rows: list[tuple[str, str, str, str, str]] = []
    comp = [r for r in res.get("train", []) if r.get("compile")]
    if comp:
        c = comp[0]
        eager = next((r for r in res.get("train", []) if r["precision"] == c["precision"] and not r.get("compile")), None)
        rows.append((f"train base T=3 {c['precision']} b{c['batch']}, U-Net compiled (patches/s)", f"{c['pps_prefetch']:.1f}",
                     "270 (b32510f)", f"{c['pps_prefetch'] / 270:.2f}x", ">= 2x"))
        rows.append(("  data wait share (prefetch)", f"{100 * c['wait_share']:.1f}%", "step time", "-", "< 10%"))
        rows.append(("  warm-up steps incl. compile (s)", f"{c.get('warmup_s', 0):.1f}", "-", "-", "-"))
        if eager:
            rows.append(("  same, eager U-Net (patches/s)", f"{eager['pps_prefetch']:.1f}", "compiled",
                         f"{eager['pps_prefetch'] / c['pps_prefetch']:.2f}", "-"))
    tr = {r["precision"]: r for r in res.get("train", []) if not r.get("compile")}
    if "bf16" in tr:
        b = tr["bf16"]
        rows.append((f"train base T=3 bf16 b{b['batch']} (patches/s)", f"{b['pps_prefetch']:.1f}", "-", "-", "-"))
        rows.append(("  data wait share (prefetch)", f"{100 * b['wait_share']:.1f}%", "step time", "-", "< 10%"))
        rows.append(("  batch prep / (prep + step), sync", f"{100 * b['data_share']:.1f}%",
                     f"prep {b['prep_ms']:.0f} ms", f"step {b['step_ms']:.0f} ms", "-"))
    if "fp32" in tr:
        f = tr["fp32"]
        ref = tr.get("bf16")
        rows.append((f"train base T=3 fp32 b{f['batch']} (patches/s)", f"{f['pps_prefetch']:.1f}",
                     f"bf16 {ref['pps_prefetch']:.1f}" if ref else "-",
                     f"{f['pps_prefetch'] / ref['pps_prefetch']:.2f}" if ref else "-", "reported"))
        rows.append(("  data wait share (prefetch)", f"{100 * f['wait_share']:.1f}%", "step time", "-", "< 10%"))
    return rows


def _gpus_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Rows of ``--gpus N``: training throughput and validation on 1 vs N GPUs, downscaling 1 vs N."""
    rows: list[tuple[str, str, str, str, str]] = []
    g = res.get("gpus")
    if not g:
        return rows
    n = g["n"]
    tr = g.get("train", {})
    one, many = tr.get("1"), tr.get(str(n))
    if one and many and one.get("throughput") and many.get("throughput"):
        p1, pn = one["throughput"]["patches_per_s"], many["throughput"]["patches_per_s"]
        b1, bn = one["throughput"]["global_batch"], many["throughput"]["global_batch"]
        rows.append((f"train 1 GPU, batch {b1} (patches/s, after warm-up)", f"{p1:.1f}", "-", "-", "-"))
        rows.append((f"train {n} GPUs, batch {bn} (patches/s)", f"{pn:.1f}", f"1 GPU {p1:.1f}", f"{pn / p1:.2f}x",
                     f">= {0.9 * n:.1f}x"))
        rows.append((f"  data wait share 1 / {n} GPUs", f"{100 * one['throughput']['data_wait_share']:.1f}%",
                     f"{100 * many['throughput']['data_wait_share']:.1f}%", "-", "< 10%"))
        v1 = one["history"][-1]["val_score"] if one["history"] else float("nan")
        vn = many["history"][-1]["val_score"] if many["history"] else float("nan")
        rows.append((f"  val score after {one['global_step']} steps, 1 / {n} GPUs", f"{v1:.4f}", f"{vn:.4f}",
                     f"{vn / v1:.3f}", "same within noise"))
        rows.append((f"  command wall 1 / {n} GPUs (s)", f"{one['command_wall_s']:.1f}", f"{many['command_wall_s']:.1f}",
                     "-", "-"))
    ds = g.get("downscale")
    if ds:
        d1 = ds["1"]
        rows.append(("downscale base, 1 GPU: pipeline (s, median)", f"{d1['pipeline_s']:.2f}", "-", "-", "-"))
        rows.append(("  command wall 1 GPU (s, median)", f"{d1['wall_s']:.2f}", "-", "-", "-"))
        for key, label in (("inproc", "in one process (--device cuda:0,...)"), ("torchrun", "under torchrun")):
            dn = ds.get(key)
            if not dn:
                continue
            rows.append((f"downscale base, {n} GPUs {label}: pipeline (s)", f"{dn['pipeline_s']:.2f}",
                         f"1 GPU {d1['pipeline_s']:.2f}", f"{dn['pipeline_s'] / d1['pipeline_s']:.2f}", "<= 0.60"))
            rows.append((f"  command wall (s)", f"{dn['wall_s']:.2f}", f"1 GPU {d1['wall_s']:.2f}",
                         f"{dn['wall_s'] / d1['wall_s']:.2f}", "<= 0.75"))
            rows.append((f"  output vs 1 GPU", "identical" if dn["identical"] else "differs",
                         f"max rel {dn['max_rel_diff']:.1e}", "-", "identical or rounding"))
    return rows


def _table(res: dict[str, Any], gpu: bool) -> str:
    """Format the figures as a fixed-width table (one row per figure)."""
    rows: list[tuple[str, str, str, str, str]] = []
    ds = res["downscale"]
    size = res["size_km"]
    if ds:
        uni = ds["uniform"]
        if "sample_s" in res:  # not with --data
            rows.append((f"sample-data {size} km, 1 yr (s)", f"{res['sample_s']:.1f}", "-", "-", "-"))
        rows.append((f"downscale uniform {size**2:,} km2 (s)", f"{uni['seconds']:.2f}", "-", "-", "I/O limit"))
        for m in [k for k in ds if k != "uniform"]:
            r = ds[m]
            tgt = "< 20 s (10 s)" if gpu and m == "base" else "-"
            rows.append((f"downscale {m} end to end (s)", f"{r['seconds']:.2f}", "20 s" if gpu and m == "base" else "-",
                         f"{r['seconds'] / 20:.2f}" if gpu and m == "base" else "-", tgt))
            rows.append((f"  {m} whole downscale() call (s)", f"{r['wall_with_check']:.2f}",
                         f"uniform {uni['wall_with_check']:.2f}", f"{r['wall_with_check'] / uni['wall_with_check']:.1f}x",
                         "planning + run + file check"))
            rows.append((f"  {m} throughput (km2/s)", f"{r['km2_per_s']:,.0f}", f"uniform {uni['km2_per_s']:,.0f}",
                         f"{r['km2_per_s'] / uni['km2_per_s']:.2f}", ">= 0.50"))
            st = r["stages"]
            rows.append((f"  {m} physics (water-fill) share", f"{st['water_fill']:.2f} s",
                         f"run {r['seconds']:.2f} s", f"{100 * st['water_fill'] / r['seconds']:.1f}%", "< 5%"))
            rows.append((f"  {m} peak host RSS (MB)", f"{r['peak_rss_mb']:,.0f}", "4,096 MB",
                         f"{r['peak_rss_mb'] / 4096:.2f}", "< 1.00"))
            if r.get("child_rss_mb"):
                rows.append((f"  {m} PSS incl. readers ({r['readers']})", f"{r['total_rss_mb']:,.0f}", "4,096 MB",
                             f"{r['total_rss_mb'] / 4096:.2f}", "< 1.00"))
        rows.append(("uniform peak host RSS (MB)", f"{uni['peak_rss_mb']:,.0f}", "4,096 MB",
                     f"{uni['peak_rss_mb'] / 4096:.2f}", "< 1.00"))
        ok = all(r["conservation_ok"] for r in ds.values())
        worst = max(float(r["max_rel_error"] or 0.0) for r in ds.values())
        rows.append(("conservation check (all outputs)", "pass" if ok else "FAIL", f"max rel err {worst:.1e}", "-",
                     "pass"))
    rows += _train_rows(res)
    rows += _gpus_rows(res)
    w = [max(len(r[i]) for r in rows + [("figure", "value", "reference", "ratio", "target")]) for i in range(5)]
    head = ("figure", "value", "reference", "ratio", "target")
    fmt = lambda r: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    lines = [fmt(head), "-" * (sum(w) + 8)] + [fmt(r) for r in rows]
    lines.append("")
    lines.append("stage seconds (CUDA: model, predict_row, blend and water_fill are GPU time between CUDA events, no "
                 "host sync; read: totals, main input and strip assembly in the preparing thread, which waits for the "
                 "strip readers; finish + write: writer thread; read_wait: main thread waiting for prepared tile rows; "
                 "open_feed: reader start-up and pre-warp; loop: the row loop after open_feed):")
    for m, r in ds.items():
        st = r["stages"]
        lines.append(f"  {m:<8} total {r['seconds']:6.2f}  " + "  ".join(f"{k} {v:6.2f}" for k, v in st.items())
                     + f"  tiles {r['tiles']}  {r['precision']}  readers {r['readers']}  GPU MB {r['gpu_peak_mb'] or 0:.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
