"""Tables stay complete when stdout is not a terminal (pipes, CI logs, ``> log.txt``): issue 18."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cli_run import run_cli
from raster_files import write_raster


def test_evaluate_totals_table_is_complete_when_piped(tmp_path: Path) -> None:
    write_raster(tmp_path / "e.tif", np.random.default_rng(1).gamma(1.0, 1e4, (3, 12, 12)).astype("float32"),
                 nodata=-9999.0, descriptions=["2019", "2020", "2021"])
    assert run_cli("downscale", "e.tif", "--method", "uniform", "-o", "p.tif", "-q", cwd=tmp_path).returncode == 0
    proc = run_cli("evaluate", "p.tif", "--totals", "e.tif", cwd=tmp_path, COLUMNS="")  # no width: not a TTY
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout and "..." not in proc.stdout
    for header in ("max abs err", "max rel err", "negatives", "nodata mismatch", "status"):
        assert header in proc.stdout
    row = next(ln for ln in proc.stdout.splitlines() if "2019" in ln)
    assert row.rstrip().endswith("ok │")


def test_downscale_throughput_is_per_year(tmp_path: Path) -> None:
    write_raster(tmp_path / "e.tif", np.ones((3, 12, 12), "float32"), nodata=-9999.0,
                 descriptions=["2019", "2020", "2021"])
    proc = run_cli("downscale", "e.tif", "--method", "uniform", "-o", "p.tif", cwd=tmp_path, COLUMNS="")
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "throughput " in ln and "km2" in ln)
    assert "km2/s per year" in line and "(3 years:" in line
