"""``evaluate --reference ... --region RUN``: score only the held-out cells of a training run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from carbonsr_cli.downscale import downscale
from carbonsr_cli.evaluate import compare_to_reference
from carbonsr_cli.sample_data import generate_sample_data
from carbonsr_cli.train.split import make_block_split


def test_region_run_dir_scores_only_held_out_cells(tmp_path: Path) -> None:
    s = generate_sample_data(tmp_path / "d", seed=2, size_km=36, kind="urban")
    out = tmp_path / "uniform.tif"
    downscale(s.emissions, None, out, method="uniform", progress=False)
    split = make_block_split(36, 36, patch=12, block_patches=1, val_fraction=0.2, seed=0)
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "split.json").write_text(json.dumps(split.to_dict()))
    js = tmp_path / "scores.json"
    proc = subprocess.run([sys.executable, "-m", "carbonsr_cli.cli", "evaluate", str(out), "--reference", str(s.truth),
                           "--region", str(run), "--json", str(js)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(js.read_text())["reference"]
    mask = np.repeat(np.repeat(split.val_mask(), 10, axis=0), 10, axis=1)
    ref = compare_to_reference(out, s.truth, cell_mask=mask)
    whole = compare_to_reference(out, s.truth)
    assert got["all"]["cells"] == ref["all"]["cells"] < whole["all"]["cells"]
    assert got["all"]["nonzero-mae"] == ref["all"]["nonzero-mae"]
    other = tmp_path / "runs" / "y"
    other.mkdir()
    wrong = dict(split.to_dict(), height=48, width=48)  # a run on another grid
    (other / "split.json").write_text(json.dumps(wrong))
    bad = subprocess.run([sys.executable, "-m", "carbonsr_cli.cli", "evaluate", str(out), "--reference", str(s.truth),
                          "--region", str(other / "split.json")], capture_output=True, text=True)
    assert bad.returncode == 1 and "subdivision" in bad.stderr, bad.stderr
