"""Shared Typer option aliases, so every command spells common options the same way.

Use them as parameter annotations with a default::

    def downscale(main: InputTif, output: OutputTif, overwrite: Overwrite = False,
                  aux: AuxPaths = None, device: Device = "auto") -> None: ...

This module imports only typer (no rasterio/torch), so ``carbonsr --help`` stays fast.
Used by every command: downscale, train/resume, stats, evaluate, sample-data, demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
from typer.core import TyperArgument, TyperCommand, TyperOption

__all__ = [
    "option",
    "output_option",
    "overwrite_option",
    "device_option",
    "factor_option",
    "quiet_option",
    "json_option",
    "aux_option",
    "categorical_option",
    "fill_missing_option",
    "units_option",
    "Overwrite",
    "Device",
    "Factor",
    "Compress",
    "Cog",
    "Quiet",
    "JsonOut",
    "AuxPaths",
    "Categorical",
    "Aoi",
    "COMPRESS_CHOICES",
    "AuxGlobCommand",
    "absorb_aux_values",
    "plain_help",
]

#: Values of ``--compress`` (mirrors ``writer.COMPRESSIONS``; kept here to avoid importing rasterio).
COMPRESS_CHOICES = ("deflate", "lzw", "zstd", "lerc", "none")

def _check_compress(value: str) -> str:
    """Validate and lower-case ``--compress`` (exit 2 on an unknown name)."""
    v = (value or "").lower()
    if v not in COMPRESS_CHOICES:
        raise typer.BadParameter(f"{value!r}; choose one of {', '.join(COMPRESS_CHOICES)}")
    return v


def option(name: str, *aliases: str, help: str, **kwargs: Any) -> Any:
    """``typer.Option`` of a shared option: the name is spelled here once, the help may differ by
    command (e.g. ``--overwrite`` replaces an output file in one command, a folder in another)."""
    return typer.Option(name, *aliases, help=help, **kwargs)


#: Help texts of the shared options (commands pass their own where the meaning narrows).
HELP = {
    "output": "Output GeoTIFF path.",
    "overwrite": "Replace the output if it already exists.",
    "device": "Torch device: auto (CUDA/ROCm if available, else CPU), cpu, cuda, cuda:1.",
    "factor": "Child cells per parent cell along each axis (10: 1 km -> 100 m).",
    "quiet": "No progress bar; print only errors and warnings.",
    "json": "Also write the result as JSON to this file ('-': stdout).",
    "aux": "Auxiliary raster/vector file, directory or quoted glob ('aux/*.tif'); repeatable.",
    "categorical": "Read this aux raster (file stem or name, e.g. lc) as land-cover classes: one cover-fraction "
    "layer per class; repeatable. Otherwise only rasters tagged CARBONSR_KIND=categorical or with an "
    "integer type and a name such as landcover are.",
    "fill_missing": "Allow aux layers that do not cover the whole extent (filled, with a warning).",
}


def output_option(help: str = HELP["output"]) -> Any:
    """``-o/--output``."""
    return option("--output", "-o", help=help, show_default=False)


def overwrite_option(help: str = HELP["overwrite"]) -> Any:
    """``--overwrite``."""
    return option("--overwrite", help=help)


def device_option(help: str = HELP["device"]) -> Any:
    """``--device``."""
    return option("--device", help=help)


def factor_option(help: str = HELP["factor"]) -> Any:
    """``--factor`` (an int >= 2)."""
    return option("--factor", min=2, help=help)


def quiet_option(help: str = HELP["quiet"]) -> Any:
    """``-q/--quiet``."""
    return option("--quiet", "-q", help=help)


def json_option(help: str = HELP["json"]) -> Any:
    """``--json`` (a file or '-')."""
    return option("--json", help=help)


def aux_option(help: str = HELP["aux"]) -> Any:
    """``--aux`` (repeatable)."""
    return option("--aux", help=help)


def categorical_option(help: str = HELP["categorical"]) -> Any:
    """``--categorical NAME`` (repeatable)."""
    return option("--categorical", metavar="NAME", help=help)


def fill_missing_option(*aliases: str, help: str = HELP["fill_missing"]) -> Any:
    """``--fill-missing``."""
    return option("--fill-missing", *aliases, help=help)


def units_option(help: str) -> Any:
    """``--units`` of the main raster."""
    return option("--units", help=help)


#: ``--overwrite``: replace an existing output.
Overwrite = Annotated[bool, overwrite_option()]
#: ``--device``: torch device.
Device = Annotated[str, device_option()]
#: ``--factor``: child cells per parent cell along each axis.
Factor = Annotated[int, factor_option()]
#: ``--compress``: GeoTIFF compression.
Compress = Annotated[
    str,
    typer.Option("--compress", callback=lambda v: _check_compress(v),
                 help="GeoTIFF compression: deflate, lzw, zstd, lerc or none (predictor 3 for floats, 2 for integers)."),
]
#: ``--cog``: write a Cloud Optimized GeoTIFF.
Cog = Annotated[bool, typer.Option("--cog", help="Write a Cloud Optimized GeoTIFF (internal tiles + overviews).")]
#: ``-q/--quiet``: no progress bar or summary table.
Quiet = Annotated[bool, quiet_option()]
#: ``--json``: machine-readable result ("-" for stdout).
JsonOut = Annotated[Optional[Path], json_option()]
#: ``--aux``: repeatable; files, directories or quoted globs.
AuxPaths = Annotated[Optional[list[str]], aux_option()]
#: ``--categorical``: repeatable; aux rasters (file stem or name) read as class codes.
Categorical = Annotated[Optional[list[str]], categorical_option()]
#: ``--aoi``: restrict work to the parent cells touching these polygons.
Aoi = Annotated[
    Optional[Path],
    typer.Option("--aoi", help="Area of interest (GeoPackage/GeoJSON, any CRS): only parent cells touching it."),
]


def absorb_aux_values(args: list[str], params: list[click.Parameter], *, needs_positional: bool) -> list[str]:
    """Rewrite ``--aux a.tif b.tif c.tif`` (a glob the shell expanded) into repeated ``--aux``.

    Every bare path that follows an ``--aux`` value, up to the next option, is taken as
    another aux input. If that would leave the command without its positional argument
    (``carbonsr stats --aux aux/*.tif main.tif``), the last such path stays positional.

    Args:
        args: Command-line tokens after the command name.
        params: The command's click parameters (to know which options take a value).
        needs_positional: The command has a required positional argument.
    """
    takes_value: dict[str, bool] = {}
    aux_names: set[str] = set()
    for prm in params:
        # duck-typed: recent typer versions vendor their own click, whose classes differ from click's
        if getattr(prm, "param_type_name", "") == "option":
            for name in (*prm.opts, *prm.secondary_opts):
                takes_value[name] = not (getattr(prm, "is_flag", False) or getattr(prm, "count", False))
                if name == "--aux":
                    aux_names.update(prm.opts)
    out: list[str] = []
    absorbed: list[int] = []  # indices in ``out`` of the "--aux" tokens added here
    positional = 0
    absorbing = False
    i = 0
    while i < len(args):
        tok = args[i]
        if tok == "--":
            positional += len(args) - i - 1
            out.extend(args[i:])
            break
        if tok.startswith("-") and len(tok) > 1:
            name = tok.split("=", 1)[0]
            absorbing = False
            out.append(tok)
            if "=" not in tok and takes_value.get(name, False) and i + 1 < len(args):
                out.append(args[i + 1])
                i += 1
            if name in aux_names:
                absorbing = True
        elif absorbing:
            absorbed.append(len(out))
            out += ["--aux", tok]
        else:
            positional += 1
            out.append(tok)
        i += 1
    if needs_positional and positional == 0 and absorbed:
        k = absorbed[-1]
        value = out[k + 1]
        del out[k : k + 2]
        out.append(value)
    return out


class AuxGlobCommand(TyperCommand):
    """A Typer command whose ``--aux`` takes every following path (shell-expanded globs):
    ``--aux aux/*.tif`` works unquoted, as in ``carbonsr downscale``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:  # noqa: D102
        if "-h" in args or "--help" in args:
            return super().parse_args(ctx, args)
        needs = any(getattr(p, "param_type_name", "") == "argument" and p.required for p in self.params)
        return super().parse_args(ctx, absorb_aux_values(list(args), self.params, needs_positional=needs))


#: Typer's type labels (``<int range>``) -> the plain metavars shown in help (``INTEGER``).
_METAVARS = {"int": "INTEGER", "int range": "INTEGER", "float": "FLOAT", "float range": "FLOAT",
             "path": "PATH", "Path": "PATH", "str": "TEXT", "bool": "BOOLEAN"}


def _plain_metavar(label: str) -> str:
    """``<list[int]>`` -> ``INTEGER``, ``<a|b>`` -> ``[a|b]``: a click-style metavar for help."""
    inner = label.strip("<>")
    if inner.startswith("list[") and inner.endswith("]"):
        inner = inner[5:-1]
    if inner in _METAVARS:
        return _METAVARS[inner]
    return f"[{inner}]" if "|" in inner else inner.upper()


class PlainHelpOption(TyperOption):
    """An option whose help shows ``INTEGER``/``PATH`` (nothing after a flag) and ``[default: 20]``."""

    def display_type_rich(self, ctx: click.Context) -> str | None:  # noqa: D102
        if self.is_flag or self.count:
            return None
        if self.metavar is not None:
            return self.metavar
        return _plain_metavar(self.display_type(ctx))

    def _get_default_string(self, *, ctx: click.Context, show_default_is_str: bool, default_value: object) -> str:
        if show_default_is_str:
            return str(self.show_default)
        return super()._get_default_string(ctx=ctx, show_default_is_str=False, default_value=default_value)


class PlainHelpArgument(TyperArgument):
    """A positional argument shown as ``MAIN...`` (usage and help), without ``{main}`` or a type label."""

    @property
    def display_name_raw(self) -> str:  # noqa: D102
        return self.metavar if self.metavar is not None else (self.name or "").upper()

    def display_type_rich(self, ctx: click.Context) -> str | None:  # noqa: D102
        return None

    def _usage_display_name(self) -> str:
        name = self.display_name_raw + ("..." if self.nargs != 1 else "")
        return name if self.required else f"[{name}]"

    def _get_default_string(self, *, ctx: click.Context, show_default_is_str: bool, default_value: object) -> str:
        if show_default_is_str:
            return str(self.show_default)
        return super()._get_default_string(ctx=ctx, show_default_is_str=False, default_value=default_value)


def plain_help(command: click.Command, ctx: click.Context) -> click.Command:
    """Make ``command``'s help plain: its Typer parameters (and ``--help``) use the classes above."""
    for prm in command.get_params(ctx):
        if type(prm) is TyperOption:
            prm.__class__ = PlainHelpOption
        elif type(prm) is TyperArgument:
            prm.__class__ = PlainHelpArgument
    return command
