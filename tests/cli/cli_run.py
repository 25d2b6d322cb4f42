"""Running ``carbonsr`` as a separate process from the tests (the behaviour is the CLI's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

#: The repository root (so the child process imports this checkout).
REPO = Path(__file__).resolve().parents[2]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a child ``carbonsr``: this checkout first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def run_cli(*args: Any, cwd: Path | None = None, umask: int | None = None, timeout: float = 120,
            **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m carbonsr_cli.cli ARGS`` and return the finished process (text output)."""
    preexec = (lambda: os.umask(umask)) if umask is not None else None  # noqa: E731
    return subprocess.run(
        [sys.executable, "-m", "carbonsr_cli.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=cwd, env=cli_env(**env), preexec_fn=preexec,
    )


def popen_cli(*args: Any, cwd: Path | None = None, **env: str) -> subprocess.Popen[str]:
    """Start ``carbonsr ARGS`` in the background (for kill tests)."""
    return subprocess.Popen(
        [sys.executable, "-m", "carbonsr_cli.cli", *map(str, args)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd, env=cli_env(**env),
    )


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one ``error: ...`` line of a failed run (asserts there is exactly one stderr line)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]
