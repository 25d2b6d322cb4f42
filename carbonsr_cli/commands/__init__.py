"""Subcommands of the ``carbonsr`` CLI, one module each (listed in :data:`COMMAND_MODULES`, each
with ``register(app)``): parse options (``options.py``), call one library function, print."""

# Commands import their library modules (and through them torch, rasterio) inside the command
# function, so that ``carbonsr --help`` stays fast.

from __future__ import annotations

import importlib

import typer

#: Command modules, in the order they appear in ``carbonsr --help``.
COMMAND_MODULES: list[str] = ["sample_data", "stats", "train", "downscale", "evaluate", "demo"]


def register_all(app: typer.Typer) -> None:
    """Register every command module's commands on ``app``."""
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(app)
