"""The options of a downscaling run: :class:`DownscaleOptions` (as given by the caller) and
:class:`MainSource` (the resolved main raster), plus the ``--co`` parser."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from carbonsr_cli.errors import UsageError

__all__ = ["DownscaleOptions", "MainSource", "parse_creation_options"]


def parse_creation_options(values: Sequence[str] | dict[str, str] | None) -> dict[str, str]:
    """``--co KEY=VALUE`` strings -> ``{KEY: VALUE}`` (keys upper-cased).

    Raises:
        UsageError: an item without ``=`` or with an empty key.
    """
    if not values:
        return {}
    if isinstance(values, dict):
        return {str(k).upper(): str(v) for k, v in values.items()}
    out: dict[str, str] = {}
    for item in values:
        key, eq, val = str(item).partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--co {item!r}: expected KEY=VALUE (a GDAL creation option, e.g. ZLEVEL=9)")
        out[key.strip().upper()] = val.strip()
    return out


@dataclass(frozen=True)
class DownscaleOptions:
    """The options of one :func:`~carbonsr_cli.downscale.downscale` call, as given (see its
    docstring); ``creation_options`` already parsed. Planning, the engine and the check read
    them from here instead of each taking the list again."""

    method: str | None = None
    checkpoint: str | os.PathLike[str] | None = None
    device: str = "auto"
    batch_size: int | None = None
    dtype: str = "float32"
    cog: bool = False
    overwrite: bool = False
    years: Sequence[str | int] | None = None
    bands: Sequence[int] | None = None
    aoi: str | os.PathLike[str] | None = None
    factor: int | None = None
    compress: str = "deflate"
    uncertainty: str | os.PathLike[str] | None = None
    progress: bool = True
    check: bool = True
    fill_missing: bool = False
    categorical: Sequence[str] | None = None
    overlap: int = 2
    creation_options: dict[str, str] = field(default_factory=dict)
    overviews: bool = False


@dataclass(frozen=True)
class MainSource:
    """The main raster as planning sees it, after ``inventory.resolve_main`` (and any
    conversion to totals): the GeoTIFF read, its unit and the user's names for it."""

    path: Path
    units: str = "totals"
    units_label: str | None = None
    notes: Sequence[str] = ()
    source_name: str | None = None
