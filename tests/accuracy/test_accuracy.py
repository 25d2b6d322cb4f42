"""Accuracy cannot drift silently: 100 m scores against the generator's truth on held-out cells.

For each generated kind (point-source dominated, street/traffic dominated, smooth urban), a
36 x 36 km region is generated, the default model (``demo`` schedule: ``--preset mass``; its
per-pixel correction is dropped on all three 36 km regions) is trained briefly on the CPU (deterministic),
and the model, the fitted layer mix and the best single-layer dasymetric are scored on the
run's validation windows (never trained on) at 100 m (``evaluate_against_truth``).

Asserted (measured with the session-7 point sites - point-cell weight, local-contrast signature,
unlisted sources - seed 1: model / best baseline = points 0.686, traffic 0.867, urban 0.931; since session 13, the fits
using every parent cell outside the validation region: 0.686, 0.705, 0.922; see benchmarks/README.md for the 3-seed table of
``benchmarks/accuracy.py``), with a little room for thread-order rounding:
- the model is at most ``MODEL_VS_BEST[kind]`` x the best built-in baseline. The model is no
  longer the fitted mix itself (its surface is fitted on cells without a listed point and the
  listed points take their cells' surplus on their sites), so it can lose a little where the
  mix happens to be better: urban is allowed 1.02;
- what ``--method auto`` uses scores within the same bound (it is the model on all three);
- the model's R2 at 100 m is not below the best baseline's (issue 17's target);
- the fitted layer mix beats uniform on every kind, and beats the best single layer (chosen with
  the truth, which favours it) where the emissions follow a mix of layers (traffic: 15.8 vs 27.0).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from carbonsr_cli.checkpoints import load_checkpoint
from carbonsr_cli.sample_data import generate_sample_data
from carbonsr_cli.train.config import TRAIN_PRESETS, TrainConfig
from carbonsr_cli.train.loop import evaluate_against_truth, train

#: Upper bounds of (model / best baseline) per kind at 36 km, seed 1 (measured 0.686, 0.705, 0.922;
#: traffic was 0.867 with the fits kept one patch away from the validation region).
MODEL_VS_BEST = {"points": 0.8, "traffic": 0.78, "urban": 1.0}
#: Upper bounds of (fitted / best single layer) per kind, a little above the measured values.
FITTED_VS_LAYER = {"points": 1.0, "traffic": 0.7, "urban": 1.0}
#: Upper bound of (mass preset / best baseline) on the traffic kind, 48 km, seed 2 (measured 0.540
#: since session 13: model 4.02, fitted mix 7.45 now that it is fitted on the buffer's cells too;
#: 0.441 before (model 3.84, mix 8.71) with the correction fitted in 600 steps, 0.445 with 300
#: before session 11; kept in full).
MASS_VS_BEST = 0.6
#: Upper bound of (mass preset / best baseline) on traffic, 48 km, seed 3, where the gate keeps a
#: part of the correction (measured 0.436 since session 13, kept at 0.29 of its strength; 0.301
#: before, fitted on fewer cells and kept at 0.87; 0.445 with 300 steps, kept at 0.36; 0.585 when
#: the correction is dropped).
MASS_PARTIAL_VS_BEST = 0.48


def _train_and_score(tmp_path: Path, kind: str, seed: int, size_km: int, **overrides: object) -> tuple[dict, float, float]:
    """Generate a region, train on the CPU (the demo preset with ``overrides``) and score the best
    checkpoint on the run's held-out windows at 100 m (the truth doubles as the floor's field).

    Returns:
        ``(scores, model Nonzero-MAE, best built-in baseline's Nonzero-MAE)``.
    """
    sample = generate_sample_data(tmp_path / "data", seed=seed, size_km=size_km, kind=kind)
    cfg = dict(TRAIN_PRESETS["demo"])
    cfg.update(
        main=[str(sample.emissions)], aux=[str(p) for p in sample.aux_paths] + [f"{sample.plants}:co2_t_yr"],
        runs_dir=str(tmp_path / "runs"), name=kind, seed=seed, device="cpu", threads=2, **overrides,
    )
    run = train(TrainConfig(**cfg))
    assert run.best_path is not None
    # two named fields, scored in the same pass (benchmarks/accuracy.py scores two twins this way)
    r = evaluate_against_truth(run.best_path, sample.truth, expected_path={"floor": sample.truth, "floor_again": sample.truth})
    ck = load_checkpoint(run.best_path)
    chosen = str(ck["selection"]["method"])  # what --method auto uses
    r["mass_gate"] = ck.get("mass_gate") or {}
    r["auto"] = {"method": chosen, **(r["model"] if chosen == "model" else r["all"][chosen])}
    best = min(r[k]["nonzero_mae"] for k in ("fitted", "points", "dasymetric", "uniform") if k in r)
    return r, r["model"]["nonzero_mae"], best


@pytest.mark.parametrize("kind", ["points", "traffic", "urban"])
def test_model_against_the_best_baseline_at_100m(kind: str, tmp_path: Path) -> None:
    r, model, best = _train_and_score(tmp_path, kind, 1, 36, epochs=3, steps_per_epoch=30)
    baselines = {k: r[k]["nonzero_mae"] for k in ("fitted", "points", "dasymetric", "uniform") if k in r}
    assert r["cells"] > 10_000
    assert r["floor"]["nonzero_mae"] < 1e-6 * best  # the truth shared onto its own totals is itself
    assert r["floor_again"] == r["floor"]
    best_name = min(baselines, key=baselines.get)
    print(f"{kind} 36 km seed 1: model {model:.4g}, best baseline {best:.4g} ({best_name}), ratio {model / best:.3f}, "
          f"R2 model {r['model']['r2']:.4f}, baseline {r[best_name]['r2']:.4f}")
    assert model <= MODEL_VS_BEST[kind] * best, (kind, model, baselines)
    # issue 17: R2 not worse than the best baseline's (measured: points 0.820 vs 0.516, traffic
    # 0.957 vs -0.028, urban 0.063 vs 0.004; over all child cells, so one plant weighs a lot)
    assert r["model"]["r2"] >= r[best_name]["r2"], (kind, r["model"]["r2"], best_name, r[best_name]["r2"])
    # --method auto must not hand a region where the model wins at 100 m back to a baseline (the
    # 1 km validation favours the fitted mix; session 8: every street region went to it).
    assert r["auto"]["nonzero_mae"] <= MODEL_VS_BEST[kind] * best, (kind, r["auto"], baselines)
    assert baselines["fitted"] < baselines["uniform"], (kind, baselines)
    assert baselines["fitted"] <= FITTED_VS_LAYER[kind] * baselines["dasymetric"], (kind, baselines)


def test_mass_preset_beats_the_fitted_mix_on_a_street_dominated_region(tmp_path: Path) -> None:
    """``--preset mass``: the per-pixel correction learns the products of layers that traffic
    emissions follow (road class x urban intensity, nothing over forest), at 100 m on held-out cells."""
    r, model, best = _train_and_score(tmp_path, "traffic", 2, 48, epochs=1, steps_per_epoch=10, preset="mass")
    fitted = r["fitted"]["nonzero_mae"]
    print(f"mass preset, traffic 48 km seed 2: model {model:.4g}, fitted {fitted:.4g}, ratio {model / best:.3f}")
    assert r["mass_gate"]["kept"], r["mass_gate"]
    assert model <= MASS_VS_BEST * best, (model, fitted, best)


def test_mass_preset_drops_a_correction_that_is_barely_better_than_the_mix(tmp_path: Path) -> None:
    """Urban, 48 km, seed 2: the correction validated 0.97 x the mix at 1 km and cost 6 % at 100 m
    when kept (0.723 x the best baseline, the rule before session 8: below 0.95 x the best
    baseline). Kept in part only below 0.90 x the mix, it is dropped: 0.681."""
    r, model, best = _train_and_score(tmp_path, "urban", 2, 48, epochs=1, steps_per_epoch=10, preset="mass")
    print(f"mass preset, urban 48 km seed 2: gate {r['mass_gate']}, ratio {model / best:.3f}")
    assert not r["mass_gate"]["kept"], r["mass_gate"]
    assert model <= 0.70 * best, (model, best)


def test_mass_preset_scales_a_correction_between_the_gate_thresholds(tmp_path: Path) -> None:
    """Traffic, 48 km, seed 3: the correction validates between the gate's 0.80 (kept in full) and
    0.90 x the mix at 1 km (dropped): 0.871 x since session 13 (the fits use the split buffer's
    cells too), kept at 0.29 of its strength, 0.436 x the best baseline; 0.813 x in session 11
    (fitted in 600 steps on fewer cells), kept at 0.87, 0.301; fitted in 300 steps it validated
    0.864 x, was kept at 0.36 and measured 0.445 (0.470 after 6 epochs; dropped, as session 8's
    hard 0.85 threshold did: 0.585)."""
    r, model, best = _train_and_score(tmp_path, "traffic", 3, 48, epochs=1, steps_per_epoch=10, preset="mass")
    gate = r["mass_gate"]
    print(f"mass preset, traffic 48 km seed 3: gate {gate}, ratio {model / best:.3f}")
    assert 0.0 < gate["strength"] < 1.0, gate
    assert model <= MASS_PARTIAL_VS_BEST * best, (model, best)


def test_point_sites_win_on_a_point_dominated_region(tmp_path: Path) -> None:
    """Listed plants take their cells' surplus on their sites: on the points kind (48 km, seed 1,
    a listed plant with three 100 m cells in the held-out area) the model beats "points first"
    (which places the listed figure on the one cell of the point) and the fitted mix (which
    spreads a plant's mass over every layer present). Measured 0.299 (the point's own cell weighing
    2 in its site, unlisted sources; equal shares: 0.673; the mix alone: 2.55)."""
    r, model, best = _train_and_score(tmp_path, "points", 1, 48, epochs=1, steps_per_epoch=10)
    print(f"point sites, points 48 km seed 1: model {model:.4g}, best baseline {best:.4g}, ratio {model / best:.3f}")
    assert model <= 0.4 * best, (model, {k: r[k]["nonzero_mae"] for k in ("fitted", "points", "dasymetric")})


def test_unlisted_sources_do_not_teach_a_sparse_layer_their_mass(tmp_path: Path) -> None:
    """Urban, 48 km, seed 8: two training cells far above the surface (an unlisted plant) made a
    motorway column take 88 % of the city blocks it crosses in the held-out area (model 7.02,
    3.1 x the best single layer). The surface is now fitted again without such cells: 1.98
    (0.877 x). Since session 13 the fits also use the cells of the split's buffer, and the
    fitted mix (4.60 before, on fewer cells) no longer falls into that trap either: model and
    mix measure 1.775 (0.786 x the best single layer), so the bound is on the single layer and
    the model must not lose to the mix."""
    r, model, best = _train_and_score(tmp_path, "urban", 8, 48, epochs=1, steps_per_epoch=10)
    layer = min(r[k]["nonzero_mae"] for k in ("points", "dasymetric"))
    print(f"outlier cells left out, urban 48 km seed 8: model {model:.4g}, best baseline {best:.4g}, best single layer {layer:.4g}, "
          f"ratio {model / best:.3f}")
    assert model <= 0.85 * layer, (model, {k: r[k]["nonzero_mae"] for k in ("fitted", "points", "dasymetric")})
    assert model <= 1.01 * r["fitted"]["nonzero_mae"], (model, r["fitted"]["nonzero_mae"])
