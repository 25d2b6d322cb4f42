"""``carbonsr evaluate``: conservation check, comparison with a reference, self-validation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from carbonsr_cli.options import (
    AuxGlobCommand,
    aux_option,
    categorical_option,
    device_option,
    json_option,
    overwrite_option,
)

from carbonsr_cli.errors import UsageError

HELP = """Check a downscaled raster: conservation of the totals, accuracy against a reference,
or scale-shift self-validation of a model.

[b]Conservation[/b] (exit code 1 if any block misses its total beyond tolerance):
  carbonsr evaluate out_100m.tif --totals emissions_1km.tif

[b]Against a reference[/b] (same resolution or coarser; the prediction is summed onto it):
  carbonsr evaluate out_100m.tif --reference truth_100m.tif --json - --plot cmp.png

[b]Self-validation[/b] (coarsen MAIN by each scale, downscale back, compare with MAIN):
  carbonsr evaluate --model runs/x/best_model.pth --main emissions_1km.tif --aux aux/ --scales 2,4,12

Shell globs work (--aux aux/*.tif: the paths after --aux are aux inputs).
"""


def _parse_region(value: Optional[str]) -> Optional[tuple[float, float, float, float]]:
    if value is None:
        return None
    parts = [p for p in value.replace(" ", "").split(",") if p]
    try:
        nums = tuple(float(p) for p in parts)
    except ValueError:
        nums = ()
    if len(nums) != 4 or not all(math.isfinite(v) for v in nums) or not (nums[2] > nums[0] and nums[3] > nums[1]):
        raise UsageError(f"expected minx,miny,maxx,maxy with max > min, got {value!r}")
    return nums  # type: ignore[return-value]


def _parse_scales(values: Optional[list[str]]) -> Optional[list[int]]:
    if not values:
        return None
    out: list[int] = []
    for v in values:
        for p in v.replace(" ", ",").split(","):
            if not p:
                continue
            try:
                s = int(p)
            except ValueError:
                raise UsageError(f"scales must be integers >= 2, got {p!r}") from None
            if s < 2:
                raise UsageError(f"scales must be integers >= 2, got {s}")
            out.append(s)
    return sorted(set(out))


def _check_metrics(values: Optional[list[str]]) -> Optional[list[str]]:
    from carbonsr_cli.evaluate import METRICS

    if not values:
        return None
    for v in values:
        if v not in METRICS:
            raise UsageError(f"unknown metric {v!r}; choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(values))


def _fmt(v: Any, name: str = "") -> str:
    if isinstance(v, int):
        return f"{v:,}"
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if name == "bias":
        return f"{v:+.3%}"
    if name in ("r2", "pearson", "ratio"):
        return f"{v:.4f}"
    return f"{v:.4g}"


def _json_safe(obj: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None / strings."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def conservation_table(report: Any) -> Any:
    """Rich table of a :class:`~carbonsr_cli.evaluate.ConservationReport`."""
    from rich.table import Table

    t = Table(title=f"Conservation: {Path(report.pred_path).name} vs {Path(report.totals_path).name} "
              f"(factor {report.factor}, rtol {report.rtol:g}, atol {report.atol:g})")
    for col in ("band", "parent cells", "max abs err", "max rel err", "failed blocks", "negatives", "NaNs",
                "nodata mismatch", "status"):
        t.add_column(col, justify="left" if col == "band" else "right")
    for b in report.bands:
        t.add_row(
            b.name, _fmt(b.parent_cells), _fmt(b.max_abs_err), _fmt(b.max_rel_err), _fmt(b.failed_blocks),
            _fmt(b.negatives), _fmt(b.nans), _fmt(b.nodata_mismatch),
            "[green]ok[/green]" if b.ok else "[bold red]FAIL[/bold red]",
        )
    return t


def reference_table(res: dict[str, Any]) -> Any:
    """Rich table of :func:`~carbonsr_cli.evaluate.compare_to_reference` results."""
    from rich.table import Table

    from carbonsr_cli.evaluate import METRIC_LABELS

    region = " in region" if res.get("region") else ""
    t = Table(title=f"{Path(res['prediction']).name} vs {Path(res['reference']).name}{region} "
              f"({res['method']}; units {res['units']})")
    t.add_column("metric")
    cols = list(res["bands"].keys())
    if len(cols) > 1:
        cols.append("all")
    for c in cols:
        t.add_column(c, justify="right")
    for m in [*res["metrics"], "cells"]:
        vals = [res["bands"][c][m] if c != "all" else res["all"][m] for c in cols]
        t.add_row(METRIC_LABELS.get(m, m), *[_fmt(v, m) for v in vals])
    return t


def selfval_table(result: Any) -> Any:
    """Rich table of a :class:`~carbonsr_cli.evaluate.SelfValidationResult`."""
    from rich.table import Table

    from carbonsr_cli.evaluate import METRIC_LABELS, METRICS

    where = result.region_label or (f"region {tuple(result.region)}" if result.region else "whole raster")
    cells = result.rows[0]["cells"] if result.rows else 0
    t = Table(
        title=f"Scale-shift self-validation at parent resolution: {where}",
        caption=f"{cells:,} parent cell-years scored per row; the main raster is coarsened to s x s parent cells, "
        "downscaled back and compared with the real parent totals",
    )
    t.add_column("scale", justify="right")
    t.add_column("method", no_wrap=True)
    shown = [m for m in METRICS if m in result.rows[0]] if result.rows else []
    for m in shown:
        t.add_column(METRIC_LABELS[m], justify="right")
    t.add_column(f"{METRIC_LABELS[result.metric]} / best baseline", justify="right")
    for s in result.scales:
        ratio = result.ratio_to_best_baseline(s)
        for r in [r for r in result.rows if r["scale"] == s]:
            cell = ""
            if r["method"] == "model":
                style = "green" if ratio < 1 else "red"
                cell = f"[{style}]{_fmt(ratio, 'ratio')}[/{style}]"
            t.add_row(f"{s}x{s}", r["method"], *[_fmt(r[m], m) for m in shown], cell)
    return t


def _write_json(payload: dict[str, Any], dest: str, overwrite: bool) -> None:
    text = json.dumps(_json_safe(payload), indent=2) + "\n"
    if dest == "-":
        typer.echo(text, nl=False)
        return
    from carbonsr_cli.atomic import atomic_write_text, check_output_path

    p = check_output_path(dest, overwrite)
    atomic_write_text(p, text)


def _refuse_outputs_naming_inputs(outputs: list[Any], inputs: dict[str, Any]) -> None:
    """``OutputError`` if ``--json``/``--plot`` name an input, or each other; nothing is written yet."""
    from carbonsr_cli.atomic import check_not_an_input, same_file
    from carbonsr_cli.errors import OutputError

    given = [o for o in outputs if o is not None and str(o) != "-"]
    if len(given) == 2 and same_file(given[0], given[1]):
        raise OutputError("--json and --plot name the same file", given[0])
    if inputs.get("aux"):
        from carbonsr_cli.aux import expand_aux_paths

        inputs = {**inputs, "aux": expand_aux_paths(inputs["aux"])}
    for o in given:
        check_not_an_input(o, inputs)


def register(app: typer.Typer) -> None:
    """Add ``evaluate`` to the app."""

    @app.command("evaluate", help=HELP, cls=AuxGlobCommand)
    def evaluate_cmd(
        prediction: Annotated[
            Optional[Path], typer.Argument(help="Downscaled raster (e.g. 100 m), totals per cell.", show_default=False)
        ] = None,
        totals: Annotated[
            Optional[Path], typer.Option("--totals", help="Parent raster whose blocks the prediction must sum to.")
        ] = None,
        reference: Annotated[
            Optional[Path],
            typer.Option("--reference", help="Reference raster at the prediction's resolution or coarser."),
        ] = None,
        metric: Annotated[
            Optional[list[str]],
            typer.Option("--metric", help="Metric to report (repeatable): nonzero-mae, balanced-mae, top1-mae, "
                         "top5-mae, rmse, r2, pearson, bias. Default: all."),
        ] = None,
        json_out: Annotated[
            Optional[str], json_option("Write results as JSON to this file, or '-' for stdout.")
        ] = None,
        plot: Annotated[
            Optional[Path], typer.Option("--plot", help="Write a comparison PNG (needs --reference).")
        ] = None,
        region: Annotated[
            Optional[str],
            typer.Option("--region", "--val-region",
                         help="Evaluate only cells whose centre is inside minx,miny,maxx,maxy (CRS units of the "
                         "reference / main raster), or only the held-out region of a training run (its run "
                         "directory, split.json or a checkpoint); for self-validation also a polygon file, or "
                         "'split' for the validation region stored in the checkpoint."),
        ] = None,
        rtol: Annotated[float, typer.Option("--rtol", help="Relative tolerance of block sums.")] = 1e-6,
        atol: Annotated[
            float, typer.Option("--atol", help="Absolute tolerance of block sums (units of the totals).")
        ] = 0.0,
        model: Annotated[
            Optional[Path], typer.Option("--model", help="Checkpoint for self-validation (best_model.pth).")
        ] = None,
        main: Annotated[
            Optional[Path], typer.Option("--main", help="Main (parent) raster for self-validation.")
        ] = None,
        aux: Annotated[
            Optional[list[str]],
            aux_option("Auxiliary layers for self-validation: files, directories or globs "
                         "(repeatable)."),
        ] = None,
        categorical: Annotated[
            Optional[list[str]],
            categorical_option("Self-validation: read this aux raster (file stem or name) as land-cover classes; "
                         "repeatable (default: as the model was trained)."),
        ] = None,
        scales: Annotated[
            Optional[list[str]],
            typer.Option("--scales", help="Coarsening scales in parent cells, e.g. 2,4,12 (repeatable)."),
        ] = None,
        device: Annotated[str, device_option("auto, cpu, cuda, cuda:1, ...")] = "auto",
        overwrite: Annotated[bool, overwrite_option("Replace existing --json/--plot files.")] = False,
    ) -> None:
        from carbonsr_cli.console import err, out

        metrics = _check_metrics(metric)
        selfval = model is not None or main is not None
        # self-validation also accepts a polygon file or "split" (the checkpoint's validation region)
        run_split = None
        if not selfval and region is not None and (Path(region).exists() or region.endswith((".json", ".pth"))):
            run_split, region = region, None  # a run's held-out region (run dir, split.json or checkpoint)
        reg = region if selfval else _parse_region(region)
        scale_list = _parse_scales(scales)
        if selfval:
            if prediction is not None or totals is not None or reference is not None:
                raise UsageError("self-validation (--model/--main) cannot be combined with PREDICTION, "
                                 "--totals or --reference")
            if model is None or main is None:
                raise UsageError("self-validation needs both --model CKPT and --main MAIN.tif")
        else:
            if prediction is None:
                raise UsageError("give PREDICTION with --totals and/or --reference, or --model and --main")
            if totals is None and reference is None:
                raise UsageError("give --totals MAIN.tif (conservation) and/or --reference REF.tif (accuracy)")
            if plot is not None and reference is None:
                raise UsageError("--plot needs --reference")
            if aux or scales or categorical:
                raise UsageError("--aux, --categorical and --scales are for self-validation (with --model and --main)")
        if plot is not None:
            from carbonsr_cli.atomic import check_output_path

            check_output_path(plot, overwrite)
        if json_out not in (None, "-"):
            from carbonsr_cli.atomic import check_output_path

            check_output_path(json_out, overwrite)
        _refuse_outputs_naming_inputs(
            [plot, json_out],
            {"prediction": prediction, "totals raster": totals, "reference": reference, "model checkpoint": model,
             "main raster": main, "aux": aux},
        )
        console = err if json_out == "-" else out
        payload: dict[str, Any] = {}

        if selfval:
            from carbonsr_cli.evaluate import self_validate

            kwargs: dict[str, Any] = {"metrics": metrics, "region": reg, "device": device}
            if scale_list:
                kwargs["scales"] = tuple(scale_list)
            if categorical:
                kwargs["categorical"] = list(categorical)
            result = self_validate(model, main, aux or [], **kwargs)
            console.print(selfval_table(result))
            payload = {"self_validation": result.to_dict()}
            if json_out:
                _write_json(payload, json_out, overwrite)
            return

        from carbonsr_cli.evaluate import check_conservation, compare_to_reference

        report = None
        if totals is not None:
            report = check_conservation(prediction, totals, rtol=rtol, atol=atol)
            console.print(conservation_table(report))
            payload["conservation"] = report.to_dict()
        if reference is not None:
            cell_mask = None
            if run_split is not None:
                import rasterio

                from carbonsr_cli.evaluate import split_cell_mask

                with rasterio.open(reference) as ref_ds:
                    cell_mask = split_cell_mask(run_split, (ref_ds.height, ref_ds.width))
            res = compare_to_reference(prediction, reference, metrics=metrics, region=reg, plot=plot,
                                       overwrite=overwrite, cell_mask=cell_mask)
            if run_split is not None:
                res["region"] = f"held-out region of {run_split}"
            console.print(reference_table(res))
            if plot is not None:
                console.print(f"plot written to {plot}")
            payload["reference"] = res
        if json_out:
            _write_json(payload, json_out, overwrite)
        if report is not None:
            report.raise_if_failed()
