"""Accuracy at 100 m against the generator's truth, on held-out cells, for every region kind.

For each kind (``points``, ``traffic``, ``urban``; ``--kinds`` to choose) and seed, this
generates a sample region (``carbonsr sample-data --kind``), trains the model with the given
preset (CPU by default), and scores on the validation windows of the run's split (never
trained on) at child resolution against the hidden truth:

- ``model``: the trained network (best checkpoint);
- ``fitted``: the fitted additive layer mix (popRF-style, fitted on training parent cells);
- ``points``: listed point sources first (``plants.gpkg:co2_t_yr``), remainder by the best layer;
- ``dasymetric``: the best single layer (chosen with the truth: favours the baseline);
- ``uniform``;
- ``floor`` (not a method): the region's noise-free twin (same draws, no per-cell noise)
  shared onto the 1 km totals in proportion: the best placement any method could reach. The
  per-cell noise is part of the truth, so a region whose best baseline is already close to its
  floor leaves no room to beat it by much. It places every plant exactly, also the plants that
  the catalogue ``plants.gpkg`` leaves out, which no method can locate: not reachable;
- ``floor_listed`` (not a method): the reachable floor: the law with the listed plants at their
  sites, unlisted plants unknown. The same twin with the footprint cells of every unlisted plant
  set to 0 (``generate_sample_data(..., noise_free=True, unlisted_plants=False)``), shared onto
  the 1 km totals in proportion: an unlisted plant's mass goes onto its block's surface (the
  law's traffic and heating there) in proportion.

It prints one row per kind and seed with Nonzero-MAE, the ratio model / best baseline
(the smallest of fitted, points and dasymetric), the same ratio for the last trained state
(``latest.pth``: what training reached before the selection kept or replaced it), the Top-1%
ratio (with ``--train-seeds K``: each region trained K times on the same split, and the spread
of the model's score), the R2 of the model and of the best baseline (``R2``, ``R2 b``: over
every held-out child cell, zeros included), the same ratio for what ``downscale --method auto`` would use (the model, or the
baseline that validated best at 1 km when the model did not), the floor's ratio to the best baseline and the share of the baseline's excess error
over the floor that the model removes (``gap closed``: 1 = the floor, 0 = the baseline), and the reachable floor's
ratio to the best baseline (``fl_l/b``, ``floor_listed_ratio`` in the JSON). Also: ``prior``, the
ratio of the untrained network (``prior_model.pth``: what training started from); ``val 1km``,
the run's held-out 1 km validation score that ``auto`` judged; and in the JSON the mass preset's
``mass_gate`` (both initial scores, the strength kept: 0 dropped, 1 in full). Run: ``python benchmarks/accuracy.py [--kinds points,traffic,urban] [--seeds 1,2,3]``
(``--jsonl FILE`` appends each region's row to FILE as it finishes; ``--json FILE`` writes all rows at the end).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carbonsr_cli.checkpoints import load_checkpoint  # noqa: E402
from carbonsr_cli.errors import UsageError  # noqa: E402
from carbonsr_cli.sample_data import generate_sample_data  # noqa: E402
from carbonsr_cli.train.config import TRAIN_PRESETS, TrainConfig  # noqa: E402
from carbonsr_cli.train.loop import evaluate_against_truth, train  # noqa: E402

BASELINES = ("fitted", "points", "dasymetric")


def run_one(kind: str, seed: int, root: Path, *, size_km: int, overrides: dict[str, Any], device: str,
            train_seeds: int = 1) -> dict[str, Any]:
    """Generate, train and score one region; returns the scores and timings. With ``train_seeds``
    > 1, further runs train with other weight seeds on the same split (``split_seed``) and their
    model scores go to ``"repeats"`` (the spread of training alone)."""
    t0 = time.perf_counter()
    sample = generate_sample_data(root / f"{kind}-{seed}", seed=seed, size_km=size_km, kind=kind, overwrite=True)
    cfg = dict(TRAIN_PRESETS["demo"])
    cfg.update(
        main=[str(sample.emissions)],
        aux=[str(p) for p in sample.aux_paths] + [f"{sample.plants}:co2_t_yr"],
        runs_dir=str(root / "runs"),
        name=f"{kind}-{seed}",
        seed=seed,
        split_seed=seed,
        device=device,
    )
    cfg.update(overrides)
    run = train(TrainConfig(**cfg))
    t1 = time.perf_counter()
    repeats = []
    for k in range(1, train_seeds):
        again = train(TrainConfig(**{**cfg, "seed": seed + 1000 * k, "name": f"{kind}-{seed}-w{k}"}))
        repeats.append(evaluate_against_truth(again.best_path or again.last_checkpoint, sample.truth, device=device)["model"])
    expected = generate_sample_data(root / f"{kind}-{seed}-noise-free", seed=seed, size_km=size_km, kind=kind, overwrite=True, noise_free=True)
    listed = generate_sample_data(root / f"{kind}-{seed}-noise-free-listed", seed=seed, size_km=size_km, kind=kind, overwrite=True,
                                  noise_free=True, unlisted_plants=False)
    ckpt = run.best_path or run.last_checkpoint
    # both twins scored in the same pass: the floor, and the one that leaves the unlisted plants out
    scores = evaluate_against_truth(ckpt, sample.truth, device=device,
                                    expected_path={"floor": expected.truth, "floor_listed": listed.truth})
    ck = load_checkpoint(ckpt)
    sel = ck.get("selection") or {}
    chosen = str(sel.get("method", "model"))
    scores["auto"] = {"method": chosen, **(scores["model"] if chosen == "model" else scores["all"].get(chosen, {"nonzero_mae": float("nan")}))}
    scores["train_s"] = t1 - t0
    scores["repeats"] = repeats
    last = run.run_dir / "latest.pth"
    if last.exists():  # the trained state before selection (best_model.pth may be the prior)
        scores["model_last"] = evaluate_against_truth(last, sample.truth, device=device)["model"]
    prior = run.run_dir / "prior_model.pth"
    if prior.exists():  # the untrained network (the fitted prior and the point sites)
        scores["model_prior"] = evaluate_against_truth(prior, sample.truth, device=device)["model"]
    scores["mass_gate"] = ck.get("mass_gate") or {}
    scores["val_score"] = float(sel.get("score", float("nan")))
    scores["initial_val_score"] = run.initial_score if run.initial_score is not None else float("nan")
    return scores


def summarise(kind: str, seed: int, r: dict[str, Any]) -> dict[str, Any]:
    """One table row: the model against the best baseline on held-out cells."""
    base = [b for b in BASELINES if b in r]
    best = min(base, key=lambda b: r[b]["nonzero_mae"])
    m, b = r["model"], r[best]
    floor = r["floor"]["nonzero_mae"]
    floor_listed = r["floor_listed"]["nonzero_mae"] if "floor_listed" in r else float("nan")
    return {
        "kind": kind, "seed": seed, "cells": r["cells"],
        "model": m["nonzero_mae"], **{k: r[k]["nonzero_mae"] for k in (*base, "uniform")},
        "best_baseline": best, "ratio": m["nonzero_mae"] / b["nonzero_mae"],
        "last_ratio": r["model_last"]["nonzero_mae"] / b["nonzero_mae"] if "model_last" in r else float("nan"),
        "prior_ratio": r["model_prior"]["nonzero_mae"] / b["nonzero_mae"] if "model_prior" in r else float("nan"),
        "val_score": r["val_score"], "initial_val_score": r["initial_val_score"], "mass_gate": r.get("mass_gate", {}),
        "top1_ratio": m["top1_nonzero_mae"] / b["top1_nonzero_mae"],
        "r2": m.get("r2", float("nan")), "r2_baseline": b.get("r2", float("nan")),
        "auto": r["auto"]["method"], "auto_ratio": r["auto"]["nonzero_mae"] / b["nonzero_mae"],
        "floor": floor, "floor_ratio": floor / b["nonzero_mae"],
        "floor_listed": floor_listed, "floor_listed_ratio": floor_listed / b["nonzero_mae"],
        "gap_closed": (b["nonzero_mae"] - m["nonzero_mae"]) / (b["nonzero_mae"] - floor) if b["nonzero_mae"] > 1.01 * floor else float("nan"),
        "train_s": r["train_s"],
        "train_spread": _spread([m["nonzero_mae"], *(x["nonzero_mae"] for x in r.get("repeats", []))]),
    }


def _spread(values: list[float]) -> float:
    """``(max - min) / mean`` of the model's scores over training seeds (NaN for one run)."""
    return (max(values) - min(values)) / statistics.mean(values) if len(values) > 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default="points,traffic,urban")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--size-km", type=int, default=48)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", action="append", default=[], help="TrainConfig override KEY=JSON (repeatable)")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--jsonl", help="append each region's row to this file (one JSON line) as it finishes")
    ap.add_argument("--train-seeds", type=int, default=1,
                    help="train each region this many times (weight seeds SEED + 1000 k, same split) and print the spread")
    args = ap.parse_args()
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                try:
                    r = run_one(kind, seed, Path(tmp), size_km=args.size_km, overrides=overrides, device=args.device,
                                train_seeds=args.train_seeds)
                except UsageError as exc:  # e.g. a split that leaves no training patch on a small region
                    print(f"{kind} seed {seed}: skipped ({exc})", flush=True)
                    continue
                rows.append(summarise(kind, seed, r))
                print(json.dumps(rows[-1]), flush=True)
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(rows[-1]) + "\n")
    print()
    print(f"{'kind':8s} {'seed':>4s} {'model':>9s} {'fitted':>9s} {'points':>9s} {'dasy':>9s} {'uniform':>9s} {'floor':>9s} {'floor_l':>9s} "
          f"{'ratio':>6s} {'prior':>6s} {'last':>6s} {'top1':>6s} {'R2':>6s} {'R2 b':>6s} {'auto':>6s} {'val 1km':>7s} {'floor/b':>7s} {'fl_l/b':>7s} {'gap':>6s} {'train s':>7s}")
    for r in rows:
        print(f"{r['kind']:8s} {r['seed']:4d} {r['model']:9.4g} {r.get('fitted', float('nan')):9.4g} {r.get('points', float('nan')):9.4g} "
              f"{r['dasymetric']:9.4g} {r['uniform']:9.4g} {r['floor']:9.4g} {r['floor_listed']:9.4g} {r['ratio']:6.3f} {r['prior_ratio']:6.3f} {r['last_ratio']:6.3f} {r['top1_ratio']:6.3f} {r['r2']:6.3f} {r['r2_baseline']:6.3f} "
              f"{r['auto_ratio']:6.3f} {r['val_score']:7.3f} {r['floor_ratio']:7.3f} {r['floor_listed_ratio']:7.3f} {r['gap_closed']:6.2f} {r['train_s']:7.1f}")
    for kind in args.kinds.split(","):
        ratios = [r["ratio"] for r in rows if r["kind"] == kind]
        if not ratios:
            continue
        of_kind = [r for r in rows if r["kind"] == kind]
        print(f"{kind}: ratio model / best baseline mean {statistics.mean(ratios):.3f} (max {max(ratios):.3f}); "
              f"floor / best baseline mean {statistics.mean(r['floor_ratio'] for r in of_kind):.3f}; geometric means: "
              f"model {statistics.geometric_mean(ratios):.3f}, floor {statistics.geometric_mean(r['floor_ratio'] for r in of_kind):.3f}, "
              f"floor_listed {statistics.geometric_mean(r['floor_listed_ratio'] for r in of_kind):.3f} "
              f"(regions above 0.8 of {len(of_kind)}: floor {sum(r['floor_ratio'] > 0.8 for r in of_kind)}, "
              f"floor_listed {sum(r['floor_listed_ratio'] > 0.8 for r in of_kind)})")
    if args.train_seeds > 1:
        print(f"spread of the model's 100 m Nonzero-MAE over {args.train_seeds} training seeds on the same split, (max - min) / mean: "
              + ", ".join(f"{r['kind']} {r['seed']} {r['train_spread']:.1%}" for r in rows))
    if rows:
        print(f"all: geometric mean of the ratios {statistics.geometric_mean(r['ratio'] for r in rows):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
