"""benchmarks/memory_peak.py finds the memory peak of a run and splits it by process and pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="Linux /proc only")
def test_memory_peak_of_a_run_with_reader_processes(small_region: dict, small_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "peak.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "memory_peak.py"), "--main", str(small_region["main"]),
           "--aux", str(small_region["aux"]), "--checkpoint", str(small_ckpt), "--device", "cpu",
           "--out", str(tmp_path / "m.tif"), "--json", str(out)]
    env = {**os.environ, "CARBONSR_READ_PROCS": "2"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    peak = json.loads(out.read_text())["peak"]
    assert peak["main"]["Pss"] > 50  # MiB: torch alone is more
    assert len(peak["children"]) >= 2  # the two reader processes (and the resource tracker)
    assert peak["total_pss_mb"] >= peak["main"]["Pss"] + sum(c["Pss"] for c in peak["children"]) - 1
    assert peak["gdal_cache_mb"]["max"] > 0 and peak["heap_mb"]["in_use"] > 0
    assert "process tree PSS at the peak" in done.stdout
    assert (tmp_path / "m.tif").exists()
