"""``carbonsr demo``: sample data -> training -> downscaling -> evaluation, in one command."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

HELP = """Run the whole product on a synthetic sample region (a few minutes on 2 CPU cores).

Generates the sample data, trains the tiny model briefly on the CPU, downscales the 1 km
emissions to 100 m with the model and with the uniform and dasymetric baselines, scores all
of them against the hidden 100 m truth (on the held-out validation region and on the whole
region) and checks conservation. Writes a quick-look PNG and results.json.

Example:  carbonsr demo ./carbonsr-demo
"""


def _f(v: Any, kind: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if kind == "ratio":
        return f"{v:.3f}"
    if kind == "r2":
        return f"{v:.3f}"
    if kind == "rel":
        return f"{v:.1e}"
    return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"


def demo_table(rows: list[dict[str, Any]]) -> Any:
    """Rich table of the demo's final scores."""
    from rich.table import Table

    t = Table(title="carbonsr demo: 100 m scores against the hidden truth (t CO2 / 100 m cell / yr)")
    for col in ("region", "method", "Nonzero-MAE", "Balanced MAE", "Top-1% MAE", "R2",
                "conservation max rel err", "Nonzero-MAE / best baseline"):
        t.add_column(col, justify="left" if col in ("region", "method") else "right")
    last = None
    for r in rows:
        if last is not None and r["region"] != last:
            t.add_section()
        last = r["region"]
        ratio = _f(r["ratio"], "ratio")
        if r["method"] == "model":
            ratio = f"[{'green' if r['ratio'] < 1 else 'red'}]{ratio}[/]"
        t.add_row(
            r["region"], r["method"], _f(r["nonzero-mae"]), _f(r["balanced-mae"]), _f(r["top1-mae"]),
            _f(r["r2"], "r2"), _f(r["max_rel_err"], "rel") + ("" if r["conserves"] else " FAIL"), ratio,
        )
    return t


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the app."""

    @app.command("demo", help=HELP)
    def demo_cmd(
        directory: Annotated[
            Path, typer.Argument(help="Directory for the demo's files (created).", show_default=True)
        ] = Path("carbonsr-demo"),
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous demo in DIRECTORY.")] = False,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the sample region and of the training.")] = 0,
        device: Annotated[str, typer.Option("--device", help="cpu (default, reproducible), cuda, auto.")] = "cpu",
        max_train_seconds: Annotated[
            Optional[float],
            typer.Option("--max-train-seconds", help="Stop training after this many seconds (default: the full "
                         "demo preset)."),
        ] = None,
    ) -> None:
        from carbonsr_cli.console import out
        from carbonsr_cli.demo import run_demo
        from carbonsr_cli.errors import UsageError

        if seed < 0:
            raise UsageError(f"--seed must be >= 0, got {seed}")
        if max_train_seconds is not None and max_train_seconds <= 0:
            raise UsageError("--max-train-seconds must be > 0")
        res = run_demo(directory, overwrite=overwrite, seed=seed, device=device, max_train_seconds=max_train_seconds)
        out.print(demo_table(res.rows))
        if res.model_beats_baselines:
            out.print("The model beats every baseline on the held-out region (ratio < 1).")
        else:
            out.print("[yellow]The model does not beat every baseline on the held-out region in this run.[/yellow]")
        secs = ", ".join(f"{k} {v:.0f} s" for k, v in res.seconds.items())
        out.print(f"time: {secs}")
        out.print("files:")
        out.print(f"  sample data      {res.data_dir}  (truth_100m.tif is for scoring only)")
        out.print(f"  training run     {res.run_dir}  (best_model.pth, stats.json, split.json, metrics.csv)")
        for name, path in res.outputs.items():
            out.print(f"  {name + ' output':<16} {path}")
        out.print(f"  quick-look       {res.quicklook}")
        out.print(f"  all numbers      {res.results_json}")
        out.print(f"next: carbonsr evaluate {res.outputs['model']} --reference {res.data_dir / 'truth_100m.tif'} "
                  f"--plot compare.png")
