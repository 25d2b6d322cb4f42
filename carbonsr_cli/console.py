"""Shared rich consoles: results go to stdout, messages and errors to stderr."""

from __future__ import annotations

from rich.console import Console

#: Tables and results (stdout).
out = Console(highlight=False)
#: Progress bars, warnings and errors (stderr).
err = Console(stderr=True, highlight=False)


def print_error(message: str) -> None:
    """Print one ``error: ...`` line on stderr (no markup interpretation)."""
    err.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)


def print_warning(message: str) -> None:
    """Print one ``warning: ...`` line on stderr."""
    err.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


def escape(text: str) -> str:
    """Escape rich markup in user-provided text (paths may contain brackets)."""
    from rich.markup import escape as _escape

    return _escape(text)
