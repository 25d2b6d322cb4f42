"""Planning of a downscaling run: :func:`build_plan` validates the options and inputs (main
raster, bands, AOI, method, checkpoint, aux layers) and decides everything the engine needs: a
:class:`~carbonsr_cli.downscale.plan.Plan` (the coverage-checked aux stack is built once here and
handed to the engine), the loaded model and device, and the summary the run fills in.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from carbonsr_cli import aoi as aoi_mod, distributed, units
from carbonsr_cli.atomic import check_not_an_input, check_output_path
from carbonsr_cli.aux import AuxStack, categorical_kinds, discover_aux, expand_aux_paths
from carbonsr_cli.checkpoint_peek import CheckpointPeek, peek_checkpoint
from carbonsr_cli.checkpoints import (
    FORMAT,
    FORMAT_VERSION,
    REQUIRED_KEYS,
    check_compatible,
    load_checkpoint,
    load_model_for_inference,
)
from carbonsr_cli import cpus  # cpus.available_cpus looked up at call time (tests patch it)
from carbonsr_cli.devices import resolve_device, resolve_extra_devices, split_device_list
from carbonsr_cli.downscale.options import DownscaleOptions, MainSource
from carbonsr_cli.downscale.plan import DEFAULT_NODATA, Plan, TOTALS_UNIT, year_window
from carbonsr_cli.downscale.model_job import ModelInfo, ModelJob, load_in_background
from carbonsr_cli.downscale.readers import remove_killed_leftovers
from carbonsr_cli.downscale.summary import DownscaleSummary
from carbonsr_cli.errors import (
    CarbonSRError,
    CheckpointError,
    GeographicCRSWarning,
    InputDataError,
    NoNodataWarning,
    UsageError,
)
from carbonsr_cli.grids import ParentGrid, validate_factor, window_ints
from carbonsr_cli.methods import parse_method
from carbonsr_cli.methods.auto import choose as choose_auto
from carbonsr_cli.methods.model import prior_only_model
from carbonsr_cli.nodata import nodata_mask
from carbonsr_cli.rasters import open_raster, read_window
from carbonsr_cli.stats import AuxNormalizer
from carbonsr_cli.units import parse_unit

if TYPE_CHECKING:  # pragma: no cover
    from carbonsr_cli.grids import ChildGrid

__all__ = ["PlannedRun", "build_plan"]


def _scan_main(ds: Any, plan: Plan) -> int:
    """Check the totals read by the run; return the number of valid output cells.

    Raises:
        InputDataError: a negative or NaN (not nodata) total, naming the first such cell, or a
            raster that is entirely nodata (inside the AOI).
    """
    from rasterio.windows import Window

    bands = sorted(set(plan.out_bands) | set(plan.in_bands))
    out_pos = [bands.index(b) for b in plan.out_bands]
    names = plan.full_grid.band_names
    h, w = plan.grid.height, plan.grid.width
    step = max(1, (1 << 22) // max(1, w * len(bands)))
    ro, co = plan.offset
    nodata = plan.full_grid.nodata
    valid = 0
    for r0 in range(0, h, step):
        r1 = min(h, r0 + step)
        raw = read_window(ds, Window(co, ro + r0, w, r1 - r0), bands, out_dtype="float64")
        nd = nodata_mask(raw, nodata)
        inside = np.ones((r1 - r0, w), dtype=bool) if plan.aoi_mask is None else plan.aoi_mask[r0:r1]
        data = ~nd & inside[None]
        for kind, bad in (("NaN", np.isnan(raw) & data), ("negative", (raw < 0) & data)):
            if bad.any():
                b, r, c = (int(v) for v in np.argwhere(bad)[0])
                hint = (
                    "declare the nodata value (gdal_edit.py -a_nodata nan) or fill the gaps"
                    if kind == "NaN"
                    else "totals must be >= 0 (net sinks are not supported)"
                )
                raise InputDataError(
                    f"{kind} total {raw[b, r, c]:g} in band {bands[b]} ({names[bands[b] - 1]}) at row "
                    f"{ro + r0 + r}, col {co + c}; {hint}",
                    plan.main_path,
                )
        if np.isinf(raw[data]).any():
            b, r, c = (int(v) for v in np.argwhere(np.isinf(raw) & data)[0])
            raise InputDataError(
                f"infinite total in band {bands[b]} at row {ro + r0 + r}, col {co + c}", plan.main_path
            )
        valid += int(data[out_pos].sum())
    if valid == 0:
        where = " inside the AOI" if plan.aoi_mask is not None or plan.grid is not plan.full_grid else ""
        raise InputDataError(f"every cell of the selected band(s) is nodata{where}; nothing to downscale", plan.main_path)
    return valid



def _output_nodata(parent_nodata: float | None) -> float:
    """The output nodata (see module docstring)."""
    if parent_nodata is None:
        return DEFAULT_NODATA
    v = float(parent_nodata)
    if math.isnan(v) or (v < 0 and np.isfinite(np.float32(v))):
        return v
    return DEFAULT_NODATA



def _select_bands(grid: ParentGrid, years: Sequence[str | int] | None, bands: Sequence[int] | None) -> list[int]:
    """1-based band indices selected by ``--year`` / ``--band`` (default: all bands)."""
    names = list(grid.band_names)
    if years and bands:
        raise UsageError("give --year or --band, not both")
    if bands:
        out = []
        for b in bands:
            if not 1 <= int(b) <= len(names):
                raise UsageError(f"--band {b} out of range: the main raster has {len(names)} band(s)", grid.path)
            out.append(int(b))
        return out
    if years:
        out = []
        for y in years:
            y = str(y).strip()
            if y not in names:
                raise UsageError(f"year {y} not in the main raster; its bands are {', '.join(names)}", grid.path)
            out.append(names.index(y) + 1)
        return out
    return list(range(1, len(names) + 1))



def _resolve_aux_order(given: Sequence[str], expected: Sequence[str], ckpt_path: Any) -> list[int]:
    """Channel index in ``given`` for every name in ``expected`` (order of --aux is free).

    Raises:
        CheckpointError: the sets of names differ (lists expected vs given).
    """
    if sorted(given) == sorted(expected) and len(set(given)) == len(given):
        return [list(given).index(n) for n in expected]

    check_compatible({"aux_names": list(expected)}, ckpt_path, aux_names=list(given))
    raise CheckpointError(  # pragma: no cover - check_compatible raised above
        f"aux layers differ: checkpoint expects {list(expected)}, given {list(given)}", ckpt_path
    )



def _aoi(aoi: str | os.PathLike[str], grid: ParentGrid) -> tuple[Any, np.ndarray | None]:
    """AOI window of the parent grid (and its polygon mask, if the AOI module gives one)."""

    res = aoi_mod.aoi_parent_window(aoi, grid)
    mask = None
    if isinstance(res, tuple):
        window, mask = res[0], (res[1] if len(res) > 1 else None)
    else:
        window = res
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
    return window, mask



def _parse_units(units: str | None) -> tuple[str | None, str]:
    """``(density unit or None, unit label of the written values)`` for ``--units``."""
    text = "totals" if units is None else str(units).strip()
    if text.lower() in ("totals", "total", ""):
        return None, TOTALS_UNIT

    u = parse_unit(text)
    if not u.is_density:
        return None, u.text
    return u.text, u.text



def _area_km2(grid: ParentGrid) -> float:
    """Area of the grid's extent in km2 (geodesic for geographic CRSs)."""
    try:
        from rasterio.windows import Window

        areas = units.cell_areas_m2(grid, Window(0, 0, 1, grid.height))
        return float(np.asarray(areas, dtype=np.float64).sum()) * grid.width / 1e6
    except (ImportError, AttributeError):
        pass
    if grid.is_geographic:
        from pyproj import Geod

        geod = Geod(ellps="WGS84")
        t = grid.transform
        total = 0.0
        for r in range(grid.height):
            lon0, lat0 = t.b * r + t.c, t.e * r + t.f  # t * (0, r), written out (affine's ``*`` is deprecated)
            lon1, lat1 = t.a + t.b * (r + 1) + t.c, t.d + t.e * (r + 1) + t.f
            a, _ = geod.polygon_area_perimeter([lon0, lon1, lon1, lon0], [lat0, lat0, lat1, lat1])
            total += abs(a)
        return total * grid.width / 1e6
    try:
        unit = float(grid.crs.linear_units_factor[1])
    except Exception:  # noqa: BLE001 - unknown units: assume metres
        unit = 1.0
    rx, ry = grid.res
    return rx * ry * unit * unit * grid.width * grid.height / 1e6



def _tile_size(factor: int, multiple: int, target: int = 120) -> int:
    """Tile edge in child cells: a multiple of ``lcm(factor, multiple)`` close to ``target``."""
    step = factor * multiple // math.gcd(factor, multiple)
    return max(step, int(round(target / step)) * step)



def _normalizer(loaded: Any) -> Any:
    """``AuxNormalizer`` of the checkpoint's aux channels, in model order."""
    try:
        return AuxNormalizer.from_stats(loaded.stats, names=loaded.aux_names)
    except (CarbonSRError, KeyError, TypeError, ValueError) as exc:
        msg = exc.message if isinstance(exc, CarbonSRError) else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"aux statistics in the checkpoint are not usable: {msg}", loaded.path) from None



def checkpoint_categorical(checkpoint: str | os.PathLike[str] | dict) -> list[str]:
    """The aux rasters a checkpoint (a path, or the loaded dict) was trained to read as
    categorical (``train --categorical``)."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    cfg = ckpt.get("train_config") or {}
    return [str(n) for n in (cfg.get("categorical") or [])]



def _checked_stack(sources: Sequence[Any], child: ChildGrid, years: Sequence[str], *, fill_missing: bool = False) -> Any:
    """The AuxStack of the aux sources on ``child`` (its construction checks their coverage).

    The check decompresses every aux raster once (in parallel); GDAL's block cache (default 5%
    of the RAM) is capped at 128 MiB meanwhile, unless ``GDAL_CACHEMAX`` is set.
    """
    import rasterio


    env = {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": 128 << 20}
    with rasterio.Env(**env):
        return AuxStack(sources, child, list(years), fill_missing=fill_missing)



def _peek(spec: Any, checkpoint: Any) -> tuple[CheckpointPeek, ModelInfo] | None:
    """The checkpoint's plain data and model info, read without torch, when the model may load
    in the background (``--method model``, one process, enough CPUs); None: load it on this
    thread (which also reports any problem with the file)."""
    if spec.kind != "model" or checkpoint is None or distributed.in_torchrun() or not load_in_background():
        return None
    from models.config import ModelConfig

    peek = peek_checkpoint(checkpoint, FORMAT, REQUIRED_KEYS)
    if peek is None or not isinstance(peek.meta.get("format_version"), int) or peek.meta["format_version"] > FORMAT_VERSION:
        return None
    try:
        return peek, ModelInfo.of(ModelConfig.from_dict(peek.meta["model_config"]), peek.meta, Path(checkpoint))
    except (TypeError, ValueError, KeyError, AttributeError):
        return None



def _size_torch_threads() -> int:
    """Torch intra-op threads for a CPU model run: the CPUs this process may use (affinity,
    cgroup quota, ``OMP_NUM_THREADS``), less one for the reader and writer threads from 3 CPUs
    on; torch's own default counts the host's cores and oversubscribes a shared machine."""
    import torch

    n = cpus.available_cpus()
    n = n - 1 if n > 2 else n
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n



def _grid_warnings(grid: ParentGrid, name: str) -> None:
    """The warnings of ``ParentGrid.from_raster`` for a converted input, naming the user's file."""
    import warnings

    if grid.nodata is None:
        warnings.warn(f"{name}: no nodata value set; every cell is treated as valid", NoNodataWarning, stacklevel=3)
    if grid.is_geographic:
        warnings.warn(
            f"{name}: geographic CRS ({grid.crs}); cell areas vary with latitude and child resolution is nominal",
            GeographicCRSWarning,
            stacklevel=3,
        )



class _Host(str):
    """The device of a baseline run with a numpy fill, which never imports torch: ``"cpu"`` with
    ``.type``/``.index`` like ``torch.device("cpu")``."""

    type = "cpu"
    index = None


def _host_device(spec: Any) -> Any:
    """The host device of a baseline run (memory-bound: it runs on the host, --device unused).

    Methods with a numpy fill (uniform, dasymetric) need no torch; the other baselines fill
    with torch, imported here, after the inputs are checked (a background import may have done
    it by now).
    """
    if spec.method.numpy_fill:
        return _Host("cpu")
    import torch

    return torch.device("cpu")



@dataclass
class PlannedRun:
    """A :class:`Plan` and what the engine needs besides it (the loaded model, the device, the
    normaliser of its aux channels, the batch size) plus the summary the run fills in."""

    plan: Plan
    summary: DownscaleSummary
    loaded: Any
    device: Any
    batch_size: int | None
    normalizer: Any
    uncertainty: Path | None
    model_job: ModelJob | None = None
    #: ``--device`` names after the first (several GPUs in one process), resolved by
    #: :meth:`wait_for_model` into :attr:`extra_devices`.
    extra_device_names: list[str] = field(default_factory=list)
    extra_devices: list[Any] = field(default_factory=list)

    def wait_for_model(self) -> None:
        """Join the model loading in the background (if any): set ``loaded``, ``device``, the
        batch size (default: 128 on CUDA, 8 elsewhere) and the summary's device fields. Every
        run calls it before the engine. Raises what the load raised."""
        if self.model_job is not None:
            dev, self.loaded = self.model_job.result()
            self.model_job = None
            if dev.type == "cpu":
                _size_torch_threads()  # on the thread that runs the model
            self.device = dev
            self.summary.device = str(dev)
            self.summary.model_sha256 = self.loaded.sha256
        if self.extra_device_names and self.loaded is not None:
            if self.device.type != "cuda":
                raise UsageError(f"--device: several GPUs need CUDA, but the model runs on {self.device}")
            self.extra_devices = resolve_extra_devices(self.extra_device_names, self.device)
            self.summary.device = ",".join(str(d) for d in [self.device, *self.extra_devices])
        if self.batch_size is None:
            self.batch_size = 128 if self.device.type == "cuda" else 8
        self.summary.batch_size = int(self.batch_size)



def build_plan(src: MainSource, aux_paths: Sequence[str | os.PathLike[str]] | None, dst_path: Path,
               opts: DownscaleOptions) -> PlannedRun:
    """Validate the options and inputs of a run and decide everything the engine needs.

    Raises the usage, input and checkpoint errors of :func:`~carbonsr_cli.downscale.downscale`
    before anything is written.
    """

    spec = parse_method(opts.method, opts.checkpoint)
    checkpoint = opts.checkpoint
    if opts.dtype not in ("float32", "float64"):
        raise UsageError(f"--dtype must be float32 or float64, got {opts.dtype!r}")
    if opts.uncertainty is not None and spec.kind not in ("model", "auto"):
        raise UsageError("--uncertainty needs --method model (the baselines are deterministic)")
    if int(opts.overlap) < 0:
        raise UsageError(f"--overlap must be >= 0 parent cells, got {opts.overlap}")
    if opts.batch_size is not None and int(opts.batch_size) < 1:
        raise UsageError(f"--batch-size must be >= 1, got {opts.batch_size}")
    unit, label = _parse_units(src.units)
    units_label = src.units_label or label
    unc_path = check_output_path(opts.uncertainty, opts.overwrite) if opts.uncertainty is not None else None
    if unc_path is not None and unc_path == dst_path:
        raise UsageError("--uncertainty must differ from the output path", unc_path)
    _refuse_input_as_output([dst_path, unc_path], src.path, aux_paths, checkpoint, opts.aoi)
    remove_killed_leftovers(dst_path.parent)
    main = Path(src.path)
    source_name = src.source_name
    converted = source_name is not None and source_name != main.name
    full = ParentGrid.from_raster(main, warn=not converted)
    if converted:
        _grid_warnings(full, source_name)  # type: ignore[arg-type]

    loaded = None
    info: ModelInfo | None = None  # what planning needs of the model
    job: ModelJob | None = None  # the model, loading in a background thread meanwhile
    normalizer = None
    notes = list(src.notes)
    ckpt: dict | None = None  # the checkpoint, read once per run (peeked at: its plain data)

    def checkpoint_dict() -> dict:
        nonlocal ckpt
        if ckpt is None:
            ckpt = load_checkpoint(checkpoint)  # type: ignore[arg-type]
        return ckpt

    if spec.kind == "auto":
        spec, why = choose_auto(checkpoint_dict())
        notes.append(f"--method auto chose {spec.label}: {why}")
        if opts.uncertainty is not None and spec.kind != "model":
            raise UsageError(f"--uncertainty needs the model, but --method auto chose {spec.label}")
    factor = opts.factor
    dev: Any = None
    primary, extra_names = split_device_list(opts.device)
    if extra_names and distributed.in_torchrun():
        raise UsageError(f"--device {opts.device}: several GPUs run in one process; do not start it under torchrun")
    if spec.method.runs_model:
        peeked = _peek(spec, checkpoint)
        if peeked is not None:  # the model loads meanwhile; PlannedRun.wait_for_model joins it
            peek, info = peeked
            ckpt = peek.meta
            job = ModelJob(Path(checkpoint), peek, primary)  # type: ignore[arg-type]
        else:
            dev = resolve_device(primary)
            dev = distributed.context(use_cuda=dev.type == "cuda").device(dev)  # torchrun: cuda:<local rank>
            if dev.type == "cpu":
                _size_torch_threads()
            loaded = load_model_for_inference(checkpoint, dev, checkpoint=checkpoint_dict())  # type: ignore[arg-type]
            info = ModelInfo.from_loaded(loaded)
        if factor is not None and int(factor) != info.factor:
            raise UsageError(f"--factor {factor} differs from the model's factor {info.factor}; omit --factor")
        f = info.factor
        if info.years_window > info.max_years:
            raise CheckpointError(
                f"years_window {info.years_window} exceeds the model's max_years {info.max_years}", info.path
            )
    else:
        dev = None  # baselines run on the host (--device unused); set once the inputs are checked
        f = validate_factor(10 if factor is None else factor)

    out_bands = _select_bands(full, opts.years, opts.bands)
    n = full.count
    if info is not None:
        t = max(1, info.years_window)
        wins_abs = [year_window(b - 1, n, t) for b in out_bands]
        in_bands = sorted({i + 1 for idx, _ in wins_abs for i in idx})
        windows = [([in_bands.index(i + 1) for i in idx], pos) for idx, pos in wins_abs]
    else:
        in_bands = []
        windows = []

    # AOI: process a sub-window of the parent grid.
    offset = (0, 0)
    grid = full
    mask = None
    if opts.aoi is not None:
        window, mask = _aoi(opts.aoi, full)
        c, r, w, h = window_ints(full.clip_window(window))
        if w <= 0 or h <= 0:
            raise InputDataError("the AOI does not overlap the main raster", opts.aoi)
        offset = (r, c)
        grid = replace(full, transform=full.window_transform(window), width=w, height=h)
        if mask is not None and mask.shape != (h, w):
            raise InputDataError(f"AOI mask shape {mask.shape} does not match its window {h}x{w}", opts.aoi)

    child = grid.child(f)
    # Aux layers.
    aux_list = list(aux_paths or [])
    aux_names: list[str] = []
    aux_kinds: dict[str, str] | None = None
    stack: Any = None
    aux_years = [full.band_names[b - 1] for b in (in_bands if info is not None else out_bands)]
    categorical = opts.categorical
    if spec.method.needs_aux:
        if not aux_list:
            raise UsageError(f"--method {spec.kind} needs aux layers (--aux aux/*.tif)")
        if categorical is None and checkpoint is not None:
            categorical = checkpoint_categorical(checkpoint_dict())
        aux_kinds = categorical_kinds(categorical)
        sources = discover_aux(aux_list, kinds=aux_kinds)
        if info is not None:  # the model reads every layer: vectors kept unread by discovery
            for s in sources:  # (aux/cache.py) are read meanwhile, while coverage is checked
                s.prefetch_frame()
        stack = _checked_stack(sources, child, aux_years, fill_missing=opts.fill_missing)
        given = list(stack.names)
        points = list(stack.point_names)
        if info is not None:
            _resolve_aux_order(given, info.aux_names, info.path)
            aux_names = list(info.aux_names)
            normalizer = _normalizer(info)
            if spec.kind == "fitted":  # never peeked at (_peek): loaded on this thread
                loaded.model = prior_only_model(checkpoint_dict(), normalizer).to(dev)
        else:
            spec = spec.method.resolve(spec, given, points)
            aux_names = spec.method.layers(spec, given, points)

    plan = Plan(
        main_path=main,
        full_grid=full,
        grid=grid,
        offset=offset,
        child=child,
        factor=f,
        method=spec,
        out_bands=out_bands,
        out_names=[full.band_names[b - 1] for b in out_bands],
        in_bands=in_bands,
        windows=windows,
        unit=unit,
        aoi_mask=mask,
        aux_paths=aux_list,
        aux_names=aux_names,
        aux_years=aux_years,
        nodata_out=_output_nodata(full.nodata),
        tile_child=_tile_size(f, info.downsample_factor if info is not None else 1),
        fill_missing=opts.fill_missing,
        aux_kinds=aux_kinds,
        aux_stack=stack,
        overlap_parent=int(opts.overlap),
        source_name=source_name or main.name,
        creation_options=dict(opts.creation_options or {}),
        overviews=bool(opts.overviews),
    )
    with open_raster(main) as ds:
        valid = _scan_main(ds, plan)

    if dev is None and job is None:
        dev = _host_device(spec)
    batch_size = opts.batch_size  # None: the device's default, set by PlannedRun.wait_for_model
    summary = DownscaleSummary(
        output=str(dst_path),
        method=spec.label,
        factor=f,
        years=plan.out_names,
        units=units_label,
        dtype=opts.dtype,
        nodata=plan.nodata_out,
        device=str(dev),  # with a model job: set by PlannedRun.wait_for_model, as the two below
        precision="fp32" if info is not None else "float64",
        batch_size=int(batch_size or 0),  # set by PlannedRun.wait_for_model
        parent_shape=(grid.height, grid.width),
        child_shape=(child.height, child.width),
        parent_cells_valid=valid,
        child_cells=child.height * child.width,
        area_km2=_area_km2(grid),
        aux_layers=aux_names,
        model_sha256=loaded.sha256 if loaded is not None else None,
        uncertainty=str(unc_path) if unc_path is not None else None,
    )
    summary.notes.extend(notes)
    same_nodata = full.nodata is not None and (
        plan.nodata_out == full.nodata or (math.isnan(plan.nodata_out) and math.isnan(float(full.nodata)))
    )
    if full.nodata is not None and not same_nodata:
        summary.notes.append(f"parent nodata {full.nodata:g} could be a valid child value; output nodata is {plan.nodata_out:g}")
    return PlannedRun(plan, summary, loaded, dev, batch_size, normalizer, unc_path, job,
                      extra_device_names=extra_names if spec.method.runs_model else [])



def _refuse_input_as_output(
    dests: Sequence[Path | None], main_path: Any, aux_paths: Any, checkpoint: Any, aoi: Any
) -> None:
    """Raise ``OutputError`` if an output names (or hard-links to) an input; nothing is written yet."""
    inputs = {
        "main raster": main_path,
        "aux layer": expand_aux_paths(aux_paths),
        "model checkpoint": checkpoint,
        "AOI file": aoi,
    }
    for d in dests:
        check_not_an_input(d, inputs)
