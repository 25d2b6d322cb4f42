"""``carbonsr sample-data``: write the deterministic synthetic sample region."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import click
import typer

from carbonsr_cli.options import overwrite_option
from typer.core import TyperCommand

if TYPE_CHECKING:
    from carbonsr_cli.sample_data import SampleData

EXAMPLE = "carbonsr sample-data data/sample --seed 0 --size-km 96 --years 2019 2020 2021"
DEFAULT_YEARS = (2019, 2020, 2021)
_YEAR_TOKEN = re.compile(r"\d{4}(,\d{4})*,?")


def expand_years(args: list[str]) -> list[str]:
    """Rewrite ``--years 2019 2020`` and ``--years 2019,2020`` into repeated ``--years`` options.

    Click options take one value each; this lets ``--years`` take every following
    4-digit token (so put OUT_DIR before ``--years`` if its name is a 4-digit number).
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        if arg == "--years" or arg.startswith("--years="):
            if arg == "--years":
                if i + 1 >= len(args):
                    out.append(arg)  # let click report the missing value
                    break
                values = [args[i + 1]]
                i += 2
            else:
                values = [arg.split("=", 1)[1]]
                i += 1
            while i < len(args) and _YEAR_TOKEN.fullmatch(args[i]):
                values.append(args[i])
                i += 1
            for value in values:
                parts = [p for p in value.split(",") if p] or [value]
                for part in parts:
                    out += ["--years", part]
            continue
        out.append(arg)
        i += 1
    return out


class _YearsCommand(TyperCommand):
    """A Typer command whose ``--years`` option accepts several space-separated values."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:  # noqa: D102
        return super().parse_args(ctx, expand_years(list(args)))


def register(app: typer.Typer) -> None:
    """Add the ``sample-data`` command to ``app``."""
    app.command(
        "sample-data",
        cls=_YearsCommand,
        help=(
            "Write a deterministic synthetic region: 1 km emissions (one band per year, t CO2 / cell / yr), "
            "the 100 m truth (for evaluation only) and auxiliary layers in OUT_DIR/aux/ "
            "(lights, population, NDVI in EPSG:4326, land cover, built-up, roads.gpkg), and an incomplete "
            "point catalogue of the plants, OUT_DIR/plants.gpkg (use --aux OUT_DIR/plants.gpkg:co2_t_yr). "
            "--kind picks the region: mixed, points (point-source dominated), traffic (streets) or urban "
            "(smooth, heating). The process is described in OUT_DIR/README.txt.\n\n"
            "Temporary files: the region is written into a hidden .OUT_DIR.tmp-<host>-<pid>-* folder next to "
            "OUT_DIR and renamed when complete (removed on errors and Ctrl-C; after a kill -9 the next run for "
            "the same OUT_DIR removes it). --overwrite only replaces an earlier sample region.\n\n"
            f"Example: {EXAMPLE}"
        ),
        short_help="Write a synthetic sample region (1 km emissions, 100 m truth, aux layers).",
    )(sample_data)


def sample_data(
    out_dir: Annotated[Path, typer.Argument(help="Directory to create (must not exist or be empty, unless --overwrite).", show_default=False)],
    seed: Annotated[int, typer.Option("--seed", min=0, help="Random seed; the same seed gives identical data.")] = 0,
    size_km: Annotated[
        int,
        typer.Option("--size-km", min=12, help="Edge of the square region in km (1 km cells per side); 1000 for benchmarks (~4 GB RAM)."),
    ] = 96,
    years: Annotated[
        Optional[list[int]],
        typer.Option(
            "--years",
            help="Years to generate, one band each: --years 2019 2020 2021, --years 2019,2020 or a repeated --years.",
            show_default="2019 2020 2021",
        ),
    ] = None,
    overwrite: Annotated[bool, overwrite_option("Replace OUT_DIR if it exists and is not empty.")] = False,
    kind: Annotated[
        str,
        typer.Option(
            "--kind",
            help="Region kind: mixed (default), points (point-source dominated), traffic (street dominated) "
            "or urban (smooth, heating dominated).",
        ),
    ] = "mixed",
) -> None:
    """Write the sample region and print a table of the files written."""
    from carbonsr_cli.console import out
    from carbonsr_cli.sample_data import generate_sample_data

    result = generate_sample_data(
        out_dir, seed=seed, size_km=size_km, years=tuple(years) if years else DEFAULT_YEARS, overwrite=overwrite, kind=kind
    )
    out.print(_files_table(result))
    out.print(
        f"Wrote {len(result.files)} files to {result.root} (seed {result.seed}, kind {result.kind}, "
        f"years {', '.join(map(str, result.years))})."
    )
    out.print(
        f"Auxiliary layers: {result.aux_dir}/* (plus {result.plants}:co2_t_yr); truth_100m.tif is for evaluation only."
    )


def _files_table(result: SampleData) -> Any:
    from rich.table import Table

    table = Table(title=f"carbonsr sample data in {result.root}")
    table.add_column("file", no_wrap=True)
    table.add_column("grid (rows x cols x bands)", justify="right")
    table.add_column("CRS")
    table.add_column("resolution", justify="right")
    table.add_column("size", justify="right", no_wrap=True)
    for path in result.files:
        grid, crs, res = _describe(path)
        table.add_row(str(path.relative_to(result.root)), grid, crs, res, _human_size(path.stat().st_size))
    return table


def _describe(path: Path) -> tuple[str, str, str]:
    """(grid, CRS, resolution) strings for a raster, a vector or another file."""
    if path.suffix == ".tif":
        import rasterio

        with rasterio.open(path) as ds:
            crs = ds.crs.to_string() if ds.crs else "-"
            unit = "deg" if ds.crs and ds.crs.is_geographic else "m"
            return f"{ds.height}x{ds.width}x{ds.count}", crs, f"{ds.res[0]:g} {unit}"
    if path.suffix == ".gpkg":
        import pyogrio

        info = pyogrio.read_info(path)
        gtype = str(info.get("geometry_type") or "").lower()
        what = "points" if "point" in gtype else "lines" if "line" in gtype else "features"
        return f"{info['features']} {what}", str(info["crs"]), "vector"
    return "-", "-", "-"


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover
