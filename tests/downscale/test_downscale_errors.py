"""Bad inputs of ``carbonsr downscale``: one error line, non-zero exit, no output, no temp file."""

from __future__ import annotations

import errno
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from ds_helpers import make_checkpoint, no_temp_files, synthetic_totals, write_tif
from typer.testing import CliRunner

from carbonsr_cli.cli import app
from carbonsr_cli.downscale import downscale
from carbonsr_cli.methods import parse_method
from carbonsr_cli.errors import CheckpointError, InputDataError, OutputError, UsageError

runner = CliRunner()


def _run(args: list[str]) -> tuple[int, str]:
    res = runner.invoke(app, ["downscale", *map(str, args)])
    return res.exit_code, res.output


def _assert_failed(code: int, output: str, out: Path, *needles: str, exit_code: int = 1) -> None:
    assert code == exit_code, output
    assert output.count("error:") == 1 and "Traceback" not in output, output
    flat = " ".join(output.split())
    for n in needles:
        assert n in flat, (n, output)
    assert not out.exists()
    assert no_temp_files(out.parent) == []


def _main(tmp_path: Path, data: np.ndarray, nodata: float | None = -9999.0, name: str = "main.tif") -> Path:
    return write_tif(tmp_path / name, data, res=1000.0, origin=(500_000.0, 5_000_000.0), crs="EPSG:32633",
                     nodata=nodata, descriptions=[str(2019 + i) for i in range(data.shape[0])])


# ----------------------------------------------------------------------------- checkpoints


def test_wrong_aux_set_for_model(small_region: dict, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "c.pth", ["lights", "pop", "roads:length"])
    out = tmp_path / "o.tif"
    code, output = _run([small_region["main"], "--aux", small_region["aux"], "--model", ckpt, "-o", out, "-q"])
    _assert_failed(code, output, out, "c.pth", "missing [roads:length]", "lights, pop, roads:length")

    ckpt2 = make_checkpoint(tmp_path / "c2.pth", ["lights"])
    code, output = _run([small_region["main"], "--aux", small_region["aux"], "--model", ckpt2, "-o", out, "-q"])
    _assert_failed(code, output, out, "unexpected [pop]")


def test_not_a_carbonsr_checkpoint(small_region: dict, tmp_path: Path) -> None:
    import torch

    ckpt = tmp_path / "state.pth"
    torch.save({"weight": torch.zeros(3)}, ckpt)
    out = tmp_path / "o.tif"
    code, output = _run([small_region["main"], "--aux", small_region["aux"], "--model", ckpt, "-o", out])
    _assert_failed(code, output, out, "state.pth", "not a carbonsr checkpoint")

    text = tmp_path / "notes.pth"
    text.write_text("hello")
    code, output = _run([small_region["main"], "--aux", small_region["aux"], "--model", text, "-o", out])
    _assert_failed(code, output, out, "notes.pth")


class _Evil:
    """Unpickling this would create a marker file (it must never happen)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_pickled_code_checkpoint_is_refused(small_region: dict, tmp_path: Path, kind: str) -> None:
    import torch

    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "evil.pth"
    payload = {"format": "carbonsr-checkpoint", "format_version": 1, "model_state": _Evil(marker)}
    if kind == "torch":
        torch.save(payload, ckpt)
    else:
        with open(ckpt, "wb") as fh:
            pickle.dump(payload, fh)
    assert not marker.exists()
    out = tmp_path / "o.tif"
    code, output = _run([small_region["main"], "--aux", small_region["aux"], "--model", ckpt, "-o", out])
    _assert_failed(code, output, out, "evil.pth")
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        downscale(small_region["main"], [small_region["aux"]], out, checkpoint=ckpt, device="cpu", progress=False)
    assert not marker.exists()


# ----------------------------------------------------------------------------- main raster


def test_negative_total(tmp_path: Path) -> None:
    t = synthetic_totals(10, 12, 1, seed=3)
    t[0, 4, 5] = -2.5
    main = _main(tmp_path, t)
    out = tmp_path / "o.tif"
    code, output = _run([main, "--method", "uniform", "-o", out])
    _assert_failed(code, output, out, "main.tif", "negative total -2.5", "row 4, col 5")


def test_nan_total_that_is_not_nodata(tmp_path: Path) -> None:
    t = synthetic_totals(10, 12, 2, seed=3)
    t[1, 7, 2] = np.nan
    main = _main(tmp_path, t)
    out = tmp_path / "o.tif"
    code, output = _run([main, "--method", "uniform", "-o", out])
    _assert_failed(code, output, out, "main.tif", "NaN total", "row 7, col 2", "2020")


def test_all_nodata_main(tmp_path: Path) -> None:
    main = _main(tmp_path, np.full((1, 8, 9), -9999.0, np.float32))
    out = tmp_path / "o.tif"
    code, output = _run([main, "--method", "uniform", "-o", out])
    _assert_failed(code, output, out, "main.tif", "nodata")


def test_unknown_year_and_method_are_usage_errors(small_region: dict, tmp_path: Path) -> None:
    out = tmp_path / "o.tif"
    code, output = _run([small_region["main"], "--method", "uniform", "--year", "1999", "-o", out])
    _assert_failed(code, output, out, "year 1999", exit_code=2)
    code, output = _run([small_region["main"], "--method", "magic", "-o", out])
    _assert_failed(code, output, out, "unknown method", exit_code=2)
    code, output = _run([small_region["main"], "-o", out])
    _assert_failed(code, output, out, "--model", exit_code=2)
    with pytest.raises(UsageError):
        parse_method("model", None)
    assert parse_method("dasymetric:pop", None).layer == "pop"


# ----------------------------------------------------------------------------- output


def test_output_exists(small_region: dict, tmp_path: Path) -> None:
    out = tmp_path / "o.tif"
    out.write_bytes(b"keep me")
    code, output = _run([small_region["main"], "--method", "uniform", "-o", out])
    assert code == 1 and "already exists" in output and output.count("error:") == 1
    assert out.read_bytes() == b"keep me"
    assert no_temp_files(tmp_path) == []
    code, output = _run([small_region["main"], "--method", "uniform", "-o", out, "--overwrite", "-q"])
    assert code == 0, output
    assert out.stat().st_size > 1000


def test_unwritable_target(small_region: dict, tmp_path: Path) -> None:
    """A path below a regular file cannot be created (tests run as root: no chmod trick)."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = blocker / "o.tif"
    code, output = _run([small_region["main"], "--method", "uniform", "-o", out])
    assert code == 1 and output.count("error:") == 1 and "directory" in output, output
    assert blocker.read_text() == "x"


def test_disk_full_while_writing(small_region: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from a write (in the writer thread) becomes one OutputError; nothing is left."""
    from carbonsr_cli.downscale import bands
    from carbonsr_cli.writer import RasterWriter

    monkeypatch.setattr(bands, "BASELINE_BAND_ROWS", 50)  # several writes
    real = RasterWriter.write
    calls = {"n": 0}

    def full(self, array, window):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, array, window)

    monkeypatch.setattr(RasterWriter, "write", full)
    out = tmp_path / "o.tif"
    with pytest.raises(OutputError, match="disk full"):
        downscale(small_region["main"], [], out, method="uniform", progress=False)
    assert not out.exists() and no_temp_files(tmp_path) == []
    code, output = _run([small_region["main"], "--method", "uniform", "-o", out])
    _assert_failed(code, output, out, "disk full")


# ----------------------------------------------------------------------------- success via CLI


def test_cli_success_table_and_json(small_region: dict, tmp_path: Path) -> None:
    out = tmp_path / "o.tif"
    js = tmp_path / "summary.json"
    res = runner.invoke(app, ["downscale", str(small_region["main"]), "--method", "dasymetric:lights", "--aux",
                              str(small_region["aux"]), "-o", str(out), "--json", str(js), "--dtype", "float64"])
    assert res.exit_code == 0, res.output
    assert "conservation" in res.output and "OK" in res.output and "km2/s" in res.output
    data = json.loads(js.read_text())
    assert data["conservation"]["ok"] is True and data["method"] == "dasymetric:lights"
    assert data["conservation"]["max_rel_error"] <= 1e-6 and data["dtype"] == "float64"
    assert data["child_shape"] == [200, 220] and data["km2_per_s"] > 0


def test_input_errors_raise_typed_exceptions(tmp_path: Path) -> None:
    t = synthetic_totals(6, 6, 1)
    t[0, 2, 2] = -1
    main = _main(tmp_path, t)
    with pytest.raises(InputDataError, match="row 2, col 2"):
        downscale(main, [], tmp_path / "o.tif", method="uniform", progress=False)
