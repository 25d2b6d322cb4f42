"""How much of the fitted layer mix's 100 m error comes from where it is fitted (issue 17, session 13).

Generates one region (``carbonsr sample-data --kind``), trains the default model briefly to get
the run's split (the same as ``benchmarks/accuracy.py``), then rebuilds the generator's own
fields (road length per class, population, built-up, urban intensity) and scores, on the held-out
windows at 100 m (year 1, Nonzero-MAE / uniform's):

- ``full law``: the generator's expected field (no per-cell noise, no plants), shared onto the
  1 km totals: what a method that knew the law would reach;
- ``additive fit on ...``: the layer mix of ``models.dasymetric.fit_prior`` on the generator's
  layers (each road class, population, built-up; pixel and 3 x 3 means; powers 0.5, 1, 2),
  fitted on the parent cells outside the validation region dilated by ``B`` cells (the split's
  buffer, 1, 0), on every cell, and on the held-out cells alone (in-sample references);
- the street length per class in the fitting area and in the held-out area.

Meant for the ``traffic`` and ``urban`` kinds: on ``points`` the plants, which the law here
leaves out, hold most of the mass. The run stops with an error when the rebuilt law loses to a
fitted mix (the fields were not drawn as the generator draws them).

Run: ``python benchmarks/fit_area_diagnostic.py --kind traffic --seed 1`` (about 20-40 s on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carbonsr_cli import sample_data as sd  # noqa: E402
from carbonsr_cli import sample_world as sw  # noqa: E402
from carbonsr_cli.train.split import Split  # noqa: E402


def _blocks(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape
    return a.reshape(h // f, f, w // f, f).sum(axis=(1, 3))


def _up(a: np.ndarray, f: int) -> np.ndarray:
    return np.repeat(np.repeat(a, f, 0), f, 1)


def _box3(a: np.ndarray) -> np.ndarray:
    import torch

    t = torch.from_numpy(a.astype(np.float32))[None, None, None]
    return torch.nn.functional.avg_pool3d(t, (1, 3, 3), 1, (0, 1, 1), count_include_pad=False)[0, 0, 0].numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", default="traffic")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size-km", type=int, default=48)
    args = ap.parse_args()
    import rasterio

    from carbonsr_cli.checkpoints import load_checkpoint
    from carbonsr_cli.train.config import TRAIN_PRESETS, TrainConfig
    from carbonsr_cli.train.loop import train
    from models.dasymetric import fit_prior

    kind, seed, km, f = args.kind, args.seed, args.size_km, sw.FACTOR
    root = Path(tempfile.mkdtemp())
    sample = sd.generate_sample_data(root / "data", seed=seed, size_km=km, kind=kind)
    cfg = dict(TRAIN_PRESETS["demo"])
    cfg.update(main=[str(sample.emissions)], aux=[str(p) for p in sample.aux_paths] + [f"{sample.plants}:co2_t_yr"],
               runs_dir=str(root / "runs"), name="split", seed=seed, split_seed=seed, device="cpu", epochs=1, steps_per_epoch=1,
               progress=False)
    run = train(TrainConfig(**cfg))
    split = Split.from_dict(load_checkpoint(run.best_path or run.last_checkpoint)["split"])

    with rasterio.open(sample.truth) as src:
        truth = src.read(1).astype(np.float64)
        valid = truth != src.nodata
    truth[~valid] = 0
    # The generator's fields, drawn again from the same seed (its first draws).
    params = sw.KINDS[kind]
    rng = np.random.Generator(np.random.PCG64(seed))
    m, n_child = sw._MARGIN, km * f
    ne = n_child + 2 * m
    ext = sw._from_origin(sw._X_CENTRE - km * sw.PARENT_RES_M / 2 - m * sw.CHILD_RES_M, sw._Y_TOP + m * sw.CHILD_RES_M,
                          sw.CHILD_RES_M, sw.CHILD_RES_M)
    world = sw._make_world(rng, ne, ext, params["lattice_cells"])
    inner = (slice(m, m + n_child), slice(m, m + n_child))
    allowed = ~np.isin(world.landcover, (20, 80)) & ~world.sea
    climate = (1.0 + 0.5 * (1.0 - np.arange(ne, dtype=np.float32) / ne))[:, None]
    heating = 0.8 * np.power(world.population, 0.75) * climate * params["heating"]
    traffic = sw._blur((world.road_weight * (1 + 1.5 * world.urban)).astype(np.float32), np.array([0.25, 0.5, 0.25])) * params["traffic"]
    law = np.where(allowed, traffic + heating, 0)[inner]

    totals = _blocks(truth, f)
    held_out = split.val_mask()
    scored = _up(held_out, f) & valid & (truth > 0)

    def error(weights: np.ndarray) -> float:
        w = np.asarray(weights, np.float64) * valid
        wb = _up(_blocks(w, f), f)
        share = np.where(wb > 0, w / np.maximum(wb, 1e-30), 1.0 / f**2)
        return float(np.abs(share * _up(totals, f) - truth)[scored].mean())

    layers = {c: sw._rasterize_lines(world.roads[c], 1.0, ne) for c in sw.ROAD_WEIGHTS}
    layers.update(population=world.population, builtup=world.builtup)
    feats = []
    for a in layers.values():
        a = a / max(float(a[a > 0].mean()), 1e-9)
        for ak in (a, _box3(a)):
            feats.extend((ak**p)[inner] * valid for p in (0.5, 1.0, 2.0))
    x = np.stack(feats, -1)
    phi = x.reshape(km, f, km, f, -1).sum(axis=(1, 3)).reshape(km * km, -1)
    n = _blocks(valid.astype(np.float64), f).ravel()
    uniform = error(np.ones_like(truth))
    rows = [("full law (the generator's expected field)", error(law))]
    areas = [(f"outside validation + {b} cells", ~split.forbidden_mask(b)) for b in (split.buffer, 1, 0)]
    areas += [("every cell (in-sample)", np.ones_like(held_out)), ("held-out cells only (in-sample)", held_out)]
    for name, area in areas:
        t = np.where(area & (totals > 0), totals, np.nan).ravel()
        coef, floor = fit_prior(phi, n, t)
        rows.append((f"additive fit on {name} ({int((area & (totals > 0)).sum())} nonzero cells)", error(x @ coef + floor * valid)))
    if rows[0][1] > 1.05 * min(v for _, v in rows[1:]):  # the fields are drawn again from the seed
        raise SystemExit(f"the generator's law ({rows[0][1] / uniform:.3f} x uniform) loses to a fitted mix: its fields "
                         "were not rebuilt (did sample_world's draw order change?)")
    print(f"{kind} seed {seed}, {km} km: held-out windows {int(held_out.sum())} parent cells; Nonzero-MAE / uniform ({uniform:.4g})")
    for name, v in rows:
        print(f"  {v / uniform:6.3f}  {name}")
    fit_area = ~split.forbidden_mask()
    for c in sw.ROAD_WEIGHTS:
        length = _blocks(layers[c][inner] * valid, f)
        print(f"  {c:12s} street length (100 m cells): fitting area (split buffer) {length[fit_area].sum():7.0f}, "
              f"its buffer {length[~fit_area & ~held_out].sum():7.0f}, held-out {length[held_out].sum():7.0f}")


if __name__ == "__main__":
    main()
