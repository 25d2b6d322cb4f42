"""Finding runs and checkpoints to continue from (``--resume``, ``carbonsr resume``).

Run directories live under ``runs_dir`` (default ``./runs``) and hold checkpoints named
``autosave_latest.pth``, ``autosave_step_<n>.pth``, ``latest.pth``, ``epoch_<nnn>.pth`` and
``best_model.pth``. "Newest" means the largest ``global_step`` stored in the file (ties:
the later modification time), so an autosave written mid-epoch after the last epoch end
wins over ``latest.pth``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from carbonsr_cli.errors import CheckpointError, MissingInputError, UsageError

__all__ = ["CheckpointInfo", "find_latest_run", "list_checkpoints", "newest_checkpoint", "resolve_resume"]

_CKPT_RE = re.compile(r"^(autosave_latest|autosave_step_\d+|latest|epoch_\d+|best_model)\.pth$")


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint file of a run and where it stands.

    Attributes:
        path: The ``.pth`` file.
        epoch: Epoch in progress (0-based) when it was written.
        step: Steps done within that epoch.
        global_step: Steps done in total.
        mtime: Modification time (seconds since the epoch).
        val_score: Validation Nonzero-MAE of the last finished epoch, if any.
    """

    path: Path
    epoch: int
    step: int
    global_step: int
    mtime: float
    val_score: float | None

    def describe(self) -> str:
        """One line for menus: name, epoch/step and validation score."""
        score = "" if self.val_score is None else f", val Nonzero-MAE {self.val_score:.4g}"
        return f"{self.path.name}: epoch {self.epoch}, step {self.step} (global step {self.global_step}){score}"


def find_latest_run(runs_dir: str | os.PathLike[str]) -> Path:
    """The run directory under ``runs_dir`` with the most recently written checkpoint.

    Raises:
        UsageError: No runs directory or no run with a checkpoint in it.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise MissingInputError("no runs directory; train first with `carbonsr train`", root)
    best: tuple[float, Path] | None = None
    for d in root.iterdir():
        if not d.is_dir():
            continue
        times = [p.stat().st_mtime for p in d.iterdir() if _CKPT_RE.match(p.name)]
        if times and (best is None or max(times) > best[0]):
            best = (max(times), d)
    if best is None:
        raise MissingInputError("no run with a checkpoint found; train first with `carbonsr train`", root)
    return best[1]


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Every readable checkpoint of a run, newest first (unreadable files are skipped)."""
    from carbonsr_cli.checkpoints import load_checkpoint

    d = Path(run_dir)
    if not d.is_dir():
        raise MissingInputError("run directory not found", d)
    infos: list[CheckpointInfo] = []
    for p in sorted(d.iterdir()):
        if not _CKPT_RE.match(p.name):
            continue
        try:
            ck = load_checkpoint(p)
        except CheckpointError:
            continue
        hist = ck.get("metric_history") or []
        score = hist[-1].get("val_score") if hist else None
        infos.append(
            CheckpointInfo(
                path=p,
                epoch=int(ck.get("epoch", 0)),
                step=int(ck.get("step", 0)),
                global_step=int(ck.get("global_step", 0)),
                mtime=p.stat().st_mtime,
                val_score=None if score is None else float(score),
            )
        )
    infos.sort(key=lambda i: (i.global_step, i.mtime, i.path.name != "best_model.pth"), reverse=True)
    return infos


def newest_checkpoint(run_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint of ``run_dir`` with the largest global step.

    ``best_model.pth`` is only chosen when nothing else is there, since it may be older
    than the end of training.

    Raises:
        CheckpointError: The run holds no readable checkpoint.
    """
    infos = list_checkpoints(run_dir)
    resumable = [i for i in infos if i.path.name != "best_model.pth"] or infos
    if not resumable:
        raise CheckpointError("no readable checkpoint in this run directory", run_dir)
    return resumable[0].path


def resolve_resume(spec: str | None, runs_dir: str | os.PathLike[str], name: str | None = None) -> Path | None:
    """Turn a ``--resume`` value into a checkpoint path.

    Args:
        spec: ``latest`` (newest checkpoint of the run ``name``, or of the latest run),
            ``auto`` (same, but None when there is nothing to resume), a checkpoint file, or
            a run directory; None means no resume.
        runs_dir: Where runs live.
        name: ``--name`` of the run, if given.

    Returns:
        The checkpoint to resume from, or None to start a new run.

    Raises:
        UsageError / CheckpointError: Nothing to resume for ``latest`` or a path.
    """
    if spec is None:
        return None
    if spec in ("latest", "auto"):
        try:
            run = Path(runs_dir) / name if name else find_latest_run(runs_dir)
            if not run.is_dir():
                raise MissingInputError("no such run to resume", run)
            return newest_checkpoint(run)
        except (MissingInputError, CheckpointError):
            if spec == "auto":
                return None
            raise
    p = Path(spec)
    if p.is_dir():
        return newest_checkpoint(p)
    if not p.exists():
        raise MissingInputError("--resume: no such checkpoint file or run directory", p)
    return p
