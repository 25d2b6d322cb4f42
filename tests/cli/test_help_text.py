"""Issue 18 item 10a: help text is plain (no ``<bool>`` after flags, no ``{main}`` in usage, ``[default: 20]``)."""

from __future__ import annotations

import pytest
from cli_run import run_cli


@pytest.mark.parametrize("command", ["downscale", "train", "stats", "evaluate", "resume", "sample-data", "demo"])
def test_help_has_no_type_labels_or_braces(command: str) -> None:
    proc = run_cli(command, "--help", COLUMNS="200", TERM="dumb")
    assert proc.returncode == 0, proc.stderr
    usage = next(ln for ln in proc.stdout.splitlines() if "Usage:" in ln)
    assert "{" not in usage and "}" not in usage, usage
    assert "<bool>" not in proc.stdout and "<int" not in proc.stdout and "<list[" not in proc.stdout
    assert "[default: (" not in proc.stdout


def test_usage_names_the_arguments_and_defaults_read_plainly() -> None:
    train = run_cli("train", "--help", COLUMNS="200", TERM="dumb").stdout
    assert "train [OPTIONS] MAIN..." in train
    assert "[default: 20]" in train and "[default: 0.002]" in train
    down = run_cli("downscale", "--help", COLUMNS="200", TERM="dumb").stdout
    assert "downscale [OPTIONS] MAIN [AUX]..." in down
