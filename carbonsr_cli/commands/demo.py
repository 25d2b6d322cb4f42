"""``carbonsr demo``: sample data -> training -> downscaling -> evaluation, in one command."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from carbonsr_cli.options import device_option, overwrite_option

HELP = """Run the whole product on a synthetic sample region (a few minutes on 2 CPU cores).

Generates the sample data, trains the tiny model briefly on the CPU, downscales the 1 km
emissions to 100 m with the model and with the uniform and dasymetric baselines, scores all
of them against the hidden 100 m truth (on the held-out validation region and on the whole
region) and checks conservation. Writes a quick-look PNG and results.json.

Example:  carbonsr demo ./carbonsr-demo
"""


def _f(v: Any, kind: str = "") -> str:
    """Compact number for the demo table (4 significant digits)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if kind == "ratio":
        return f"{v:.3f}"
    if kind == "r2":
        return f"{v:.2f}"
    if kind == "rel":
        return f"{v:.1e}"
    return f"{v:.4g}"


def demo_table(rows: list[dict[str, Any]]) -> Any:
    """Rich table of the demo's final scores (held-out region first, then the whole region)."""
    from rich import box
    from rich.table import Table

    dasy = next((r["method"] for r in rows if r["method"].startswith("dasymetric")), "dasymetric")
    t = Table(
        title="carbonsr demo: 100 m outputs vs the hidden 100 m truth",
        caption=f"held-out: validation region of the training split (never trained on); all: whole region. "
        f"Errors in t CO2 / 100 m cell / yr. dasymetric = {dasy}. ratio: Nonzero-MAE / best baseline's "
        "(< 1: the model wins). cons. err: worst relative 10 x 10 block-sum error vs the 1 km input.",
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        pad_edge=False,
        show_edge=False,
    )
    t.add_column("region", no_wrap=True)
    t.add_column("method", no_wrap=True)
    for col in ("Nonzero-MAE", "Bal. MAE", "Top-1%", "R2", "cons. err", "ratio"):
        t.add_column(col, justify="right", no_wrap=True)
    last = None
    for r in rows:
        first = r["region"] != last
        if first and last is not None:
            t.add_section()
        last = r["region"]
        ratio = _f(r["ratio"], "ratio")
        if r["method"] == "model":
            ratio = f"[{'green' if r['ratio'] < 1 else 'red'}]{ratio}[/]"
        name = "dasymetric" if r["method"].startswith("dasymetric") else r["method"]
        region = ("held-out" if r["region"] == "held-out" else "all") if first else ""
        t.add_row(
            region, name, _f(r["nonzero-mae"]), _f(r["balanced-mae"]), _f(r["top1-mae"]),
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
        overwrite: Annotated[bool, overwrite_option("Replace a previous demo in DIRECTORY.")] = False,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the sample region and of the training.")] = 0,
        device: Annotated[str, device_option("cpu (default, reproducible), cuda, auto.")] = "cpu",
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
        out.print(f"time: {secs}", soft_wrap=True)
        out.print("files:")
        out.print(f"  sample data      {res.data_dir}  (truth_100m.tif is for scoring only)", soft_wrap=True)
        out.print(
            f"  training run     {res.run_dir}  (best_model.pth, stats.json, split.json, metrics.csv)", soft_wrap=True
        )
        for name, path in res.outputs.items():
            out.print(f"  {name + ' output':<16} {path}", soft_wrap=True)
        out.print(f"  quick-look       {res.quicklook}", soft_wrap=True)
        out.print(f"  all numbers      {res.results_json}", soft_wrap=True)
        truth = res.data_dir / "truth_100m.tif"
        out.print(f"next: carbonsr evaluate {res.outputs['model']} --reference {truth} --plot compare.png", soft_wrap=True)
