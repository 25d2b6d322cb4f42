"""The ``carbonsr`` command line: a thin Typer app over plain library functions.

Each subcommand lives in ``carbonsr_cli/commands/<name>.py`` and exposes
``register(app)``. This module only handles cross-cutting concerns: ``--version``,
``--debug``, turning :class:`~carbonsr_cli.errors.CarbonSRError` into one
``error: <file>: <problem>`` line with the right exit code, and Ctrl-C (exit 130).
"""

from __future__ import annotations

import logging
import warnings
from typing import Annotated, Any, Optional

import click
import typer
from typer.core import TyperGroup

from carbonsr_cli import __version__
from carbonsr_cli.console import print_error, print_warning
from carbonsr_cli.errors import CarbonSRError, CarbonSRWarning
from carbonsr_cli.options import plain_help

#: Set by the root callback; when true, unexpected errors show their traceback.
DEBUG = False


def _pass_through_exceptions() -> tuple[type[BaseException], ...]:
    """Exceptions that click/typer turn into exit codes themselves (usage errors exit 2).

    Recent typer versions vendor their own copy of click, so both click's and typer's
    classes are listed.
    """
    classes: list[type[BaseException]] = [click.exceptions.Exit, click.exceptions.Abort, click.ClickException]
    for name in ("Exit", "Abort", "BadParameter"):
        cls = getattr(typer, name, None)
        if isinstance(cls, type):
            classes.append(cls)
    typer_base = getattr(getattr(typer, "exceptions", None), "TyperException", None)
    if isinstance(typer_base, type):
        classes.append(typer_base)
    return tuple(classes)


_PASS_THROUGH = _pass_through_exceptions()


class CarbonSRGroup(TyperGroup):
    """Typer group that maps carbonsr errors to one line and an exit code, with plain help text."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> Optional[click.Command]:  # noqa: D102
        cmd = super().get_command(ctx, cmd_name)
        return plain_help(cmd, ctx) if cmd is not None else None

    def format_help(self, ctx: click.Context, formatter: Any) -> None:  # noqa: D102
        plain_help(self, ctx)
        super().format_help(ctx, formatter)

    def invoke(self, ctx: click.Context) -> Any:  # noqa: D102
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", CarbonSRWarning)
                warnings.showwarning = _show_warning  # type: ignore[assignment]
                return super().invoke(ctx)
        except CarbonSRError as exc:
            if DEBUG:
                raise
            print_error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            print_error("interrupted")
            raise typer.Exit(130) from None
        except _PASS_THROUGH:
            raise
        except MemoryError:
            print_error("out of memory: try a smaller --batch-size")
            raise typer.Exit(1) from None
        except OSError as exc:
            if DEBUG:
                raise
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            print_error(f"{where}{exc.strerror or exc}")
            raise typer.Exit(1) from None
        except Exception as exc:  # unexpected: a bug, keep the message short
            if DEBUG:
                raise
            print_error(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
            raise typer.Exit(1) from None


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    if issubclass(category, CarbonSRWarning):
        print_warning(str(message))
    else:
        logging.getLogger("carbonsr").debug("%s: %s", category.__name__, message)


app = typer.Typer(
    cls=CarbonSRGroup,
    name="carbonsr",
    help="Downscale 1 km carbon-emission rasters to 100 m with a weakly supervised model; "
    "every 10x10 block of output cells sums exactly to its 1 km total.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"carbonsr {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail on stderr.")] = False,
) -> None:
    """carbonsr: 1 km -> 100 m carbon-emission downscaling for GIS users."""
    global DEBUG
    DEBUG = debug
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


from carbonsr_cli.commands import register_all  # noqa: E402

register_all(app)


def main() -> None:
    """Console-script entry point.

    After a command that allows it (``preload.allow_fast_exit``: ``downscale``, whose outputs
    are closed and renamed before it returns), ends the process with :func:`os._exit` once its
    threads are joined, its exit handlers have run and stdout/stderr are flushed: the
    interpreter's own shutdown (tearing down torch's and GDAL's modules) takes 0.5-1 s and does
    nothing a finished command needs. ``CARBONSR_FAST_EXIT=0`` restores the ordinary exit.
    """
    try:
        app()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    _exit(code)


def _exit(code: Any) -> None:
    """``sys.exit(code)`` without the interpreter's shutdown (see :func:`main`)."""
    import os
    import sys

    from carbonsr_cli.preload import fast_exit_allowed

    off = os.environ.get("CARBONSR_FAST_EXIT", "1").strip().lower() in ("0", "false", "no", "off")
    if off or not fast_exit_allowed():  # only commands that allow it (downscale)
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed to stderr, status 1
        print(code, file=sys.stderr)
        status = 1
    import atexit
    import threading

    # What an ordinary exit would do first: join the non-daemon threads (thread pools), then the
    # atexit handlers (temporary files, reader processes, logging).
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to show
            pass
    os._exit(status % 256)


if __name__ == "__main__":  # pragma: no cover
    main()
