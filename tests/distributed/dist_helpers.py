"""Start a 2-process CPU (gloo) torchrun job from a test."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

RUNNER = Path(__file__).with_name("_runner.py")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_env() -> dict[str, str]:
    """Environment of the ranks: one CPU thread each, gloo over the loopback interface."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", CARBONSR_READ_THREADS="1")
    env.pop("CARBONSR_READ_PROCS", None)
    return env


def torchrun(args: list[str], nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node N`` on 127.0.0.1 with ``args``."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}", *args,
    ]
    proc = subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def run_spec(kind: str, spec: dict[str, Any], path: Path, nproc: int = 2) -> dict[str, Any]:
    """Run the test runner on ``spec`` (written to ``path``); return rank 0's result."""
    path.write_text(json.dumps(spec))
    torchrun([str(RUNNER), kind, str(path)], nproc=nproc)
    return json.loads(Path(str(path) + ".result.json").read_text())
