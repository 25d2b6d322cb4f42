"""Smoke test of benchmarks/bench_model.py on a tiny CPU configuration."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_model.py"


def test_bench_model_prints_table(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("bench_model", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_model", bench)  # dataclasses need the module registered
    spec.loader.exec_module(bench)
    rc = bench.main(["--device", "cpu", "--presets", "tiny", "--years", "1,2", "--dtypes", "fp32",
                     "--size", "40", "--batch", "1", "--iters", "1", "--warmup", "0", "--physics"])
    assert rc == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tiny")]
    assert len(lines) == 2
    for ln in lines:
        fields = ln.split()
        assert int(fields[1].replace(",", "")) > 50_000  # parameters
        assert float(fields[5]) > 0 and float(fields[6]) > 0  # patches/s
