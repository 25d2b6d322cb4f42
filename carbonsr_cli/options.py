"""Shared Typer option aliases, so every command spells common options the same way.

Use them as parameter annotations with a default::

    def downscale(main: InputTif, output: OutputTif, overwrite: Overwrite = False,
                  aux: AuxPaths = None, device: Device = "auto") -> None: ...

This module imports only typer (no rasterio/torch), so ``carbonsr --help`` stays fast.
Used by: downscale (most), train, stats, evaluate, sample-data, demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

__all__ = [
    "InputTif",
    "OutputTif",
    "Overwrite",
    "Device",
    "Factor",
    "Compress",
    "Cog",
    "Quiet",
    "JsonOut",
    "AuxPaths",
    "Aoi",
    "InputUnits",
    "COMPRESS_CHOICES",
]

#: Values of ``--compress`` (mirrors ``writer.COMPRESSIONS``; kept here to avoid importing rasterio).
COMPRESS_CHOICES = ("deflate", "lzw", "zstd", "lerc", "none")

def _check_compress(value: str) -> str:
    """Validate and lower-case ``--compress`` (exit 2 on an unknown name)."""
    v = (value or "").lower()
    if v not in COMPRESS_CHOICES:
        raise typer.BadParameter(f"{value!r}; choose one of {', '.join(COMPRESS_CHOICES)}")
    return v


#: Main input raster (positional): totals per cell, one band per year.
InputTif = Annotated[
    Path,
    typer.Argument(help="Main raster (GeoTIFF, one band per year; totals per cell unless --units says otherwise).",
                   show_default=False),
]
#: Output raster (``-o/--output``).
OutputTif = Annotated[Path, typer.Option("--output", "-o", help="Output GeoTIFF path.", show_default=False)]
#: ``--overwrite``: replace an existing output.
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the output if it already exists.")]
#: ``--device``: torch device.
Device = Annotated[
    str, typer.Option("--device", help="Torch device: auto (CUDA/ROCm if available, else CPU), cpu, cuda, cuda:1.")
]
#: ``--factor``: child cells per parent cell along each axis.
Factor = Annotated[
    int, typer.Option("--factor", min=2, help="Child cells per parent cell along each axis (10: 1 km -> 100 m).")
]
#: ``--compress``: GeoTIFF compression.
Compress = Annotated[
    str,
    typer.Option("--compress", callback=lambda v: _check_compress(v),
                 help="GeoTIFF compression: deflate, lzw, zstd, lerc or none (predictor 3 for floats, 2 for integers)."),
]
#: ``--cog``: write a Cloud Optimized GeoTIFF.
Cog = Annotated[bool, typer.Option("--cog", help="Write a Cloud Optimized GeoTIFF (internal tiles + overviews).")]
#: ``-q/--quiet``: no progress bar or summary table.
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; print only errors and warnings.")]
#: ``--json``: machine-readable result ("-" for stdout).
JsonOut = Annotated[
    Optional[Path], typer.Option("--json", help="Also write the result as JSON to this file ('-': stdout).")
]
#: ``--aux``: repeatable; files, directories or quoted globs.
AuxPaths = Annotated[
    Optional[list[str]],
    typer.Option("--aux", help="Auxiliary raster/vector file, directory or quoted glob ('aux/*.tif'); repeatable."),
]
#: ``--aoi``: restrict work to the parent cells touching these polygons.
Aoi = Annotated[
    Optional[Path],
    typer.Option("--aoi", help="Area of interest (GeoPackage/GeoJSON, any CRS): only parent cells touching it."),
]
#: ``--units``: unit of the main raster values.
InputUnits = Annotated[
    str,
    typer.Option("--units", help="Unit of the main raster: a total per cell ('t/cell/yr', default) or a density "
                 "('kg m-2 s-1', 't km-2 yr-1', 't ha-1 yr-1'), converted with cell areas."),
]
