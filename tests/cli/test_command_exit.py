"""The downscale command as a process (issue 20): it ends with ``os._exit`` after its exit
handlers, so its exit status, its output and its files must be exactly those of an ordinary exit;
a uniform run never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", **(env or {}))
    return subprocess.run([sys.executable, "-m", "carbonsr_cli.cli", *args], capture_output=True, text=True, env=e,
                          timeout=300)


@pytest.mark.parametrize("fast", ["1", "0"])
def test_uniform_command_output_and_status(sample_dir: Path, tmp_path: Path, fast: str) -> None:
    out = tmp_path / "u.tif"
    code = ("import runpy, sys; sys.argv = ['carbonsr', *sys.argv[1:]]; "
            "import atexit; atexit.register(lambda: print('torch' in sys.modules, file=sys.stderr)); "
            "runpy.run_module('carbonsr_cli.cli', run_name='__main__')")
    e = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", CARBONSR_FAST_EXIT=fast)
    done = subprocess.run([sys.executable, "-c", code, "downscale", str(sample_dir / "emissions_1km.tif"),
                           "--method", "uniform", "-o", str(out), "--json", "-", "--quiet"],
                          capture_output=True, text=True, env=e, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # the whole JSON arrived (flushed before os._exit)
    assert summary["conservation"]["ok"] is True
    assert done.stderr.strip().splitlines()[-1] == "False"  # exit handlers ran; torch never imported
    with rasterio.open(out) as ds:
        assert ds.count == len(summary["years"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_error_status_is_kept(sample_dir: Path, tmp_path: Path) -> None:
    done = _cli("downscale", str(sample_dir / "emissions_1km.tif"), "--method", "nonsense", "-o", str(tmp_path / "x.tif"))
    assert done.returncode == 2 and "unknown method" in done.stderr
    done = _cli("downscale", str(tmp_path / "missing.tif"), "--method", "uniform", "-o", str(tmp_path / "x.tif"))
    assert done.returncode == 1 and "missing.tif: file not found" in done.stderr
    out = tmp_path / "x.tif"
    out.write_bytes(b"")
    done = _cli("downscale", str(sample_dir / "emissions_1km.tif"), "--method", "uniform", "-o", str(out))
    assert done.returncode == 1 and "exists" in done.stderr
