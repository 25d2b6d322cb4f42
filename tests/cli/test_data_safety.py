"""Issue 18: outputs never replace inputs, files get ordinary modes, one meaning of '-',
consistent exit codes, and no junk left behind by a killed run (real SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_run import cli_env, error_line, popen_cli, run_cli
from raster_files import write_raster


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A folder with a 12 x 12 km main raster (2 years), an aux raster and a 100 m prediction."""
    rng = np.random.default_rng(0)
    write_raster(tmp_path / "e.tif", rng.gamma(1.0, 10.0, (2, 12, 12)).astype("float32"), nodata=-9999.0,
                 descriptions=["2019", "2020"])
    from rasterio.transform import from_origin

    write_raster(tmp_path / "aux" / "pop.tif", rng.random((120, 120)).astype("float32"),
                 transform=from_origin(500000.0, 4000000.0, 100.0, 100.0))
    proc = run_cli("downscale", tmp_path / "e.tif", "--method", "uniform", "-o", tmp_path / "pred.tif", "-q",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return tmp_path


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("args", "role"),
    [
        (["downscale", "e.tif", "--method", "uniform", "-o", "e.tif", "--overwrite"], "main raster"),
        (["downscale", "e.tif", "--method", "uniform", "-o", "hard.tif", "--overwrite"], "main raster"),
        (["downscale", "e.tif", "--method", "uniform", "--aux", "aux/", "-o", "aux/pop.tif", "--overwrite"], "aux layer"),
        (["downscale", "e.tif", "--method", "uniform", "-o", "new.tif", "--json", "e.tif"], "main raster"),
        (["stats", "e.tif", "-o", "e.tif", "--overwrite"], "main raster"),
        (["stats", "e.tif", "--aux", "aux/pop.tif", "-o", "aux/pop.tif", "--overwrite"], "aux layer"),
        (["evaluate", "pred.tif", "--totals", "e.tif", "--json", "pred.tif", "--overwrite"], "prediction"),
        (["evaluate", "pred.tif", "--reference", "e.tif", "--plot", "e.tif", "--overwrite"], "reference"),
    ],
)
def test_output_naming_an_input_is_refused_before_anything_is_written(small: Path, args: list[str], role: str) -> None:
    os.link(small / "e.tif", small / "hard.tif")
    before = _snapshot(small)
    proc = run_cli(*args, cwd=small)
    assert proc.returncode == 1, proc.stderr
    assert f"output is the {role}" in error_line(proc)
    assert _snapshot(small) == before  # nothing replaced, nothing new (no temp file either)


def test_sample_data_overwrite_never_replaces_a_foreign_directory(tmp_path: Path) -> None:
    mine = tmp_path / "project"
    (mine / "aux").mkdir(parents=True)
    (mine / "emissions_1km.tif").write_bytes(b"my real inventory")
    (mine / "notes.txt").write_text("keep me")
    proc = run_cli("sample-data", mine, "--size-km", "12", "--overwrite", cwd=tmp_path)
    assert proc.returncode == 1 and "not a carbonsr sample region" in error_line(proc)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert (mine / "emissions_1km.tif").read_bytes() == b"my real inventory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_demo_overwrite_never_removes_a_users_runs(tmp_path: Path) -> None:
    (tmp_path / "runs" / "city").mkdir(parents=True)
    (tmp_path / "runs" / "city" / "best_model.pth").write_bytes(b"weeks of training")
    proc = run_cli("demo", tmp_path, "--overwrite", cwd=tmp_path)
    assert proc.returncode == 1 and "runs/city" in error_line(proc)
    assert (tmp_path / "runs" / "city" / "best_model.pth").read_bytes() == b"weeks of training"


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize(("umask", "want"), [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_get_the_umask_mode(small: Path, umask: int, want: int) -> None:
    proc = run_cli("downscale", "e.tif", "--method", "uniform", "-o", "o.tif", "--json", "o.json", "-q",
                   cwd=small, umask=umask)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("stats", "e.tif", "-o", "s.json", "-q", cwd=small, umask=umask)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("evaluate", "o.tif", "--reference", "e.tif", "--plot", "p.png", "--json", "r.json",
                   cwd=small, umask=umask)
    assert proc.returncode == 0, proc.stderr
    for name in ("o.tif", "o.json", "s.json", "p.png", "r.json"):
        assert _mode(small / name) == want, name


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path) -> None:
    from carbonsr_cli.atomic import atomic_write_text

    dest = tmp_path / "config.json"
    atomic_write_text(dest, "{}")
    assert _mode(dest) == 0o666 & ~_current_umask()
    dest.chmod(0o664)
    atomic_write_text(dest, "[]")
    assert _mode(dest) == 0o664 and dest.read_text() == "[]"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_stats_output_dash_is_stdout(small: Path) -> None:
    proc = run_cli("stats", "e.tif", "-o", "-", cwd=small)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # the tables went to stderr
    assert data["main"]["cells"] > 0
    assert not (small / "-").exists()


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["downscale", "missing.tif", "--method", "uniform", "-o", "x.tif"], 1, "file not found"),
        (["stats", "missing.tif"], 1, "file not found"),
        (["evaluate", "missing.tif", "--totals", "e.tif"], 1, "file not found"),
        (["downscale", "e.tif", "--model", "missing.pth", "-o", "x.tif"], 1, "checkpoint not found"),
        (["stats", "e.tif", "--aux", "nope/*.tif", "-o", "x.tif"], 1, "glob matches no file"),
        (["resume", "--runs-dir", "no_runs"], 1, "no runs directory"),
        (["downscale", "e.tif", "--method", "uniform", "-o", "x.tif", "--dtype", "int8"], 2, "int8"),
        (["downscale", "e.tif", "--method", "bogus", "-o", "x.tif"], 2, "bogus"),
        (["stats", "e.tif", "--no-such-option"], 2, "no-such-option"),
    ],
)
def test_exit_codes_file_problems_1_usage_2(small: Path, args: list[str], code: int, text: str) -> None:
    proc = run_cli(*args, cwd=small)
    assert proc.returncode == code, proc.stderr
    assert text in proc.stderr
    assert not (small / "x.tif").exists()


def _wait_for(pattern: str, where: Path, proc: subprocess.Popen[str], timeout: float = 60) -> list[Path]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = list(where.glob(pattern))
        if found:
            return found
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.02)
    raise AssertionError(f"{pattern} never appeared in {where}")


def test_sample_data_after_sigkill_removes_the_killed_runs_temp_folder(tmp_path: Path) -> None:
    proc = popen_cli("sample-data", "region", "--size-km", "400", cwd=tmp_path)
    try:
        _wait_for(".region.tmp-*", tmp_path, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(tmp_path.glob(".region.tmp-*"))  # the kill left it, as expected
    again = run_cli("sample-data", "region", "--size-km", "12", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["region"]


_KILLED_DOWNSCALE = """
import sys, tempfile, time
from pathlib import Path
from carbonsr_cli.atomic import make_temp_path, owner_tag
from multiprocessing import shared_memory
out = Path(sys.argv[1])
make_temp_path(out)                                   # the output's temp file
tempfile.mkdtemp(prefix=f".carbonsr-warp-{owner_tag()}-", dir=out.parent)   # the pre-warp folder
tempfile.mkstemp(prefix=f"carbonsr-aux-{owner_tag()}-", suffix=".pkl")      # the reader payload
shm = shared_memory.SharedMemory(name=f"carbonsr-{owner_tag()}-test-0", create=True, size=4096)
from multiprocessing import resource_tracker
resource_tracker.unregister(shm._name, "shared_memory")  # as if the tracker died with the group
print("ready", flush=True)
time.sleep(600)
"""


def test_downscale_after_sigkill_removes_what_the_killed_run_left(small: Path) -> None:
    """A downscale killed mid-run leaves its temp raster, warp folder, payload and shm block;
    the next downscale to the same folder removes them (the real downscale's names)."""
    child = subprocess.Popen([sys.executable, "-c", _KILLED_DOWNSCALE, str(small / "out.tif")],
                             stdout=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        pid = child.pid
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    tmpdir = Path(os.environ.get("TMPDIR", "/tmp"))
    left = [*small.glob(".out.tif.*"), *small.glob(".carbonsr-warp-*"), *tmpdir.glob(f"carbonsr-aux-*-{pid}-*"),
            *Path("/dev/shm").glob(f"carbonsr-*-{pid}-*")]
    assert len(left) == 4 - (not Path("/dev/shm").is_dir()), left
    proc = run_cli("downscale", "e.tif", "--method", "uniform", "-o", "out.tif", "-q", cwd=small)
    assert proc.returncode == 0, proc.stderr
    assert not [p for p in left if os.path.lexists(p)]
    assert not list(small.glob(".*"))


def test_help_says_where_temporary_files_go() -> None:
    for cmd in ("downscale", "sample-data"):
        proc = run_cli(cmd, "--help", COLUMNS="200")
        assert proc.returncode == 0
        assert "Temporary files" in proc.stdout and "kill -9" in proc.stdout
