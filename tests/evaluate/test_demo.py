"""``carbonsr demo`` end to end (slow: it trains; run with ``pytest -m slow tests/evaluate``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from carbonsr_cli.cli import app

runner = CliRunner()


def test_demo_refuses_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("user file\n")
    res = runner.invoke(app, ["demo", str(tmp_path)])
    assert res.exit_code == 1
    assert "--overwrite" in " ".join(res.output.split())
    assert (tmp_path / "keep.txt").exists()


@pytest.mark.slow
def test_demo_short_run(tmp_path: Path) -> None:
    from carbonsr_cli.demo import run_demo

    res = run_demo(tmp_path / "demo", train_overrides={"epochs": 1, "steps_per_epoch": 2}, log=lambda m: None)
    assert set(res.outputs) == {"model", "fitted", "points", "dasymetric", "uniform"}
    assert all(p.exists() for p in res.outputs.values())
    regions = {r["region"] for r in res.rows}
    assert regions == {"held-out", "whole region"}
    assert all(r["conserves"] and r["max_rel_err"] < 1e-6 for r in res.rows)
    held = [r for r in res.rows if r["region"] == "held-out"]
    best = min(r["nonzero-mae"] for r in held if r["method"] != "model")
    model = [r for r in held if r["method"] == "model"][0]
    assert model["ratio"] == pytest.approx(model["nonzero-mae"] / best)
    assert res.quicklook.read_bytes()[:4] == b"\x89PNG" and res.quicklook.stat().st_size < 300_000
    data = json.loads(res.results_json.read_text())
    assert len(data["rows"]) == 10
