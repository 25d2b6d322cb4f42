"""The root ``carbonsr`` app: version, help, and how errors become exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from carbonsr_cli import __version__, cli
from carbonsr_cli.errors import InputDataError, UsageError

runner = CliRunner()
COMMANDS = ["sample-data", "stats", "train", "resume", "downscale", "evaluate", "demo"]


def test_version() -> None:
    result = runner.invoke(cli.app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"carbonsr {__version__}"


def test_help_lists_every_command() -> None:
    result = runner.invoke(cli.app, ["--help"])
    assert result.exit_code == 0, result.output
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help_has_an_example(name: str) -> None:
    result = runner.invoke(cli.app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "carbonsr " + name in result.output.replace("\n", " ")


def _app_with(exc: BaseException) -> typer.Typer:
    app = typer.Typer(cls=cli.CarbonSRGroup)

    @app.command()
    def boom() -> None:
        raise exc

    @app.command()
    def other() -> None:  # a second command keeps Typer in group mode
        pass

    return app


@pytest.mark.parametrize(
    ("exc", "code", "text"),
    [
        (InputDataError("no CRS", "/data/x.tif"), 1, "error: /data/x.tif: no CRS"),
        (UsageError("file not found", "/data/y.tif"), 2, "error: /data/y.tif: file not found"),
        (KeyboardInterrupt(), 130, "error: interrupted"),
        (RuntimeError("kaput"), 1, "error: internal error: RuntimeError: kaput"),
        (typer.BadParameter("must be > 0"), 2, "must be > 0"),
    ],
)
def test_errors_become_one_line_and_exit_code(exc: BaseException, code: int, text: str) -> None:
    result = runner.invoke(_app_with(exc), ["boom"])
    assert result.exit_code == code, result.output
    assert text in result.output
    assert "Traceback" not in result.output
    if isinstance(exc, (InputDataError, UsageError)):
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert lines == [text]


def test_console_script_runs_as_a_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from carbonsr_cli.cli import main; main()", "stats", "/nonexistent/e.tif"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode in (1, 2)
    assert proc.stderr.strip().startswith("error: /nonexistent/e.tif")
    assert len(proc.stderr.strip().splitlines()) == 1
