"""``carbonsr downscale``: 1 km totals -> 100 m children whose blocks sum to the totals.

:func:`downscale` = plan -> engine (or distributed) -> check: :mod:`.plan` validates the
inputs (main raster, aux layers, checkpoint) and decides everything, the row-band engine of
:mod:`.engine` reads, predicts, blends, water-fills and writes (:mod:`.distributed` splits the
rows over torchrun ranks), and :mod:`.check` re-reads the *written* file to check conservation.

Rules chosen here (documented for users in ``carbonsr downscale --help``):

- **Methods.** ``model`` (needs a checkpoint), ``uniform`` (each child gets ``S / factor**2``)
  and ``dasymetric[:LAYER]`` (shares proportional to one aux layer, default the first layer
  found; uniform where the layer sums to 0 in a block). All go through the same pipeline.
- **Aux layers vs the checkpoint.** The set of aux layer names must equal the checkpoint's
  ``aux_names``; the order of ``--aux`` does not matter (channels are reordered by name). A
  missing or extra layer is a ``CheckpointError`` listing expected and given names.
- **Temporal window.** For output year ``y`` (index ``k`` among the ``N`` bands of the main
  raster, in file order) the model sees ``T`` consecutive years centred on ``k``; near the
  first/last year the window is shifted to stay inside the available years; with ``N < T``
  the missing positions repeat the nearest available year (indices clamped to ``[0, N-1]``).
- **Nodata.** The output nodata is the parent's nodata when it is set and cannot be a valid
  child value (NaN or negative); otherwise -9999. Child cells are nodata exactly where the
  parent is nodata (or outside an AOI polygon).
- **Totals.** Negative or NaN totals that are not nodata are errors (the first offending cell
  is named); a main raster that is entirely nodata is an error.
- **Units.** Values are totals per cell (t CO2 / cell / yr) unless ``units`` names a density
  unit (e.g. ``kg m-2 s-1``); densities are converted to totals with the cell areas, downscaled,
  and written back as the same density unit.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from carbonsr_cli import inventory
from carbonsr_cli.atomic import check_output_path, make_temp_path, remove_quietly
from carbonsr_cli.background import DeferredCloses
from carbonsr_cli.checkpoints import prefetch_sha256
from carbonsr_cli.downscale.aux_prep import AuxPreparation, prepare_early
from carbonsr_cli.downscale.check import check_written_conservation
from carbonsr_cli.downscale.distributed import run_distributed
from carbonsr_cli.downscale.engine import run_pipeline
from carbonsr_cli.downscale.options import DownscaleOptions, MainSource, parse_creation_options
from carbonsr_cli.downscale.plan import Plan
from carbonsr_cli.downscale.planning import PlannedRun, build_plan
from carbonsr_cli.downscale.summary import DownscaleSummary
from carbonsr_cli.errors import CarbonSRError, UsageError
from carbonsr_cli.inventory_totals import write_totals
from carbonsr_cli.methods import needs_torch, parse_method
from carbonsr_cli.netcdf_out import netcdf_output as _netcdf_output
from carbonsr_cli.preload import preload_torch
from carbonsr_cli.writer import BLOCK

__all__ = ["downscale"]


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


@_netcdf_output  # ``-o out.nc``: the GeoTIFF below, checked, then converted (carbonsr_cli.netcdf_out)
def downscale(
    main_path: str | os.PathLike[str],
    aux_paths: Sequence[str | os.PathLike[str]] | None,
    dst: str | os.PathLike[str],
    *,
    method: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    dtype: str = "float32",
    cog: bool = False,
    overwrite: bool = False,
    years: Sequence[str | int] | None = None,
    bands: Sequence[int] | None = None,
    aoi: str | os.PathLike[str] | None = None,
    factor: int | None = None,
    units: str | None = None,
    compress: str = "deflate",
    uncertainty: str | os.PathLike[str] | None = None,
    progress: bool = True,
    check: bool = True,
    fill_missing: bool = False,
    categorical: Sequence[str] | None = None,
    overlap: int = 2,
    variable: str | None = None,
    months: bool = False,
    annual: bool = False,
    co2: bool = False,
    creation_options: Sequence[str] | dict[str, str] | None = None,
    overviews: bool = False,
) -> DownscaleSummary:
    """Downscale a parent raster of totals to a child raster that conserves every total.

    Args:
        main_path: Main raster: totals per cell (t CO2 / cell / yr), one band per year, any
            CRS, north-up; or a netCDF variable, several files on one grid (a glob: months or
            years), south-up grids, densities or per-month values (see ``carbonsr_cli.inventory``;
            such inputs are converted to totals in a hidden temp GeoTIFF next to ``dst``).
        aux_paths: Aux inputs (files, globs, directories; see ``carbonsr_cli.aux.discover_aux``). Needed for
            ``model`` and ``dasymetric``.
        dst: Output GeoTIFF (child grid, one band per output year); ``.nc``: CF netCDF with a
            time dimension (see ``carbonsr_cli.netcdf_out``; no ``cog``/``creation_options``/
            ``overviews``/``uncertainty``).
        method: ``model``, ``uniform`` or ``dasymetric[:LAYER]``; None: ``model`` if a checkpoint
            is given.
        checkpoint: carbonsr checkpoint (``best_model.pth``), loaded with ``weights_only=True``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; several GPUs in one process:
            ``cuda:0,cuda:1`` or ``cuda:all`` (copies of the model take turns; the first GPU blends).
        batch_size: Tiles per model batch (None: 128 on CUDA, 8 on CPU).
        dtype: ``float32`` or ``float64`` output.
        cog: Write a Cloud Optimized GeoTIFF.
        overwrite: Replace an existing ``dst`` (and ``uncertainty``).
        years: Output years (band names of the main raster); None: every band.
        bands: Output bands (1-based) instead of ``years``.
        aoi: Vector file (GeoPackage/GeoJSON/Shapefile, any CRS): only the window of parent
            cells touching its polygons is written; cells of that window not touching them are
            nodata.
        factor: Child cells per parent cell along an axis for the baselines (default 10); the
            model's factor comes from its checkpoint (a different value is an error).
        units: ``totals``, a unit of the main raster (e.g. ``kg m-2 s-1``, ``t C/cell/month``),
            or None: the file's ``units`` attribute, else totals (t CO2 / cell / yr).
        compress: Output compression (``deflate``, ``lzw``, ``zstd``, ``lerc``, ``none``).
        uncertainty: Optional second output: per-pixel standard deviation of the children over
            the 8 dihedral test-time transforms (flips/rot90) of every tile, each water-filled
            (``model`` only; 8x the inference cost).
        progress: Show a progress bar on stderr (only on a terminal).
        check: Re-read the written file and check conservation (recommended).
        fill_missing: Allow aux layers that do not cover the whole extent or are all nodata
            (filled by the rule of ``carbonsr_cli.aux``, with a warning); otherwise an error.
        categorical: Aux raster file stems or names read as categorical (``--categorical``);
            None: the checkpoint's setting (``train --categorical``), else detected.
        overlap: Context margin of model tiles in parent cells on each side (tiles step by
            ``tile - 2 * overlap``). 2 (default) blends tiles smoothly; 1 reads and predicts about
            a third less (on the demo region: 1.7x faster on CPU, Nonzero-MAE vs the truth 1.6 %
            worse); 0 shows tile seams.

        variable: netCDF variable (default: the only data variable).
        months: Read ``YYMM`` in file names as months (ODIAC ``..._1901.tif``).
        annual: Sum monthly bands to annual totals before downscaling (default: month by month).
        co2: Convert carbon (``t C``) to CO2 (x 44/12).
        creation_options: GDAL creation options of the outputs (``KEY=VALUE`` strings or a dict).
        overviews: Build overviews (average) in a plain GeoTIFF output.

    Returns:
        A :class:`DownscaleSummary` (conservation check included).

    Raises:
        UsageError: bad options (method, years, device, dtype).
        InputDataError: unusable main raster (negative/NaN totals, all nodata, ...).
        CheckpointError: not a carbonsr checkpoint, pickled code, aux layers do not match.
        OutputError: output exists without ``overwrite``, unwritable, disk full.
    """
    if needs_torch(method):  # uniform and dasymetric fill in numpy and never import torch
        preload_torch()  # in a background thread, while the inputs are opened and checked
    if checkpoint is not None:
        prefetch_sha256(checkpoint)  # in a background thread too (the output's model tag)
    co = parse_creation_options(creation_options)
    dst_path = check_output_path(dst, overwrite)
    if uncertainty is not None:
        check_output_path(uncertainty, overwrite)
    opts = DownscaleOptions(
        method=method, checkpoint=checkpoint, device=device, batch_size=batch_size, dtype=dtype, cog=cog,
        overwrite=overwrite, years=years, bands=bands, aoi=aoi, factor=factor, compress=compress,
        uncertainty=uncertainty, progress=progress, check=check, fill_missing=fill_missing,
        categorical=categorical, overlap=overlap, creation_options=co, overviews=overviews,
    )
    inp = inventory.resolve_main(main_path, variable=variable, units=units, months=months, annual=annual, co2=co2)
    source_name = Path(str(main_path)).name
    if not inp.needs_prepare:
        label = inp.totals_unit if inp.unit is None else None
        src = MainSource(Path(inp.paths[0]), inp.unit or "totals", label, inp.notes, source_name)
        return _downscale(src, aux_paths, dst_path, opts)
    spec = parse_method(method, checkpoint)  # usage errors before the conversion
    if uncertainty is not None and spec.kind not in ("model", "auto"):
        raise UsageError("--uncertainty needs --method model (the baselines are deterministic)")
    tmp = make_temp_path(dst_path.absolute(), tag="totals")
    try:
        write_totals(inp, tmp.with_suffix(".tif") if tmp.suffix.lower() != ".tif" else tmp)
        tif = tmp if tmp.suffix.lower() == ".tif" else tmp.with_suffix(".tif")
        notes = list(inp.notes) + [f"converted to totals per cell ({inp.totals_unit}) before downscaling"]
        try:
            return _downscale(MainSource(tif, "totals", inp.totals_unit, notes, source_name), aux_paths, dst_path, opts)
        except CarbonSRError as exc:
            if exc.path is not None and Path(exc.path).name == tif.name:  # name the user's file
                exc.path = str(main_path)
            raise
    finally:
        remove_quietly(tmp)
        if tmp.suffix.lower() != ".tif":
            remove_quietly(tmp.with_suffix(".tif"))


def _downscale(src: MainSource, aux_paths: Sequence[str | os.PathLike[str]] | None, dst_path: Path,
               opts: DownscaleOptions) -> DownscaleSummary:
    """:func:`downscale` on a resolved main raster: plan -> engine (or distributed) -> check.

    While the model loads in the background (``PlannedRun.model_job``), a run that reads in
    processes prepares its aux stack (pre-warps included) in another thread and spawns its
    reader processes.
    """
    run = build_plan(src, aux_paths, dst_path, opts)
    prep = None
    try:
        if run.model_job is not None and run.plan.aux_stack is not None and prepare_early(run.plan):
            prep = AuxPreparation(run.plan, dst_path.parent)
        run.wait_for_model()
        return _run(run, dst_path, opts, prep)
    finally:
        if prep is not None:
            prep.discard()
        if run.plan.aux_stack is not None:
            run.plan.aux_stack.close()


def _run(run: PlannedRun, dst_path: Path, opts: DownscaleOptions, prep: AuxPreparation | None = None) -> DownscaleSummary:
    """Engine (or distributed) -> check of the written file, for a planned run."""
    plan, summary = run.plan, run.summary
    t0 = time.perf_counter()
    # GDAL's block cache defaults to 5 % of RAM; bound it to what one strip of output blocks
    # needs, so peak memory does not grow with the machine (or the raster).
    with rasterio.Env(GDAL_CACHEMAX=_gdal_cache_bytes(plan, opts.dtype, run.uncertainty is not None)):
        engine_kw = dict(
            loaded=run.loaded, device=run.device, batch_size=run.batch_size, dtype=opts.dtype, cog=opts.cog,
            overwrite=opts.overwrite, compress=opts.compress, uncertainty=run.uncertainty,
            progress=opts.progress, normalizer=run.normalizer,
        )
        # the reader processes shut down while the written file is checked
        with DeferredCloses() as close_later:
            ctx = run_distributed(plan, dst_path, summary, **engine_kw)  # (no prep: never under torchrun)
            if ctx is None:
                run_pipeline(plan, dst_path, summary, prep=prep, extra_devices=run.extra_devices,
                             close_later=close_later, **engine_kw)
            summary.seconds = time.perf_counter() - t0
            summary.km2_per_s = summary.area_km2 * len(plan.out_names) / max(summary.seconds, 1e-9)
            if opts.check:
                def _check() -> tuple[Any, float]:
                    t1 = time.perf_counter()
                    return check_written_conservation(dst_path, plan), time.perf_counter() - t1

                # torchrun: rank 0 checks the assembled file and every rank gets its result
                summary.conservation, summary.check_seconds = _check() if ctx is None else ctx.from_main(_check)
            else:
                summary.notes.append("conservation of the written file was not checked (check=False)")
    return summary


def _gdal_cache_bytes(plan: Plan, dtype: str, uncertainty: bool) -> int:
    """GDAL block cache for a run: 1.5 strips of 512-row output blocks (+64 MiB), 128 MiB..1 GiB."""
    writers = 2 if uncertainty else 1
    strip = writers * len(plan.out_bands) * BLOCK * plan.child.width * np.dtype(dtype).itemsize
    return int(min(max(1.5 * strip + (64 << 20), 128 << 20), 1 << 30))
