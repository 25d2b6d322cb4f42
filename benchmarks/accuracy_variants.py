"""Compare training variants at 100 m on many generated regions, in parallel, and print the table.

Each job is one region (kind, seed) and one variant, run as ``benchmarks/accuracy.py --kinds K
--seeds S --set KEY=JSON ...`` in its own process (``--threads`` torch threads each, ``--procs``
jobs at a time); its row (model / best baseline on held-out cells, Top-1%, R2, the mass gate,
train time; with ``--train-seeds K`` the spread over K weight seeds) is appended to
``OUT/rows.jsonl`` with the variant's name. A second call with the same ``--out`` skips the jobs
already there, so an interrupted comparison resumes. The table compares every variant with the
first on the regions all of them finished: geometric mean of model / best baseline per kind,
regions above 1.0 and at most 0.8, Top-1%, regions where the model's R2 is below the best
baseline's, the spread, train time, and the regions that moved by more than 5 %.

A variant is ``NAME=JSON``: ``TrainConfig`` overrides, model overrides under ``model_overrides``::

    python benchmarks/accuracy_variants.py --out /tmp/cmp --short --procs 8 --seeds 1-16 \\
        --variant default='{}' \\
        --variant wide='{"model_overrides": {"mass_hidden": 32}}'
    python benchmarks/accuracy_variants.py --out /tmp/cmp --table-only   # the table again

``--short`` is the schedule of the session 9-11 tables (1 epoch of 10 steps: the ``mass``
preset's network stays where its prior fit put it). To compare two trees rather than two
variants, run the same command from each tree with its own ``--out`` and pass both row files to
``--table-only --rows A/rows.jsonl B/rows.jsonl`` (the variant names get the file's folder; the
first file's first variant is the reference).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHORT = {"epochs": 1, "steps_per_epoch": 10}


def parse_seeds(text: str) -> list[int]:
    """``"1-4,7"`` -> ``[1, 2, 3, 4, 7]``."""
    seeds: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        seeds.extend(range(int(a), int(b) + 1) if b else [int(a)])
    return seeds


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=JSON`` -> ``(NAME, overrides)``."""
    name, sep, spec = text.partition("=")
    overrides = json.loads(spec) if sep else None
    if not name or not isinstance(overrides, dict):
        raise SystemExit(f"--variant {text!r}: expected NAME=JSON with a JSON object")
    return name, overrides


def job_command(kind: str, seed: int, overrides: dict[str, Any], *, size_km: int, threads: int, train_seeds: int) -> list[str]:
    """The ``accuracy.py`` command line of one job."""
    sets = {"threads": threads, **overrides}
    cmd = [sys.executable, str(HERE / "accuracy.py"), "--kinds", kind, "--seeds", str(seed), "--size-km", str(size_km),
           "--train-seeds", str(train_seeds)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    return cmd


def run_job(kind: str, seed: int, name: str, overrides: dict[str, Any], rows_path: Path, *, size_km: int, threads: int,
            train_seeds: int) -> dict[str, Any]:
    """Run one job and append its row (or its error) to ``rows_path``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(job_command(kind, seed, overrides, size_km=size_km, threads=threads, train_seeds=train_seeds),
                          capture_output=True, text=True, env=env)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if rows:
        row = {**rows[0], "variant": name, "train_seeds": train_seeds}
    else:
        row = {"kind": kind, "seed": seed, "variant": name, "train_seeds": train_seeds,
               "error": (proc.stderr or proc.stdout)[-800:]}
    with open(rows_path, "a") as f:  # one short line per write: whole lines even with several writers
        f.write(json.dumps(row) + "\n")
    return row


def load(paths: list[Path], tag_with_folder: bool = False) -> list[dict[str, Any]]:
    """Rows of one or more ``rows.jsonl`` files (the last row of a job wins)."""
    rows: dict[tuple[str, int, str], dict[str, Any]] = {}
    for p in paths:
        for line in p.read_text().splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                if tag_with_folder:
                    r["variant"] = f"{p.parent.name}:{r['variant']}"
                rows[(r["kind"], int(r["seed"]), r["variant"])] = r
    return list(rows.values())


def compare(rows: list[dict[str, Any]], order: list[str] | None = None, moved: float = 0.05) -> list[str]:
    """The comparison table (lines) on the regions every variant finished without an error."""
    good = [r for r in rows if "error" not in r]
    names = order or list(dict.fromkeys(r["variant"] for r in good))  # first seen first: the reference
    by: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in good:
        by.setdefault((r["kind"], int(r["seed"])), {})[r["variant"]] = r
    common = sorted(k for k, d in by.items() if all(n in d for n in names))
    failed = [r for r in rows if "error" in r]
    out = [f"{len(common)} regions finished by every variant ({', '.join(names)})"
           + (f"; {len(failed)} jobs failed (rows with 'error')" if failed else "")]
    if not common:
        return out
    kinds = sorted({k for k, _ in common})
    head = f"{'variant':16s} " + " ".join(f"{k:>9s}" for k in kinds) + f" {'all':>7s} {'>1.0':>5s} {'<=0.8':>5s} {'top1%':>6s} {'R2<b':>5s} {'spread':>7s} {'train s':>8s}"
    out.append(head)
    for n in names:
        rs = [by[k][n] for k in common]
        per_kind = [statistics.geometric_mean([by[k][n]["ratio"] for k in common if k[0] == kind]) for kind in kinds]
        ratios = [r["ratio"] for r in rs]
        spreads = [r["train_spread"] for r in rs if isinstance(r.get("train_spread"), float) and not math.isnan(r["train_spread"])]
        r2_below = sum(r.get("r2", 0.0) < r.get("r2_baseline", 0.0) for r in rs)
        spread = f"{100 * sum(spreads) / len(spreads):6.1f}%" if spreads else f"{'-':>7s}"
        out.append(f"{n:16s} " + " ".join(f"{v:9.4f}" for v in per_kind)
                   + f" {statistics.geometric_mean(ratios):7.4f} {sum(x > 1.0 for x in ratios):5d} {sum(x <= 0.8 for x in ratios):5d}"
                   f" {statistics.geometric_mean([r['top1_ratio'] for r in rs]):6.3f} {r2_below:5d} {spread} {sum(r['train_s'] for r in rs) / len(rs):8.1f}")
    base = names[0]
    for n in names[1:]:
        changes = [(k, by[k][base]["ratio"], by[k][n]["ratio"]) for k in common]
        big = [c for c in changes if abs(c[2] / c[1] - 1) > moved]
        out.append(f"{n} vs {base}: better by > 1 %: {sum(c[2] < 0.99 * c[1] for c in changes)}, worse by > 1 %: "
                   f"{sum(c[2] > 1.01 * c[1] for c in changes)}, unchanged: {sum(c[2] == c[1] for c in changes)}"
                   + ("; moved by > %d %%: " % round(100 * moved) + ", ".join(f"{k[0]} {k[1]} {a:.3f} -> {b:.3f}" for k, a, b in big) if big else ""))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder of rows.jsonl (created; reused to resume)")
    ap.add_argument("--variant", action="append", default=[], help="NAME=JSON of TrainConfig overrides (repeatable; the first is the reference)")
    ap.add_argument("--kinds", default="points,traffic,urban")
    ap.add_argument("--seeds", default="1-16", help="e.g. 1-16 or 1,2,5")
    ap.add_argument("--size-km", type=int, default=48)
    ap.add_argument("--short", action="store_true", help="1 epoch of 10 steps (the session 9-11 schedule)")
    ap.add_argument("--train-seeds", type=int, default=1, help="train each region K times on one split; the spread is reported")
    ap.add_argument("--procs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--threads", type=int, default=2, help="torch threads per job")
    ap.add_argument("--table-only", action="store_true", help="print the table of the rows already there")
    ap.add_argument("--rows", type=Path, nargs="*", default=None, help="with --table-only: row files of several trees")
    args = ap.parse_args()
    variants = dict(parse_variant(v) for v in args.variant)
    if args.table_only:
        paths = args.rows or [args.out / "rows.jsonl"]
        rows = load(paths, tag_with_folder=len(paths) > 1)
        print("\n".join(compare(rows, None if len(paths) > 1 else (list(variants) or None))))
        return
    if not variants:
        raise SystemExit("give at least one --variant NAME=JSON")
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "rows.jsonl"
    done = {(r["kind"], int(r["seed"]), r["variant"]) for r in (load([rows_path]) if rows_path.exists() else []) if "error" not in r}
    jobs = [(kind, seed, name) for seed in parse_seeds(args.seeds) for kind in args.kinds.split(",") for name in variants
            if (kind, seed, name) not in done]
    print(f"{len(jobs)} jobs ({len(done)} already in {rows_path}), {args.procs} at a time", flush=True)
    with cf.ThreadPoolExecutor(args.procs) as pool:
        futures = [pool.submit(run_job, kind, seed, name, {**(SHORT if args.short else {}), **variants[name]}, rows_path,
                               size_km=args.size_km, threads=args.threads, train_seeds=args.train_seeds)
                   for kind, seed, name in jobs]
        for fut in cf.as_completed(futures):
            r = fut.result()
            status = f"error: {r['error'].strip().splitlines()[-1]}" if "error" in r else f"ratio {r['ratio']:.3f}"
            print(f"{r['kind']} {r['seed']} {r['variant']}: {status}", flush=True)
    print("\n".join(compare(load([rows_path]), list(variants))))


if __name__ == "__main__":
    main()
