"""End-to-end training on the sample data: every checkpoint kind, spatial split, refusals."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from carbonsr_cli.train.config import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from helpers import small_config  # noqa: E402

from carbonsr_cli.errors import CheckpointError, MissingInputError, UsageError  # noqa: E402
from carbonsr_cli import checkpoints as ck  # noqa: E402


@pytest.fixture(scope="module")
def finished_run(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from carbonsr_cli.train.loop import train

    runs = tmp_path_factory.mktemp("runs")
    result = train(small_config(sample_dir, runs, name="e2e"))
    return result


def test_every_checkpoint_kind(finished_run) -> None:
    d = finished_run.run_dir
    assert finished_run.stopped == "completed" and finished_run.global_step == 6 and finished_run.epochs_done == 2
    names = {p.name for p in d.iterdir()}
    for expected in (
        "autosave_latest.pth", "autosave_step_4.pth", "autosave_step_6.pth", "latest.pth", "epoch_001.pth",
        "epoch_002.pth", "best_model.pth", "config.json", "stats.json", "split.json", "metrics.csv", "train.log",
        "training_curves.png",
    ):
        assert expected in names, f"{expected} missing from {sorted(names)}"
    assert "autosave_step_2.pth" not in names, "keep_autosaves=2 should have removed the oldest autosave"
    assert not [n for n in names if n.endswith(".tmp")]
    rows = list(csv.DictReader((d / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        assert float(r["s6_model_nonzero_mae"]) > 0 and float(r["s6_dasy_nonzero_mae"]) > 0
        assert r["s6_dasy_layer"] and r["s3_dasy_layer"]
    assert (d / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_model_loads_weights_only(finished_run) -> None:
    path = finished_run.best_path
    raw = torch.load(path, weights_only=True, map_location="cpu")
    for key in (
        "format", "format_version", "software_version", "model_config", "model_state", "aux_names", "stats", "factor",
        "years_window", "train_config", "epoch", "step", "global_step", "optimizer_state", "scheduler_state",
        "scaler_state", "rng_state", "sampler_state", "split", "metric_history", "prior_fit", "selection",
        "initial_val_score",
    ):
        assert key in raw, key
    assert raw["format"] == ck.FORMAT and raw["factor"] == 10 and raw["years_window"] == 1
    # best_model.pth is the fitted prior (epoch 0, empty history) unless an epoch validated
    # select_margin better than it; then it is that epoch.
    scores = [(h["val_score"], h["epoch"]) for h in finished_run.history]
    margin = 1.0 - TrainConfig.from_dict(raw["train_config"]).select_margin
    better = [e for v, e in scores if v < raw["initial_val_score"] * margin]
    if raw["epoch"] == 0:
        assert raw["global_step"] == 0 and raw["metric_history"] == [] and not better
    else:
        assert better and raw["epoch"] == min(scores)[1]
    loaded = ck.load_model_for_inference(path, "cpu")
    assert not loaded.model.training
    assert loaded.aux_names == raw["aux_names"] and len(loaded.aux_names) == loaded.config.aux_channels
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, raw["model_state"][k])
    x = torch.zeros(1, loaded.config.aux_channels, 1, 60, 60)
    out, _ = loaded.model(x, torch.zeros(1, 1, 1, 60, 60))
    assert out.shape == (1, 1, 1, 60, 60) and torch.isfinite(out).all()
    assert len(loaded.sha256) == 64


def test_training_patches_never_touch_validation(finished_run) -> None:
    from carbonsr_cli.train.dataset import PatchSampler, load_main, parse_scales
    from carbonsr_cli.train.split import Split

    raw = ck.load_checkpoint(finished_run.run_dir / "latest.pth")
    split = Split.from_dict(raw["split"])
    cfg = raw["train_config"]
    main = load_main(cfg["main"])
    positions = split.train_positions(main.valid_all_years)
    sampler = PatchSampler(positions, 3, 1, parse_scales(cfg["scales"], cfg["patch"]), cfg["batch_size"], cfg["seed"])
    forbidden = split.forbidden_mask()
    val = split.val_mask()
    p = split.patch
    assert split.val_windows and all(val[r : r + p, c : c + p].all() for r, c in split.val_windows)
    drawn = np.zeros_like(val)
    for epoch in range(cfg["epochs"]):
        for step in range(cfg["steps_per_epoch"]):
            spec = sampler.spec(epoch, step)
            for r, c in zip(spec.rows, spec.cols):
                assert not forbidden[r : r + p, c : c + p].any()
                drawn[r : r + p, c : c + p] = True
    # buffer: at least `buffer` cells between any drawn training cell and any validation cell
    rows, cols = np.nonzero(drawn)
    vr, vc = np.nonzero(val)
    gap = np.maximum(np.abs(rows[:, None] - vr[None]), np.abs(cols[:, None] - vc[None])).min() - 1
    assert gap >= split.buffer
    # the same seed gives the same batch (resume relies on it)
    assert sampler.spec(1, 2) == sampler.spec(1, 2) and sampler.spec(1, 2) != sampler.spec(1, 1)


def test_refuses_different_aux_set(finished_run, sample_dir: Path) -> None:
    from carbonsr_cli.train.loop import train

    cfg = small_config(sample_dir, finished_run.run_dir.parent, aux=[str(sample_dir / "aux" / "population_100m.tif")],
                       resume=str(finished_run.run_dir / "latest.pth"), epochs=3)
    with pytest.raises(CheckpointError, match="aux layers differ") as info:
        train(cfg)
    assert "lights_500m" in info.value.message and "latest.pth" in str(info.value)


def test_cli_usage_errors(sample_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from carbonsr_cli.cli import app

    runner = CliRunner()
    main = str(sample_dir / "emissions_1km.tif")
    res = runner.invoke(app, ["train", main, "--aux", str(sample_dir / "aux"), "--scales", "5", "--runs-dir", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert "scale" in res.output
    res = runner.invoke(app, ["train", main, "--runs-dir", str(tmp_path)])
    assert res.exit_code == 2 and "--aux" in res.output
    res = runner.invoke(app, ["resume", "--runs-dir", str(tmp_path / "none")])
    assert res.exit_code == 1 and "runs directory" in res.output  # a missing directory: exit 1
    res = runner.invoke(app, ["train", "--help"])
    assert res.exit_code == 0 and "Example: carbonsr train" in res.output


def test_parse_scales() -> None:
    from carbonsr_cli.train.dataset import parse_scales

    assert parse_scales("12,4,2") == pytest.approx({12: 1 / 3, 4: 1 / 3, 2: 1 / 3})
    assert parse_scales("12:0.5,4:0.25,2:0.25") == {12: 0.5, 4: 0.25, 2: 0.25}
    for bad in ("5", "1", "12:-1", "x"):
        with pytest.raises(UsageError):
            parse_scales(bad)


def test_degrade_conserves_and_broadcasts() -> None:
    from carbonsr_cli.train.dataset import degrade

    truth = np.random.default_rng(0).gamma(0.5, 10, size=(2, 1, 1, 12, 12)).astype(np.float32)
    for s in (12, 4, 3, 2):
        totals, main = degrade(truth, s, 10)
        assert totals.shape == (2, 1, 1, 12 // s, 12 // s) and main.shape == (2, 1, 1, 120, 120)
        assert np.allclose(totals.sum(axis=(-2, -1)), truth.astype(np.float64).sum(axis=(-2, -1)))
        child = np.expm1(main.astype(np.float64))
        blocks = child.reshape(2, 1, 1, 12 // s, s * 10, 12 // s, s * 10).sum(axis=(-3, -1))
        assert np.allclose(blocks, totals, rtol=1e-5)


def test_resume_helpers(tmp_path: Path) -> None:
    from carbonsr_cli.train.resume import find_latest_run, list_checkpoints, newest_checkpoint, resolve_resume

    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    base = {"model_config": {}, "model_state": {}, "aux_names": [], "stats": {}, "factor": 10, "years_window": 1}
    ck.save_checkpoint(run / "latest.pth", {**base, "epoch": 2, "step": 0, "global_step": 20, "metric_history": [{"val_score": 3.0}]})
    ck.save_checkpoint(run / "autosave_latest.pth", {**base, "epoch": 2, "step": 4, "global_step": 24})
    ck.save_checkpoint(run / "best_model.pth", {**base, "epoch": 3, "step": 0, "global_step": 30})
    (run / "autosave_step_28.pth").write_text("garbage")  # unreadable: skipped
    assert find_latest_run(tmp_path / "runs") == run
    assert newest_checkpoint(run).name == "autosave_latest.pth"  # best_model is never the resume point
    assert [i.path.name for i in list_checkpoints(run)][0] == "best_model.pth"
    assert resolve_resume("latest", tmp_path / "runs") == run / "autosave_latest.pth"
    assert resolve_resume(str(run), tmp_path / "runs") == run / "autosave_latest.pth"
    assert resolve_resume("auto", tmp_path / "empty") is None
    with pytest.raises(MissingInputError):
        resolve_resume("latest", tmp_path / "empty")


def test_cli_resume_continues_run(finished_run) -> None:
    """`carbonsr resume RUN --epochs 3` (not a TTY: newest checkpoint) trains one more epoch."""
    from typer.testing import CliRunner

    from carbonsr_cli.cli import app

    d = finished_run.run_dir
    res = CliRunner().invoke(app, ["resume", str(d), "--epochs", "3", "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    latest = ck.load_checkpoint(d / "latest.pth")
    assert latest["epoch"] == 3 and latest["global_step"] == 9 and len(latest["metric_history"]) == 3
    assert (d / "epoch_003.pth").exists()
    assert "Run directory" in res.output


@pytest.mark.parametrize("fit_buffer", [0, None])
def test_layer_fits_use_cells_up_to_the_validation_region(sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          fit_buffer: int | None) -> None:
    """The per-cell fits (layer mix, correction, sites) never see a validation total; by default
    they use every other parent cell, the split's buffer included (training patches keep it)."""
    from carbonsr_cli.train import loop
    from carbonsr_cli.train.split import Split

    seen: list[np.ndarray] = []
    real = loop.fit_prior_on_cache

    def recording(cache, main, train_mask, *args, **kwargs):
        seen.append(np.array(train_mask))
        return real(cache, main, train_mask, *args, **kwargs)

    monkeypatch.setattr(loop, "fit_prior_on_cache", recording)
    result = loop.train(small_config(sample_dir, tmp_path, name="fits", epochs=1, steps_per_epoch=1, fit_buffer=fit_buffer))
    split = Split.from_dict(ck.load_checkpoint(result.run_dir / "latest.pth")["split"])
    (mask,) = seen
    val, forbidden = split.val_mask(), split.forbidden_mask()
    assert not (mask & val).any()
    assert split.buffer > 0 and (forbidden & ~val).any()
    if fit_buffer == 0:
        assert np.array_equal(mask, ~val)
    else:
        assert np.array_equal(mask, ~forbidden)


def test_mass_smooth_and_trend_reach_the_correction_fit(sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mass_smooth`` (a model override) gives the mass prior's correction its own neighbourhoods:
    the fit and the checkpoint's network use them, and the checkpoint loads for inference;
    ``mass_trend`` reaches the fit with the blocks' coordinates."""
    import models.mass_prior as mp
    from carbonsr_cli.train import loop
    from models.mass_prior import MassPrior

    seen: list[tuple[int, tuple[int, ...]]] = []
    real = mp.fit_mass_prior

    def recording(prior, feats, *args, **kwargs):
        seen.append((kwargs["trend"], tuple(kwargs["coords"].shape)))
        assert kwargs["coords"].shape == (feats.shape[0], 2)
        return real(prior, feats, *args, **kwargs)

    monkeypatch.setattr(mp, "fit_mass_prior", recording)
    run = loop.train(small_config(sample_dir, tmp_path, name="mass-smooth", preset="mass", model_overrides={"mass_smooth": [1, 5]},
                                  epochs=1, steps_per_epoch=1, mass_fit_steps=3, mass_trend=2))
    assert [t for t, _ in seen] == [2]
    loaded = ck.load_model_for_inference(run.run_dir / "latest.pth", torch.device("cpu"))
    prior = loaded.model.prior
    assert isinstance(prior, MassPrior) and prior.smooth == (1, 5)
    assert prior.features_size == 2 * prior.channels and prior.mix.basis.smooth == (1, 3)  # the mix keeps its own


def test_mass_fit_steps_reach_the_correction_fit(sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mass_fit_steps`` is the number of Adam steps of the mass prior's fit (None: 600); 0 leaves
    the correction at 0 (the mix alone)."""
    import models.mass_prior as mp
    from carbonsr_cli.train import loop

    steps_seen: list[int] = []
    real = mp.fit_mass_prior

    def recording(*args, **kwargs):
        steps_seen.append(kwargs["steps"])
        return real(*args, **kwargs)

    monkeypatch.setattr(mp, "fit_mass_prior", recording)
    monkeypatch.setattr(mp, "MASS_FIT_STEPS", 3)  # the default, made short for the test
    for steps in (0, None):
        run = loop.train(small_config(sample_dir, tmp_path, name=f"mass{steps}", preset="mass", model_overrides={},
                                      epochs=1, steps_per_epoch=1, mass_fit_steps=steps))
        state = ck.load_checkpoint(run.run_dir / "latest.pth")["model_state"]
        last = [v for k, v in state.items() if k.endswith("mlp.4.weight")]
        assert last, sorted(state)
        if steps == 0:  # (after a fit the validation gate may still drop the correction)
            assert all(float(v.abs().max()) == 0.0 for v in last)
    assert steps_seen == [0, 3]
    with pytest.raises(UsageError, match="--mass-fit-steps"):
        small_config(sample_dir, tmp_path, mass_fit_steps=-1).validate()
    with pytest.raises(UsageError, match="mass_trend"):
        small_config(sample_dir, tmp_path, mass_trend=5).validate()
