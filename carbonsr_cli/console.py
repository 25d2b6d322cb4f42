"""Shared rich consoles: results go to stdout, messages and errors to stderr.

On a terminal the tables fit its width. Anywhere else (a pipe, a CI log, ``> log.txt``) there
is no width to fit, so, unless ``COLUMNS`` says otherwise, the consoles are wide enough for every
table at its natural width: no number is ever cut to ``3.276e...``.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from rich.console import Console

#: Width used when the stream is not a terminal and ``COLUMNS`` is not set.
PLAIN_WIDTH = 1000


def plain_width(stream: TextIO) -> int | None:
    """The console width for ``stream``: None (rich decides: the terminal, or ``COLUMNS``) on a
    terminal or when ``COLUMNS`` is set, else :data:`PLAIN_WIDTH`."""
    if os.environ.get("COLUMNS", "").strip():
        return None
    try:
        if stream.isatty():
            return None
    except (AttributeError, ValueError):
        pass
    return PLAIN_WIDTH


#: Tables and results (stdout).
out = Console(highlight=False, width=plain_width(sys.stdout))
#: Progress bars, warnings and errors (stderr).
err = Console(stderr=True, highlight=False, width=plain_width(sys.stderr))


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


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 band``, ``3 bands`` (``many`` for an irregular plural)."""
    return f"{n} {word}" if n == 1 else f"{n} {many or word + 's'}"
