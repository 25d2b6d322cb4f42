"""Where a training step's time goes, on one GPU or under torchrun (issue 21).

Runs ``loop.train`` (``base``, T = 3, bf16, 2 epochs of STEPS steps, the U-Net compiled unless
``PROBE_COMPILE=off``) on a ``carbonsr sample-data`` folder and records, per rank, the wall time
per step over epoch 0's steps 10..STEPS-10 and epoch 1's steps STEPS+10..2*STEPS-10 (the GPU
synchronised at those marks only), the host time spent inside each step (median, p90: on an
H200 the step is host-bound when this is close to the step time), the loop's own
``RunResult.throughput`` and, with ``PROBE_PROFILE=1``, a ``torch.profiler`` table and trace of
steps STEPS+40..STEPS+45::

    CUDA_VISIBLE_DEVICES=0 python benchmarks/train_probe.py NAME 32 100 OUT_PREFIX DATA
    torchrun --nproc-per-node 2 benchmarks/train_probe.py NAME 64 100 OUT_PREFIX DATA

BATCH is the global batch. Writes ``OUT_PREFIX.r<rank>.json`` (and ``.prof.txt``,
``.trace.json.gz``); prints one ``PROBE {...}`` line per rank. Switches for measurement only
(environment): ``PROBE_OPTDDP=0`` (Dynamo's DDP optimiser off), ``PROBE_WSUM=local`` (skip the
loss weight's all-reduce: the loss is then wrong), ``PROBE_DEVICE=cpu``, ``PROBE_FORCE_DDP=1`` (under ``torchrun
--nproc-per-node 1``: DDP with one rank, i.e. DDP's own cost without a second GPU). Tables:
benchmarks/README.md, "Several GPUs (issue 21), session 14".
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def main() -> None:
    import torch

    name, batch, steps, out, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    env = os.environ.get
    if env("PROBE_OPTDDP", "1") == "0":
        torch._dynamo.config.optimize_ddp = False
    import carbonsr_cli.train.step as step_mod
    from carbonsr_cli import distributed
    from carbonsr_cli.train.config import TrainConfig
    from carbonsr_cli.train.loop import train

    if env("PROBE_FORCE_DDP") == "1":  # the context (and DDP) on with WORLD_SIZE=1
        distributed.in_torchrun = lambda: "RANK" in os.environ
    rank, world = int(env("RANK", "0")), int(env("WORLD_SIZE", "1"))
    rec: dict[str, Any] = {"name": name, "rank": rank, "world": world, "batch": batch,
                           "env": {k: v for k, v in os.environ.items() if k.startswith("PROBE_")}}
    host_ms: list[float] = []
    marks: dict[int, float] = {}
    count = [0]
    prof: list[Any] = [None]
    if env("PROBE_WSUM") == "local":
        plain_sum = distributed.DistContext.all_reduce_sum

        def local_sum(self: Any, t: Any) -> Any:
            if torch.is_tensor(t) and t.is_cuda and t.numel() == 1:
                return t * self.world_size  # measurement only: the per-step weight all-reduce skipped
            return plain_sum(self, t)

        distributed.DistContext.all_reduce_sum = local_sum
    a0, a1, b0, b1 = 10, steps - 10, steps + 10, 2 * steps - 10
    plain_step = step_mod._step

    def timed_step(model: Any, *a: Any, **k: Any) -> Any:
        i = count[0]
        count[0] += 1
        dev = k["device"]
        if i in (a0, a1, b0, b1):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            marks[i] = time.perf_counter()
        if env("PROBE_PROFILE") == "1" and i == steps + 40:
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            prof[0] = torch.profiler.profile(activities=acts)
            prof[0].__enter__()
        t = time.perf_counter()
        r = plain_step(model, *a, **k)
        host_ms.append(1e3 * (time.perf_counter() - t))
        if prof[0] is not None and i == steps + 45:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            p, prof[0] = prof[0], None
            p.__exit__(None, None, None)
            key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            with open(f"{out}.r{rank}.prof.txt", "w") as f:
                f.write(p.key_averages().table(sort_by=key, row_limit=40) + "\n\n")
                f.write(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
            p.export_chrome_trace(f"{out}.r{rank}.trace.json")
            with open(f"{out}.r{rank}.trace.json", "rb") as src, gzip.open(f"{out}.r{rank}.trace.json.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.remove(f"{out}.r{rank}.trace.json")
        return r

    step_mod._step = timed_step
    runs = f"/tmp/carbonsr_probe_runs/{name}w{world}"
    cfg = TrainConfig(main=[f"{data}/emissions_1km.tif"], aux=[f"{data}/aux"], preset="base", years_window=3,
                      batch_size=batch, epochs=2, steps_per_epoch=steps, precision="bf16",
                      device=env("PROBE_DEVICE", "cuda"), runs_dir=os.path.dirname(runs), name=os.path.basename(runs),
                      compile=env("PROBE_COMPILE", "on"), workers=2, progress=False, patience=0, seed=0,
                      autosave_every=10**9, snapshot_every=10**9, max_val_windows=256)
    if rank == 0:
        shutil.rmtree(runs, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        res = train(cfg)
        rec["result"] = {"throughput": res.throughput, "best": res.best_score,
                         "hist": [(h["epoch"], h["val_score"]) for h in res.history]}
    except BaseException as exc:  # noqa: BLE001 - recorded, not raised: the other ranks' records still come
        rec["error"] = f"{type(exc).__name__}: {exc}"
    rec["wall_s"] = time.perf_counter() - t0
    for label, (s0, s1) in (("ep0", (a0, a1)), ("ep1", (b0, b1))):
        if s0 in marks and s1 in marks:
            rec[f"{label}_ms_per_step"] = 1e3 * (marks[s1] - marks[s0]) / (s1 - s0)
            rec[f"{label}_patches_s"] = batch * (s1 - s0) / (marks[s1] - marks[s0])
    rest = host_ms[20:]
    rec["host_ms_median"] = _median(rest)
    rec["host_ms_p90"] = sorted(rest)[int(0.9 * len(rest))] if rest else None
    with open(f"{out}.r{rank}.json", "w") as f:
        json.dump(rec, f)
    print("PROBE", json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
