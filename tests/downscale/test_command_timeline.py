"""benchmarks/command_timeline.py times a real ``carbonsr downscale`` command stage by stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from command_timeline import summary  # noqa: E402


def test_summary_merges_calls_per_stage() -> None:
    rows = summary([("b", "t1", 2.0, 3.0), ("a", "t0", 0.5, 1.0), ("b", "t2", 4.0, 4.5)])
    assert rows == [("a", 0.5, 1.0, 1, 0.5), ("b", 2.0, 4.5, 2, 1.5)]


def test_timeline_of_a_model_command(small_region: dict, small_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "timeline.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "command_timeline.py"), str(out), "downscale",
           str(small_region["main"]), "--aux", str(small_region["aux"]), "--model", str(small_ckpt),
           "-o", str(tmp_path / "m.tif"), "--device", "cpu", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rec = json.loads(out.read_text())
    spans = {label: (s, e) for label, s, e, _n, _t in rec["summary"]}
    for label in ("api.build_plan", "api.run_pipeline", "api.check_written_conservation", "engine._predict_row"):
        assert label in spans, label
    assert spans["api.build_plan"][1] <= spans["api.run_pipeline"][0]
    assert spans["api.run_pipeline"][1] <= spans["api.check_written_conservation"][0] <= rec["end"]
    assert (tmp_path / "m.tif").exists() and "api.run_pipeline" in done.stderr
