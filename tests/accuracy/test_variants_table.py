"""``benchmarks/accuracy_variants.py``: seed ranges, variant specs, job commands and the comparison
table (pure functions; no region is trained here)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import accuracy_variants as av  # noqa: E402


def _row(kind: str, seed: int, variant: str, ratio: float, **extra: float) -> dict:
    return {"kind": kind, "seed": seed, "variant": variant, "ratio": ratio, "top1_ratio": ratio, "r2": 0.5,
            "r2_baseline": 0.4, "train_s": 10.0, "train_spread": float("nan"), **extra}


def test_seeds_variants_and_the_job_command() -> None:
    assert av.parse_seeds("1-4,7") == [1, 2, 3, 4, 7]
    assert av.parse_variant('wide={"model_overrides": {"mass_hidden": 32}}') == ("wide", {"model_overrides": {"mass_hidden": 32}})
    with pytest.raises(SystemExit, match="NAME=JSON"):
        av.parse_variant("wide")
    cmd = av.job_command("traffic", 3, {"epochs": 1, "model_overrides": {"site_unlisted": False}}, size_km=48, threads=2, train_seeds=3)
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    assert sets == ["threads=2", "epochs=1", 'model_overrides={"site_unlisted": false}']
    assert cmd[cmd.index("--kinds") + 1] == "traffic" and cmd[cmd.index("--seeds") + 1] == "3"
    assert cmd[cmd.index("--train-seeds") + 1] == "3"


def test_the_table_compares_on_common_regions_and_counts_moves(tmp_path: Path) -> None:
    rows = [
        _row("traffic", 1, "a", 0.5), _row("traffic", 2, "a", 0.8), _row("urban", 1, "a", 1.1),
        _row("traffic", 1, "b", 0.5), _row("traffic", 2, "b", 0.9), _row("urban", 1, "b", 0.99, r2=0.1),
        _row("urban", 2, "a", 0.7),  # b did not run this region: left out of the table
        {"kind": "urban", "seed": 2, "variant": "b", "error": "boom"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lines = av.compare(av.load([path]))
    assert lines[0].startswith("3 regions finished by every variant (a, b); 1 jobs failed")
    a = next(line for line in lines if line.startswith("a "))
    b = next(line for line in lines if line.startswith("b "))
    assert f"{math.sqrt(0.5 * 0.8):9.4f}" in a  # traffic geometric mean of a
    assert a.split()[3:6] == [f"{(0.5 * 0.8 * 1.1) ** (1 / 3):.4f}", "1", "2"]  # all, above 1.0, at most 0.8
    assert b.split()[7] == "1"  # urban 1: R2 below the baseline's
    moves = lines[-1]
    assert moves.startswith("b vs a: better by > 1 %: 1, worse by > 1 %: 1, unchanged: 1")
    assert "traffic 2 0.800 -> 0.900" in moves and "urban 1 1.100 -> 0.990" in moves
