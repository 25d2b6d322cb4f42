"""``carbonsr stats``: global statistics of the training data (table + JSON)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from carbonsr_cli.options import (
    AuxGlobCommand,
    AuxPaths,
    Categorical,
    Factor,
    Overwrite,
    Quiet,
    fill_missing_option,
    output_option,
    units_option,
)

HELP = """Compute the global statistics training needs (zero/nonzero balance, log-domain spread,
quantiles, per-aux-layer normalisation), print them and write them as JSON.

Example:
  carbonsr stats emissions_1km.tif --aux aux/ -o stats.json

Shell globs work (--aux aux/*.tif: the paths after --aux are aux inputs). -o - writes the JSON
to stdout (and the tables to stderr).
"""


def register(app: typer.Typer) -> None:
    """Add the ``stats`` command to ``app``."""
    app.command("stats", help=HELP, cls=AuxGlobCommand)(stats_command)


def stats_command(
    main: Annotated[
        list[Path],
        typer.Argument(help="Main raster(s): totals per cell, one band per year; several files are pooled.",
                       show_default=False),
    ],
    output: Annotated[
        Optional[Path],
        output_option("Write the statistics JSON here ('-': stdout).")
    ] = None,
    aux: AuxPaths = None,
    categorical: Categorical = None,
    factor: Factor = 10,
    units: Annotated[
        Optional[str],
        units_option("Unit of the main raster when it is a density (e.g. 'kg m-2 s-1'); default: "
                     "totals per cell."),
    ] = None,
    fill_missing_aux: Annotated[
        bool, fill_missing_option("--fill-missing-aux", help="Allow aux layers that do not cover the whole extent (filled).")
    ] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Compute and print the statistics; write them with ``-o`` (``-o -``: JSON on stdout)."""
    from carbonsr_cli.stats import compute_stats, save_stats

    to_stdout = output is not None and str(output) == "-"
    if output is not None and not to_stdout:
        from carbonsr_cli.atomic import check_not_an_input, check_output_path
        from carbonsr_cli.aux import expand_aux_paths

        check_output_path(output, overwrite)
        check_not_an_input(output, {"main raster": list(main), "aux layer": expand_aux_paths(aux)})
    stats = compute_stats(main, aux if aux else None, factor=factor, units=units, fill_missing=fill_missing_aux,
                          categorical=categorical)
    if to_stdout:
        import sys

        from carbonsr_cli.stats import stats_to_json_text

        sys.stdout.write(stats_to_json_text(stats))
        sys.stdout.flush()
    elif output is not None:
        save_stats(stats, output, overwrite=overwrite)
    if not quiet:
        from carbonsr_cli.console import err, out

        print_stats(stats, console=err if to_stdout else out)
        if output is not None and not to_stdout:
            out.print(f"wrote {output}")


def _f(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}g}"


def print_stats(stats: dict[str, Any], console: Any = None) -> None:
    """Print the stats dict as rich tables (on stdout unless ``console`` is given)."""
    from rich.table import Table

    from carbonsr_cli.console import escape
    from carbonsr_cli.console import out as _stdout

    out = console if console is not None else _stdout

    g = stats["grid"]
    grid = Table(title="Grid", show_header=False)
    grid.add_column("key")
    grid.add_column("value")
    res = g.get("res") or [math.nan, math.nan]
    for k, v in (
        ("files", ", ".join(escape(f["path"]) for f in stats.get("files", [g]))),
        ("CRS", escape(str(g.get("crs")))),
        ("size", f"{g['width']} x {g['height']} cells"),
        ("resolution", f"{_f(res[0])} x {_f(res[1])} CRS units (child: / {g.get('factor', 10)})"),
        ("nodata", str(g.get("nodata"))),
        ("units", escape(str(g.get("units")))),
    ):
        grid.add_row(k, v)
    out.print(grid)

    multi = len(stats.get("files", [])) > 1
    cols = [(f"{Path(b['file']).name}:{b['name']}" if multi else str(b["name"]), b) for b in stats["bands"]]
    cols.append(("all", stats["main"]))
    t = Table(title="Main raster (quantiles of nonzero cells)")
    t.add_column("")
    for label, _ in cols:
        t.add_column(escape(label), justify="right")
    rows: list[tuple[str, Any]] = [
        ("sum", lambda m: _f(m["sum"], 7)),
        ("valid cells", lambda m: _f(m["cells"])),
        ("zero", lambda m: _f(m["n_zero"])),
        ("nonzero", lambda m: _f(m["n_nonzero"])),
        ("negative", lambda m: _f(m["n_negative"])),
        ("nodata", lambda m: _f(m["n_nodata"])),
        ("log(Nz/Nnz)", lambda m: _f(m["log_nz_over_nnz"])),
        ("mean log1p", lambda m: _f(m["mean_log"])),
        ("CV log1p", lambda m: _f(m["cv_log"])),
        ("min nonzero", lambda m: _f(m["min_nonzero"])),
        *((k, (lambda key: lambda m: _f(m["quantiles"].get(key)))(k)) for k in ("p5", "p50", "p95", "p99", "p99.9")),
        ("max", lambda m: _f(m["max"])),
    ]
    for name, fn in rows:
        t.add_row(name, *(fn(m) for _, m in cols))
    out.print(t)

    if stats.get("aux"):
        a = Table(title="Aux layers (raw values on the child grid, sampled tiles)")
        for c in ("layer", "mean", "std", "max", "skew", "norm", "clip"):
            a.add_column(c, justify="left" if c in ("layer", "norm") else "right", no_wrap=c in ("layer", "clip"))
        for e in stats["aux"]:
            a.add_row(escape(e["name"]), _f(e["raw_mean"], 3), _f(e["raw_std"], 3), _f(e["raw_max"], 3),
                      _f(e["skewness"], 2), e["transform"], f"{_f(e['clip_lo'], 2)}..{_f(e['clip_hi'], 2)}")
        out.print(a)
        cov = Table(title="Aux coverage")
        for c in ("layer", "year", "file", "covered", "filled"):
            cov.add_column(c, justify="right" if c in ("covered", "filled") else "left")
        for c in stats.get("aux_coverage", []):
            cov.add_row(escape(c["name"]), str(c["year"] or "static"), escape(Path(c["path"]).name),
                        f"{c['covered']:.1%}", f"{c['nodata']:.2%}")
        out.print(cov)
