"""Subcommands of the ``carbonsr`` CLI, one module each.

Every module listed in :data:`COMMAND_MODULES` defines ``register(app)``, which
adds its command(s) to the Typer app. Commands stay thin: parse options, call
one library function, print the result. Import heavy libraries (torch,
rasterio) inside the command function so ``carbonsr --help`` stays fast.
"""

from __future__ import annotations

import importlib

import typer

#: Command modules, in the order they appear in ``carbonsr --help``.
COMMAND_MODULES: list[str] = ["sample_data", "stats", "train", "downscale", "evaluate", "demo"]


def register_all(app: typer.Typer) -> None:
    """Register every command module's commands on ``app``."""
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(app)
