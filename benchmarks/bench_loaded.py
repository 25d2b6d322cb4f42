"""Model downscale on a shared machine: loaded vs quiet, as a ratio (issue 18, item 7).

Runs ``carbonsr downscale`` (tiny model, untrained weights: the cost is the same) on the sample
region twice: on a quiet machine, and while ``--busy`` other processes spin on the CPUs (as two
other developers' jobs would). Each run is a fresh process, as a user's command is. Thread pools
are sized from the CPUs the process may use (``carbonsr_cli.cpus.available_cpus``); compare with
``--omp N`` (sets ``OMP_NUM_THREADS``) or an older checkout to see the oversubscription cost.

    python benchmarks/bench_loaded.py --size-km 96 --busy 2 --repeat 2

Prints one line per condition and the loaded/quiet ratio; with N busy processes on C CPUs a
fair share gives about (N + 1) / C x the quiet time when N >= C (1.5x for 2 busy on 2 cores).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _spin(stop: mp.Event) -> None:  # type: ignore[valid-type]
    x = 0
    while not stop.is_set():  # type: ignore[attr-defined]
        for _ in range(100_000):
            x += 1


def _run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-km", type=int, default=96)
    ap.add_argument("--busy", type=int, default=2, help="Busy processes while loaded.")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--omp", type=int, default=None, help="Set OMP_NUM_THREADS for the downscale runs.")
    args = ap.parse_args()

    from bench_downscale import _make_checkpoint

    from carbonsr_cli.aux import discover_aux, layer_names
    from carbonsr_cli.cpus import available_cpus
    from carbonsr_cli.sample_data import generate_sample_data

    work = Path(tempfile.mkdtemp(prefix="carbonsr-bench-loaded-"))
    sd = generate_sample_data(work / "data", size_km=args.size_km)
    ckpt = _make_checkpoint(work / "tiny.pth", "tiny", layer_names(discover_aux([sd.aux_dir])), 1)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("OMP_NUM_THREADS", None)
    if args.omp:
        env["OMP_NUM_THREADS"] = str(args.omp)
    cmd = [sys.executable, "-m", "carbonsr_cli.cli", "downscale", str(sd.emissions), "--aux", str(sd.aux_dir),
           "--model", str(ckpt), "-o", str(work / "out.tif"), "--overwrite", "-q", "--device", "cpu"]
    _run(cmd, env)  # warm the file cache and the imports

    quiet = [_run(cmd, env) for _ in range(args.repeat)]
    stop = mp.Event()
    busy = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for p in busy:
        p.start()
    try:
        loaded = [_run(cmd, env) for _ in range(args.repeat)]
    finally:
        stop.set()
        for p in busy:
            p.join(5)
    q, ld = statistics.median(quiet), statistics.median(loaded)
    print(f"cpus available {available_cpus()} (os.cpu_count {os.cpu_count()}), region {args.size_km} km, "
          f"OMP_NUM_THREADS {env.get('OMP_NUM_THREADS', 'unset')}")
    print(f"quiet  {q:7.2f} s  (runs: {', '.join(f'{v:.2f}' for v in quiet)})")
    print(f"loaded {ld:7.2f} s  with {args.busy} busy processes (runs: {', '.join(f'{v:.2f}' for v in loaded)})")
    print(f"ratio loaded/quiet {ld / q:.2f}")


if __name__ == "__main__":
    main()
