"""``carbonsr downscale``: 1 km totals -> 100 m GeoTIFF whose blocks sum to the totals."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from carbonsr_cli.console import plural
from carbonsr_cli.options import (
    Aoi,
    AuxPaths,
    Categorical,
    Cog,
    Compress,
    JsonOut,
    Overwrite,
    Quiet,
    device_option,
    factor_option,
    fill_missing_option,
    output_option,
    units_option,
)

HELP = """Downscale a 1 km emission raster to 100 m with a trained model or a baseline.

Example: carbonsr downscale emissions_1km.tif --aux aux/ --model runs/r1/best_model.pth -o out_100m.tif

Every factor x factor block of output cells sums to its 1 km total (float64 water-filling), values are >= 0, and cells are nodata exactly where the 1 km cell is nodata. The closing table checks this on the written file.

[b]Methods[/b]: model (default with --model); uniform (total / factor^2 per child); dasymetric[:LAYER] (shares proportional to one aux layer, default the first; uniform where it sums to 0 in a block).

[b]Temporary files[/b]: the output is written to a hidden .OUT.<host>-<pid>-*.tmp.tif next to it and renamed when complete; large runs pre-warp aux layers into a hidden .carbonsr-warp-<host>-<pid>-* folder next to the output, pass the layers to reader processes through carbonsr-aux-*.pkl in $TMPDIR and share strips through /dev/shm/carbonsr-*. All are removed at the end, on errors and on Ctrl-C; after a kill -9 the next run removes them.

Aux layers are matched to the model by name: their order does not matter. Shell globs work (--aux aux/*.tif: extra paths after MAIN are aux inputs). Each output year uses the model's T years centred on it, shifted inside the available years at the ends (the nearest year repeats when the raster has fewer than T). Output nodata: the input's nodata if it is NaN or negative, else -9999.
"""


def _fmt_num(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.3g}"
    return f"{v:,.3f}"


def _print_table(summary: Any, console: Any) -> None:
    from rich.table import Table

    c = summary.conservation
    t = Table(title=f"carbonsr downscale: {summary.output}", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("method", summary.method + (f"  (model sha256 {summary.model_sha256[:12]})" if summary.model_sha256 else ""))
    t.add_row("years", ", ".join(summary.years))
    t.add_row("factor", f"{summary.factor} (child cell = 1/{summary.factor ** 2} of a parent cell)")
    t.add_row("area", f"{summary.area_km2:,.1f} km2")
    t.add_row("parent cells", f"{summary.parent_shape[0]:,} x {summary.parent_shape[1]:,} ({summary.parent_cells_valid:,} valid, all years)")
    t.add_row("child cells", f"{summary.child_shape[0]:,} x {summary.child_shape[1]:,} per band")
    t.add_row("device", f"{summary.device} ({summary.precision}, batch {summary.batch_size})")
    t.add_row("time", f"{summary.seconds:.2f} s ({summary.tiles:,} tiles)")
    n_years = max(1, len(summary.years))
    t.add_row("throughput", f"{summary.area_km2 / max(summary.seconds, 1e-9):,.1f} km2/s per year "
              f"({plural(n_years, 'year')}: {summary.km2_per_s:,.1f} km2-years/s)")
    t.add_row("output", f"{summary.dtype}, nodata {summary.nodata:g}, units {summary.units}")
    if summary.uncertainty:
        t.add_row("uncertainty", summary.uncertainty)
    status = "[green]OK[/green]" if c.ok else "[red]FAILED[/red]"
    t.add_row("conservation", f"{status}  max rel. block-sum error {c.max_rel_error:.2e} (tol 1e-6), max abs {_fmt_num(c.max_abs_error)}")
    t.add_row("", f"{c.blocks:,} blocks; negatives {c.negatives}; NaN {c.nans}; nodata mismatches {c.nodata_mismatch}; "
              f"nonzero children in zero blocks {c.zero_blocks_violated}")
    for note in summary.notes:
        t.add_row("note", note)
    console.print(t)


def register(app: typer.Typer) -> None:
    """Add the ``downscale`` command to ``app``."""

    @app.command("downscale", help=HELP, no_args_is_help=True)
    def downscale_cmd(
        inputs: Annotated[
            list[Path],
            typer.Argument(help="MAIN raster (1 km totals or densities, one band per year or month; GeoTIFF, netCDF, or a quoted glob of files on one grid); further paths are aux inputs.", show_default=False,
                           metavar="MAIN [AUX]"),
        ],
        output: Annotated[Path, output_option("Output GeoTIFF (child grid).")],
        aux: AuxPaths = None,
        categorical: Categorical = None,
        model: Annotated[
            Optional[Path], typer.Option("--model", "-m", help="carbonsr checkpoint (best_model.pth).")
        ] = None,
        method: Annotated[
            Optional[str], typer.Option("--method", help="model | fitted | auto (these three need --model) | points[:LAYER] | dasymetric[:LAYER] | uniform (default: model with --model). auto = the model unless the run validated it worse than uniform; see README 'Methods and accuracy'.")
        ] = None,
        year: Annotated[Optional[list[str]], typer.Option("--year", help="Output year (band name); repeatable. Default: all.")] = None,
        band: Annotated[Optional[list[int]], typer.Option("--band", help="Output band (1-based) instead of --year; repeatable.")] = None,
        device: Annotated[str, device_option(
            "Torch device: auto (CUDA/ROCm if available, else CPU), cpu, cuda, cuda:1; several GPUs in one "
            "process: cuda:0,cuda:1 or cuda:all (the model runs on each, the first blends and writes)."
        )] = "auto",
        batch_size: Annotated[
            Optional[int], typer.Option("--batch-size", min=1, help="Tiles per model batch (default 128 on CUDA, 8 on CPU).")
        ] = None,
        dtype: Annotated[str, typer.Option("--dtype", help="Output type: float32 or float64.")] = "float32",
        factor: Annotated[
            Optional[int], factor_option("Child cells per parent cell for baselines (default 10; a model uses its own).")
        ] = None,
        units: Annotated[
            Optional[str],
            units_option("Unit of the main raster: a total per cell ('t/cell/yr', 't C/cell/month', 'Tonnes') or a density "
                         "('kg m-2 s-1', 't km-2 yr-1'), converted with cell areas. Default: the file's units attribute, else t CO2/cell/yr."),
        ] = None,
        variable: Annotated[
            Optional[str], typer.Option("--variable", help="netCDF variable of the main input (default: its only data variable).")
        ] = None,
        months: Annotated[
            bool, typer.Option("--months", help="Read 4-digit YYMM in main file names as months (ODIAC: ..._1901.tif is 2019-01).")
        ] = False,
        annual: Annotated[
            bool, typer.Option("--annual", help="Sum monthly bands to annual totals before downscaling (default: each month).")
        ] = False,
        co2: Annotated[bool, typer.Option("--co2", help="Convert carbon (t C) to t CO2 (x 44/12).")] = False,
        co: Annotated[
            Optional[list[str]], typer.Option("--co", help="GDAL creation option KEY=VALUE for the output (repeatable), e.g. ZLEVEL=9.")
        ] = None,
        overviews: Annotated[bool, typer.Option("--overviews", help="Build overviews (average) in a plain GeoTIFF output.")] = False,
        cog: Cog = False,
        compress: Compress = "deflate",
        aoi: Aoi = None,
        overwrite: Overwrite = False,
        uncertainty: Annotated[
            Optional[Path],
            typer.Option("--uncertainty", help="Also write the per-pixel std over 8 flips/rotations of each tile (model only, 8x slower)."),
        ] = None,
        fill_missing: Annotated[
            bool,
            fill_missing_option(help="Allow aux layers that do not cover the whole extent (gaps filled, with a warning)."),
        ] = False,
        overlap: Annotated[
            int,
            typer.Option("--overlap", min=0, help="Tile context margin in parent cells per side (1: about a third less work, slightly less accurate)."),
        ] = 2,
        quiet: Quiet = False,
        json_out: JsonOut = None,
    ) -> None:
        from carbonsr_cli.methods import needs_torch

        if needs_torch(method):  # uniform and dasymetric fill in numpy and never import torch
            from carbonsr_cli.preload import preload_torch

            preload_torch()  # overlaps the imports and checks below
        from carbonsr_cli.console import err, out
        from carbonsr_cli.downscale import downscale
        from carbonsr_cli.preload import allow_fast_exit
        from carbonsr_cli.errors import ConservationError, UsageError

        if dtype not in ("float32", "float64"):
            raise typer.BadParameter(f"{dtype!r}; choose float32 or float64", param_hint="--dtype")
        main, extra = inputs[0], [str(p) for p in inputs[1:]]
        aux_paths = list(aux or []) + extra
        if extra and not aux:
            raise UsageError(
                f"more than one input raster given ({', '.join(map(str, inputs))}); aux layers go after --aux, "
                "several main files (e.g. months) as one quoted glob: 'odiac/*_19??.tif'"
            )
        if json_out is not None and str(json_out) != "-":
            from carbonsr_cli.atomic import check_not_an_input
            from carbonsr_cli.aux import expand_aux_paths

            check_not_an_input(json_out, {"output raster": output, "uncertainty raster": uncertainty, "main raster": main,
                                          "aux layer": expand_aux_paths(aux_paths), "model checkpoint": model,
                                          "AOI file": aoi})
        summary = downscale(
            main,
            aux_paths,
            output,
            method=method,
            checkpoint=model,
            device=device,
            batch_size=batch_size,
            dtype=dtype,
            cog=cog,
            overwrite=overwrite,
            years=year,
            bands=band,
            aoi=aoi,
            factor=factor,
            units=units,
            compress=compress,
            uncertainty=uncertainty,
            progress=not quiet,
            fill_missing=fill_missing,
            categorical=categorical or None,
            overlap=overlap,
            variable=variable,
            months=months,
            annual=annual,
            co2=co2,
            creation_options=co,
            overviews=overviews,
        )
        if json_out is not None:
            text = json.dumps(summary.to_dict(), indent=2, default=_json_default)
            if str(json_out) == "-":
                sys.stdout.write(text + "\n")
            else:
                from carbonsr_cli.atomic import atomic_write_text

                atomic_write_text(json_out, text + "\n")
        if not quiet:
            _print_table(summary, err if str(json_out) == "-" else out)
        allow_fast_exit()  # every output is closed and in place (also when the check failed)
        if not summary.conservation.ok:
            raise ConservationError(
                "conservation check FAILED on the written file (this is a bug; please report it): "
                f"max relative error {summary.conservation.max_rel_error:.2e}",
                summary.output,
            )


def _json_default(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, Path):
        return str(v)
    return str(v)
