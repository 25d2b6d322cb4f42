"""The progress bar of a downscaling run (rich, on stderr, only on a terminal)."""

from __future__ import annotations

from typing import Any
from carbonsr_cli.console import err


def _progress(enabled: bool, total: int, label: str) -> Any:
    """A rich progress bar on stderr (tiles/s and ETA), or a no-op when disabled."""

    if not enabled or not err.is_terminal:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    prog = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tiles"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    prog.start()
    prog.add_task(label, total=total, rate="")
    return prog



def _advance(prog: Any, n: int) -> None:
    if prog is None:
        return
    task = prog.tasks[0]
    prog.advance(task.id, n)
    speed = task.speed
    prog.update(task.id, rate=f"{speed:,.1f} tiles/s" if speed else "")
