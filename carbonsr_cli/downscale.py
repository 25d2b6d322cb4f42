"""``carbonsr downscale``: 1 km totals -> 100 m children whose blocks sum to the totals.

:func:`downscale` validates the inputs (main raster, aux layers, checkpoint), then runs the
row-band engine of :mod:`carbonsr_cli.downscale_pipeline` (read, predict, blend, water-fill,
write) and finally re-reads the *written* file to check conservation.

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

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from carbonsr_cli.errors import CarbonSRError, CheckpointError, InputDataError, UsageError
from carbonsr_cli.methods import REGISTRY, MethodSpec, parse_method
from carbonsr_cli.methods.auto import choose as choose_auto
from carbonsr_cli.netcdf_out import netcdf_output as _netcdf_output

if TYPE_CHECKING:  # pragma: no cover
    from carbonsr_cli.grids import ChildGrid, ParentGrid

__all__ = [
    "ConservationCheck",
    "DownscaleSummary",
    "MethodSpec",
    "check_written_conservation",
    "downscale",
    "parse_method",
    "year_window",
]

#: Methods accepted by ``--method``.
#: Output nodata when the parent's nodata is unset or could be a valid child value.
DEFAULT_NODATA = -9999.0
#: Block-sum tolerance (relative) of the conservation check.
CONSERVATION_RTOL = 1e-6
#: Unit string of totals.
TOTALS_UNIT = "t CO2 / cell / yr"


def year_window(k: int, n: int, t: int) -> tuple[list[int], int]:
    """Years fed to the model for output year ``k``.

    Args:
        k: Index of the output year among the ``n`` bands of the main raster (file order).
        n: Number of available years (bands).
        t: Years in the model's window (``T``).

    Returns:
        ``(indices, pos)``: ``t`` band indices in ``[0, n)`` and the position of ``k`` in them.
        The window is centred on ``k``, shifted inside ``[0, n)`` near the ends; with
        ``n < t`` the indices are clamped, so the nearest year repeats.
    """
    if not 0 <= k < n or t < 1:
        raise ValueError(f"bad window request k={k}, n={n}, t={t}")
    if t <= n:
        start = min(max(k - t // 2, 0), n - t)
        return list(range(start, start + t)), k - start
    idx = [min(max(k - t // 2 + i, 0), n - 1) for i in range(t)]
    return idx, t // 2


@dataclass
class ConservationCheck:
    """Conservation of the written output against the parent totals.

    Attributes:
        max_rel_error: Largest ``|sum(children) - S| / S`` over valid blocks with ``S > 0``.
        max_abs_error: Largest ``|sum(children) - S|`` (t CO2 / parent cell / yr).
        blocks: Valid parent cells checked (over all bands).
        zero_blocks_violated: Blocks with ``S == 0`` holding a nonzero child.
        negatives: Child cells < 0.
        nans: NaN/inf child cells inside valid blocks (not nodata).
        nodata_mismatch: Blocks where child nodata does not match parent nodata.
        ok: Every check passed (relative error <= 1e-6, all counts zero).
    """

    max_rel_error: float = 0.0
    max_abs_error: float = 0.0
    blocks: int = 0
    zero_blocks_violated: int = 0
    negatives: int = 0
    nans: int = 0
    nodata_mismatch: int = 0
    ok: bool = True

    def merge(self, other: ConservationCheck) -> None:
        """Add the counts and take the largest errors of ``other`` (a check of other rows)."""
        self.max_rel_error = max(self.max_rel_error, other.max_rel_error)
        self.max_abs_error = max(self.max_abs_error, other.max_abs_error)
        self.blocks += other.blocks
        self.zero_blocks_violated += other.zero_blocks_violated
        self.negatives += other.negatives
        self.nans += other.nans
        self.nodata_mismatch += other.nodata_mismatch

    def finish(self) -> ConservationCheck:
        """Set :attr:`ok` from the other fields and return self."""
        self.ok = bool(
            self.max_rel_error <= CONSERVATION_RTOL
            and self.zero_blocks_violated == 0
            and self.negatives == 0
            and self.nans == 0
            and self.nodata_mismatch == 0
        )
        return self


@dataclass
class DownscaleSummary:
    """What :func:`downscale` did (printed as a table by the CLI, or as JSON).

    Attributes:
        output: Written file.
        method: Method label (``model``, ``uniform``, ``dasymetric:<layer>``).
        factor: Child cells per parent cell along an axis.
        years: Output band names (one band each).
        units: Unit of the written values.
        dtype: Output dtype.
        nodata: Output nodata value.
        device: Torch device used.
        precision: ``fp32``, ``bf16`` (a bfloat16 copy of the model, CUDA) or ``float64`` (baselines compute in float64).
        batch_size: Tiles per model batch.
        parent_shape: ``(rows, cols)`` of the processed parent window.
        child_shape: ``(rows, cols)`` of the output.
        parent_cells_valid: Non-nodata parent cells (all output bands).
        child_cells: Output cells per band.
        area_km2: Area of the processed extent (geodesic for geographic grids).
        tiles: Tile evaluations (tiles x years; x8 with uncertainty).
        seconds: Wall time of the pipeline (reading to closing the file; without the check).
        check_seconds: Wall time of the conservation check.
        km2_per_s: ``area_km2 * years / seconds``.
        aux_layers: Aux layer names in model order (model/dasymetric) or empty.
        model_sha256: SHA-256 of the checkpoint file, if any.
        uncertainty: Uncertainty output written, if any.
        conservation: Result of the check on the written file.
        notes: Non-fatal remarks (bf16 fallback, nodata choice, ...).
    """

    output: str
    method: str
    factor: int
    years: list[str]
    units: str
    dtype: str
    nodata: float
    device: str
    precision: str
    batch_size: int
    parent_shape: tuple[int, int]
    child_shape: tuple[int, int]
    parent_cells_valid: int
    child_cells: int
    area_km2: float
    tiles: int = 0
    seconds: float = 0.0
    check_seconds: float = 0.0
    km2_per_s: float = 0.0
    aux_layers: list[str] = field(default_factory=list)
    model_sha256: str | None = None
    uncertainty: str | None = None
    conservation: ConservationCheck = field(default_factory=ConservationCheck)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (NaN nodata as the string ``"nan"``)."""
        d = asdict(self)
        if isinstance(self.nodata, float) and math.isnan(self.nodata):
            d["nodata"] = "nan"
        d["parent_shape"] = list(self.parent_shape)
        d["child_shape"] = list(self.child_shape)
        return d


# --------------------------------------------------------------------------------------
# Plan: everything the engine needs, decided and validated up front
# --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Validated inputs of one downscaling run (internal; consumed by the pipeline).

    Attributes:
        main_path: Main raster.
        full_grid: Grid of the whole main raster.
        grid: Processed parent grid (the AOI window of ``full_grid``, else ``full_grid``).
        offset: ``(row_off, col_off)`` of ``grid`` inside the main raster (parent cells).
        child: Child grid of ``grid``.
        factor: Child cells per parent cell along an axis.
        method: Parsed method.
        out_bands: 1-based main-raster band index per output band.
        out_names: Output band names.
        in_bands: 1-based main-raster band indices read as model input (sorted union of windows).
        windows: Per output band, ``(indices into in_bands, position of the output year)``.
        unit: Density unit of the main raster, or None for totals.
        aoi_mask: ``[rows, cols]`` bool, True inside the AOI polygon (None: everything).
        aux_paths: Aux inputs (as given).
        aux_names: Aux layer names in model order (model) or ``[layer]`` (dasymetric).
        aux_years: Year names the aux stack is built for (``in_bands`` names).
        aux_channel_order: Channel index in the AuxStack for every entry of ``aux_names``.
        nodata_out: Output nodata value.
        tile_child: Tile edge in child cells.
        overlap_parent: Tile overlap in parent cells.
    """

    main_path: Path
    full_grid: ParentGrid
    grid: ParentGrid
    offset: tuple[int, int]
    child: ChildGrid
    factor: int
    method: MethodSpec
    out_bands: list[int]
    out_names: list[str]
    in_bands: list[int]
    windows: list[tuple[list[int], int]]
    unit: str | None
    aoi_mask: np.ndarray | None
    aux_paths: list[Any]
    aux_names: list[str]
    aux_years: list[str]
    aux_channel_order: list[int]
    nodata_out: float
    tile_child: int = 120
    overlap_parent: int = 2
    fill_missing: bool = False
    #: ``discover_aux`` kinds (``--categorical`` or the checkpoint's), None: detected.
    aux_kinds: dict[str, str] | None = None
    #: Name of the user's main input (tags); ``main_path`` may be a converted temp copy.
    source_name: str | None = None
    #: GDAL creation options (``--co KEY=VALUE``) of the outputs.
    creation_options: dict[str, str] = field(default_factory=dict)
    #: Build overviews in a plain GeoTIFF output.
    overviews: bool = False
    #: The coverage-checked AuxStack of the model's aux layers on ``child`` (reused by the
    #: pipeline; a plan for another grid must not carry it).
    aux_stack: Any = field(default=None, repr=False, compare=False)


def _is_nodata(values: np.ndarray, nodata: float | None) -> np.ndarray:
    """Boolean mask of nodata cells (NaN nodata matches NaN)."""
    if nodata is None:
        return np.zeros(values.shape, dtype=bool)
    if isinstance(nodata, float) and math.isnan(nodata):
        return np.isnan(values)
    return values == nodata


def read_totals(ds: Any, plan: Plan, r0: int, r1: int, bands: Sequence[int], *, c0: int = 0, c1: int | None = None) -> np.ndarray:
    """Parent totals of rows ``[r0, r1)`` (and cols ``[c0, c1)``) of the processed grid.

    Args:
        ds: Open main dataset.
        plan: Run plan.
        r0: First row (processed grid, clipped to it by the caller).
        r1: End row.
        bands: 1-based main-raster band indices.
        c0: First col.
        c1: End col (None: grid width).

    Returns:
        ``[len(bands), r1 - r0, c1 - c0]`` float64 totals per parent cell (t CO2 / cell / yr),
        NaN where the parent is nodata or outside the AOI polygon.
    """
    from rasterio.windows import Window

    from carbonsr_cli.rasters import read_window

    c1 = plan.grid.width if c1 is None else c1
    ro, co = plan.offset
    win = Window(co + c0, ro + r0, c1 - c0, r1 - r0)
    raw = read_window(ds, win, list(bands), out_dtype="float64")
    vals = np.array(raw, dtype=np.float64, copy=True)
    vals[_is_nodata(raw, plan.full_grid.nodata)] = np.nan
    if plan.aoi_mask is not None:
        vals[:, ~plan.aoi_mask[r0:r1, c0:c1]] = np.nan
    if plan.unit is not None:
        vals = _density_to_totals(vals, plan, r0, r1, c0, c1)
    return vals


def _density_to_totals(vals: np.ndarray, plan: Plan, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Density -> totals per parent cell with the cell areas of the processed grid."""
    from rasterio.windows import Window

    from carbonsr_cli import units

    areas = units.cell_areas_m2(plan.grid, Window(c0, r0, c1 - c0, r1 - r0))
    return np.asarray(units.to_totals(vals, plan.unit, areas), dtype=np.float64)


def _scan_main(ds: Any, plan: Plan) -> int:
    """Check the totals read by the run; return the number of valid output cells.

    Raises:
        InputDataError: a negative or NaN (not nodata) total, naming the first such cell, or a
            raster that is entirely nodata (inside the AOI).
    """
    from rasterio.windows import Window

    from carbonsr_cli.rasters import read_window

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
        nd = _is_nodata(raw, nodata)
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
    from carbonsr_cli.train.checkpoints import check_compatible

    check_compatible({"aux_names": list(expected)}, ckpt_path, aux_names=list(given))
    raise CheckpointError(  # pragma: no cover - check_compatible raised above
        f"aux layers differ: checkpoint expects {list(expected)}, given {list(given)}", ckpt_path
    )


def _aoi(aoi: str | os.PathLike[str], grid: ParentGrid) -> tuple[Any, np.ndarray | None]:
    """AOI window of the parent grid (and its polygon mask, if the AOI module gives one)."""
    from carbonsr_cli import aoi as aoi_mod

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
    from carbonsr_cli.units import parse_unit

    u = parse_unit(text)
    if not u.is_density:
        return None, u.text
    return u.text, u.text


def _area_km2(grid: ParentGrid) -> float:
    """Area of the grid's extent in km2 (geodesic for geographic CRSs)."""
    try:
        from rasterio.windows import Window

        from carbonsr_cli import units

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


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def _size_torch_threads() -> int:
    """Torch intra-op threads for a CPU model run: the CPUs this process may use (affinity,
    cgroup quota, ``OMP_NUM_THREADS``), less one for the reader and writer threads from 3 CPUs
    on; torch's own default counts the host's cores and oversubscribes a shared machine."""
    import torch

    from carbonsr_cli.cpus import available_cpus

    n = available_cpus()
    n = n - 1 if n > 2 else n
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def _refuse_input_as_output(
    dests: Sequence[Path | None], main_path: Any, aux_paths: Any, checkpoint: Any, aoi: Any
) -> None:
    """Raise ``OutputError`` if an output names (or hard-links to) an input; nothing is written yet."""
    from carbonsr_cli.atomic import check_not_an_input
    from carbonsr_cli.auxlayers import expand_aux_paths

    inputs = {
        "main raster": main_path,
        "aux layer": expand_aux_paths(aux_paths),
        "model checkpoint": checkpoint,
        "AOI file": aoi,
    }
    for d in dests:
        check_not_an_input(d, inputs)


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
        aux_paths: Aux inputs (files, globs, directories; see ``auxlayers.discover_aux``). Needed for
            ``model`` and ``dasymetric``.
        dst: Output GeoTIFF (child grid, one band per output year); ``.nc``: CF netCDF with a
            time dimension (see ``carbonsr_cli.netcdf_out``; no ``cog``/``creation_options``/
            ``overviews``/``uncertainty``).
        method: ``model``, ``uniform`` or ``dasymetric[:LAYER]``; None: ``model`` if a checkpoint
            is given.
        checkpoint: carbonsr checkpoint (``best_model.pth``), loaded with ``weights_only=True``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
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
            (filled by the rule of ``carbonsr_cli.auxlayers``, with a warning); otherwise an error.
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
    from carbonsr_cli import inventory
    from carbonsr_cli.atomic import check_output_path, make_temp_path, remove_quietly

    co = parse_creation_options(creation_options)
    dst_path = check_output_path(dst, overwrite)
    if uncertainty is not None:
        check_output_path(uncertainty, overwrite)
    inp = inventory.resolve_main(main_path, variable=variable, units=units, months=months, annual=annual, co2=co2)
    kw = dict(
        method=method, checkpoint=checkpoint, device=device, batch_size=batch_size, dtype=dtype, cog=cog,
        overwrite=overwrite, years=years, bands=bands, aoi=aoi, factor=factor, compress=compress,
        uncertainty=uncertainty, progress=progress, check=check, fill_missing=fill_missing, categorical=categorical,
        overlap=overlap,
        creation_options=co, overviews=overviews, notes=inp.notes, source_name=Path(str(main_path)).name,
    )
    if not inp.needs_prepare:
        label = None
        if inp.unit is None:
            label = inp.totals_unit
        return _downscale(inp.paths[0], aux_paths, dst_path, units=inp.unit or "totals", units_label=label, **kw)
    spec = parse_method(method, checkpoint)  # usage errors before the conversion
    if uncertainty is not None and spec.kind not in ("model", "auto"):
        raise UsageError("--uncertainty needs --method model (the baselines are deterministic)")
    tmp = make_temp_path(dst_path.absolute(), tag="totals")
    try:
        inventory.write_totals(inp, tmp.with_suffix(".tif") if tmp.suffix.lower() != ".tif" else tmp)
        src = tmp if tmp.suffix.lower() == ".tif" else tmp.with_suffix(".tif")
        kw["notes"] = list(inp.notes) + [f"converted to totals per cell ({inp.totals_unit}) before downscaling"]
        try:
            return _downscale(src, aux_paths, dst_path, units="totals", units_label=inp.totals_unit, **kw)
        except CarbonSRError as exc:
            if exc.path is not None and Path(exc.path).name == src.name:  # name the user's file
                exc.path = str(main_path)
            raise
    finally:
        remove_quietly(tmp)
        if tmp.suffix.lower() != ".tif":
            remove_quietly(tmp.with_suffix(".tif"))


def _grid_warnings(grid: ParentGrid, name: str) -> None:
    """The warnings of ``ParentGrid.from_raster`` for a converted input, naming the user's file."""
    import warnings

    from carbonsr_cli.errors import GeographicCRSWarning, NoNodataWarning

    if grid.nodata is None:
        warnings.warn(f"{name}: no nodata value set; every cell is treated as valid", NoNodataWarning, stacklevel=3)
    if grid.is_geographic:
        warnings.warn(
            f"{name}: geographic CRS ({grid.crs}); cell areas vary with latitude and child resolution is nominal",
            GeographicCRSWarning,
            stacklevel=3,
        )


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


def _downscale(
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
    units: str = "totals",
    compress: str = "deflate",
    uncertainty: str | os.PathLike[str] | None = None,
    progress: bool = True,
    check: bool = True,
    fill_missing: bool = False,
    categorical: Sequence[str] | None = None,
    overlap: int = 2,
    creation_options: dict[str, str] | None = None,
    overviews: bool = False,
    notes: Sequence[str] = (),
    source_name: str | None = None,
    units_label: str | None = None,
) -> DownscaleSummary:
    """:func:`downscale` on a resolved main raster (a GeoTIFF of totals, or of ``units``)."""
    from carbonsr_cli.atomic import check_output_path
    from carbonsr_cli.grids import ParentGrid, validate_factor
    from carbonsr_cli.rasters import open_raster

    spec = parse_method(method, checkpoint)
    if dtype not in ("float32", "float64"):
        raise UsageError(f"--dtype must be float32 or float64, got {dtype!r}")
    if uncertainty is not None and spec.kind not in ("model", "auto"):
        raise UsageError("--uncertainty needs --method model (the baselines are deterministic)")
    if int(overlap) < 0:
        raise UsageError(f"--overlap must be >= 0 parent cells, got {overlap}")
    if batch_size is not None and int(batch_size) < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    unit, label = _parse_units(units)
    units_label = units_label or label
    dst_path = check_output_path(dst, overwrite)
    unc_path = check_output_path(uncertainty, overwrite) if uncertainty is not None else None
    if unc_path is not None and unc_path == dst_path:
        raise UsageError("--uncertainty must differ from the output path", unc_path)
    _refuse_input_as_output([dst_path, unc_path], main_path, aux_paths, checkpoint, aoi)
    from carbonsr_cli.downscale_strips import remove_killed_leftovers

    remove_killed_leftovers(dst_path.parent)
    main = Path(main_path)
    converted = source_name is not None and source_name != main.name
    full = ParentGrid.from_raster(main, warn=not converted)
    if converted:
        _grid_warnings(full, source_name)

    loaded = None
    normalizer = None
    notes = list(notes)
    if spec.kind == "auto":
        from carbonsr_cli.train.checkpoints import load_checkpoint

        spec, why = choose_auto(load_checkpoint(checkpoint))  # type: ignore[arg-type]
        notes.append(f"--method auto chose {spec.label}: {why}")
        if uncertainty is not None and spec.kind != "model":
            raise UsageError(f"--uncertainty needs the model, but --method auto chose {spec.label}")
    if spec.method.runs_model:
        from carbonsr_cli.train.checkpoints import load_model_for_inference

        from carbonsr_cli import distributed

        from carbonsr_cli.devices import resolve_device

        dev = resolve_device(device)
        dev = distributed.context(use_cuda=dev.type == "cuda").device(dev)  # torchrun: cuda:<local rank>
        if dev.type == "cpu":
            _size_torch_threads()
        loaded = load_model_for_inference(checkpoint, dev)  # type: ignore[arg-type]
        if factor is not None and int(factor) != loaded.factor:
            raise UsageError(f"--factor {factor} differs from the model's factor {loaded.factor}; omit --factor")
        f = loaded.factor
        if int(loaded.years_window) > int(loaded.config.max_years):
            raise CheckpointError(
                f"years_window {loaded.years_window} exceeds the model's max_years {loaded.config.max_years}",
                loaded.path,
            )
    else:
        import torch

        dev = torch.device("cpu")  # baselines are memory-bound and run on the host (--device unused)
        f = validate_factor(10 if factor is None else factor)

    out_bands = _select_bands(full, years, bands)
    n = full.count
    if loaded is not None:
        t = max(1, int(loaded.years_window))
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
    if aoi is not None:
        from dataclasses import replace

        from carbonsr_cli.grids import window_ints

        window, mask = _aoi(aoi, full)
        c, r, w, h = window_ints(full.clip_window(window))
        if w <= 0 or h <= 0:
            raise InputDataError("the AOI does not overlap the main raster", aoi)
        offset = (r, c)
        grid = replace(full, transform=full.window_transform(window), width=w, height=h)
        if mask is not None and mask.shape != (h, w):
            raise InputDataError(f"AOI mask shape {mask.shape} does not match its window {h}x{w}", aoi)

    child = grid.child(f)
    # Aux layers.
    aux_list = list(aux_paths or [])
    aux_names: list[str] = []
    aux_kinds: dict[str, str] | None = None
    order: list[int] = []
    stack: Any = None
    aux_years = [full.band_names[b - 1] for b in (in_bands if loaded is not None else out_bands)]
    if spec.method.needs_aux:
        if not aux_list:
            raise UsageError(f"--method {spec.kind} needs aux layers (--aux aux/*.tif)")
        from carbonsr_cli.auxlayers import categorical_kinds, discover_aux

        if categorical is None and checkpoint is not None:
            categorical = checkpoint_categorical(checkpoint)
        aux_kinds = categorical_kinds(categorical)
        sources = discover_aux(aux_list, kinds=aux_kinds)
        stack = _checked_stack(sources, child, aux_years, fill_missing=fill_missing)
        given = list(stack.names)
        points = list(stack.point_names)
        if loaded is None:  # baselines read their layers themselves
            stack.close()
            stack = None
        if loaded is not None:
            order = _resolve_aux_order(given, loaded.aux_names, loaded.path)
            aux_names = list(loaded.aux_names)
            normalizer = _normalizer(loaded)
            if spec.kind == "fitted":
                from carbonsr_cli.methods.model import prior_only_model
                from carbonsr_cli.train.checkpoints import load_checkpoint

                loaded.model = prior_only_model(load_checkpoint(checkpoint), normalizer).to(dev)  # type: ignore[arg-type]
        else:
            spec = spec.method.resolve(spec, given, points)
            aux_names = spec.method.layers(spec, given, points)
            order = [given.index(n) for n in aux_names]

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
        aux_channel_order=order,
        nodata_out=_output_nodata(full.nodata),
        tile_child=_tile_size(f, loaded.config.downsample_factor if loaded is not None else 1),
        fill_missing=fill_missing,
        aux_kinds=aux_kinds,
        aux_stack=stack if spec.method.runs_model else None,
        overlap_parent=int(overlap),
        source_name=source_name or main.name,
        creation_options=dict(creation_options or {}),
        overviews=bool(overviews),
    )
    with open_raster(main) as ds:
        valid = _scan_main(ds, plan)

    if batch_size is None:
        batch_size = 128 if dev.type == "cuda" else 8
    summary = DownscaleSummary(
        output=str(dst_path),
        method=spec.label,
        factor=f,
        years=plan.out_names,
        units=units_label,
        dtype=dtype,
        nodata=plan.nodata_out,
        device=str(dev),
        precision="fp32" if loaded is not None else "float64",
        batch_size=int(batch_size),
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

    import rasterio

    t0 = time.perf_counter()
    # GDAL's block cache defaults to 5 % of RAM; bound it to what one strip of output blocks
    # needs, so peak memory does not grow with the machine (or the raster).
    with rasterio.Env(GDAL_CACHEMAX=_gdal_cache_bytes(plan, dtype, unc_path is not None)):
        _run_and_check(
            plan, dst_path, summary, t0, check=check, loaded=loaded, device=dev, batch_size=int(batch_size),
            dtype=dtype, cog=cog, overwrite=overwrite, compress=compress, uncertainty=unc_path, progress=progress,
            normalizer=normalizer,
        )
    return summary


def _gdal_cache_bytes(plan: Plan, dtype: str, uncertainty: bool) -> int:
    """GDAL block cache for a run: 1.5 strips of 512-row output blocks (+64 MiB), 128 MiB..1 GiB."""
    from carbonsr_cli.writer import BLOCK

    writers = 2 if uncertainty else 1
    strip = writers * len(plan.out_bands) * BLOCK * plan.child.width * np.dtype(dtype).itemsize
    return int(min(max(1.5 * strip + (64 << 20), 128 << 20), 1 << 30))


def _run_and_check(plan: Plan, dst_path: Path, summary: DownscaleSummary, t0: float, *, check: bool, **kwargs: Any) -> None:
    """Run the pipeline, then time and check the written file (fills ``summary``)."""
    from carbonsr_cli.downscale_distributed import run_and_check as distributed_run_and_check
    from carbonsr_cli.downscale_pipeline import run_pipeline

    if distributed_run_and_check(plan, dst_path, summary, t0, check=check, **kwargs):
        return  # torchrun: rows split over the ranks, rank 0 assembled and checked the file
    run_pipeline(plan, dst_path, summary, **kwargs)
    summary.seconds = time.perf_counter() - t0
    summary.km2_per_s = summary.area_km2 * len(plan.out_names) / max(summary.seconds, 1e-9)
    if check:
        t1 = time.perf_counter()
        summary.conservation = check_written_conservation(dst_path, plan)
        summary.check_seconds = time.perf_counter() - t1
    else:
        summary.notes.append("conservation of the written file was not checked (check=False)")


def _normalizer(loaded: Any) -> Any:
    """``AuxNormalizer`` of the checkpoint's aux channels, in model order."""
    from carbonsr_cli.errors import CarbonSRError
    from carbonsr_cli.stats import AuxNormalizer

    try:
        return AuxNormalizer.from_stats(loaded.stats, names=loaded.aux_names)
    except (CarbonSRError, KeyError, TypeError, ValueError) as exc:
        msg = exc.message if isinstance(exc, CarbonSRError) else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"aux statistics in the checkpoint are not usable: {msg}", loaded.path) from None


def checkpoint_categorical(checkpoint: str | os.PathLike[str]) -> list[str]:
    """The aux rasters a checkpoint was trained to read as categorical (``train --categorical``)."""
    from carbonsr_cli.train.checkpoints import load_checkpoint

    cfg = load_checkpoint(checkpoint).get("train_config") or {}
    return [str(n) for n in (cfg.get("categorical") or [])]


def _checked_stack(sources: Sequence[Any], child: ChildGrid, years: Sequence[str], *, fill_missing: bool = False) -> Any:
    """The AuxStack of the aux sources on ``child`` (its construction checks their coverage).

    The check decompresses every aux raster once (in parallel); GDAL's block cache (default 5%
    of the RAM) is capped at 128 MiB meanwhile, unless ``GDAL_CACHEMAX`` is set.
    """
    import rasterio

    from carbonsr_cli.auxlayers import AuxStack

    env = {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": 128 << 20}
    with rasterio.Env(**env):
        return AuxStack(sources, child, list(years), fill_missing=fill_missing)


def check_written_conservation(
    path: str | os.PathLike[str], plan: Plan, *, rows_per_band: int | None = None
) -> ConservationCheck:
    """Re-read the written output and compare its block sums with the parent totals.

    Streams over bands of parent rows (up to 6 bands at once, in threads with their own
    dataset handles); child values are summed in float64. Nodata children
    must coincide exactly with nodata parents.

    Args:
        path: Written child raster (one band per output year).
        plan: The run plan (main raster, bands, AOI, factor, units).
        rows_per_band: Parent rows per band (default: about 2 x 10^6 child values per band).

    Returns:
        A :class:`ConservationCheck`.
    """
    import concurrent.futures as cf
    import threading

    from carbonsr_cli.rasters import decode_threads_env, open_raster

    h, w = plan.grid.height, plan.grid.width
    step = rows_per_band or max(1, (1 << 21) // max(1, w * plan.factor**2 * len(plan.out_bands)))
    from carbonsr_cli.cpus import available_cpus

    n_threads = max(1, min(6, available_cpus(respect_omp=False), -(-h // step)))
    decode = max(1, (os.cpu_count() or 1) // n_threads)  # block-decoding threads per read
    local = threading.local()
    opened: list[Any] = []

    def band(r0: int) -> ConservationCheck:
        handles = getattr(local, "handles", None)
        if handles is None:  # rasterio datasets are not thread-safe: one pair per thread
            with decode_threads_env(decode):  # GTiff reads the option when the file is opened
                handles = local.handles = (open_raster(plan.main_path), open_raster(path))
            opened.extend(handles)
        return _check_rows(handles[0], handles[1], plan, r0, min(h, r0 + step))

    res = ConservationCheck()
    try:
        with cf.ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="carbonsr-check") as ex:
            for part in ex.map(band, range(0, h, step)):
                res.merge(part)
    finally:
        for ds in opened:
            ds.close()
    return res.finish()


def _check_rows(main_ds: Any, out_ds: Any, plan: Plan, r0: int, r1: int) -> ConservationCheck:
    """Conservation figures of parent rows ``[r0, r1)`` (one band of :func:`check_written_conservation`)."""
    from rasterio.windows import Window

    from carbonsr_cli.rasters import read_window

    f = plan.factor
    w = plan.grid.width
    res = ConservationCheck()
    nodata = out_ds.nodata
    totals = read_totals(main_ds, plan, r0, r1, plan.out_bands)
    kids = read_window(out_ds, Window(0, r0 * f, w * f, (r1 - r0) * f), out_dtype="float64")
    kid_nd = _is_nodata(kids, nodata)
    if plan.unit is not None:
        kids = _child_density_to_totals(kids, plan, r0, r1)
    nb = kids.shape[0]
    kb = kids.reshape(nb, r1 - r0, f, w, f)
    ndb = kid_nd.reshape(nb, r1 - r0, f, w, f)
    par_nd = np.isnan(totals)
    any_nd = ndb.any(axis=(2, 4))
    all_nd = ndb.all(axis=(2, 4))
    res.nodata_mismatch += int((par_nd & ~all_nd).sum() + (~par_nd & any_nd).sum())
    valid = ~par_nd & ~any_nd
    vk = np.where(ndb, 0.0, kb)
    nonfinite = ~np.isfinite(vk)
    res.nans += int((nonfinite & valid[:, :, None, :, None]).sum())
    vk = np.where(nonfinite, 0.0, vk)
    res.negatives += int(((vk < 0) & valid[:, :, None, :, None]).sum())
    sums = vk.sum(axis=(2, 4))
    s = totals[valid]
    got = sums[valid]
    res.blocks += int(valid.sum())
    if s.size:
        err = np.abs(got - s)
        res.max_abs_error = max(res.max_abs_error, float(err.max()))
        pos = s > 0
        if pos.any():
            res.max_rel_error = max(res.max_rel_error, float((err[pos] / s[pos]).max()))
        zero_blocks = (totals == 0) & valid
        nz_child = (vk != 0).any(axis=(2, 4))
        res.zero_blocks_violated += int((zero_blocks & nz_child).sum())
    return res


def _child_density_to_totals(kids: np.ndarray, plan: Plan, r0: int, r1: int) -> np.ndarray:
    """Child densities of parent rows ``[r0, r1)`` -> totals per child cell."""
    from rasterio.windows import Window

    from carbonsr_cli import units

    f = plan.factor
    areas = units.cell_areas_m2(plan.child, Window(0, r0 * f, plan.child.width, (r1 - r0) * f))
    return np.asarray(units.to_totals(kids, plan.unit, areas), dtype=np.float64)
