"""The plan of a downscaling run: everything the engine needs, decided up front (built by
:mod:`.planning`), and the totals I/O shared by the engine and the check (:func:`read_totals`).

A :class:`Plan` holds the grids (AOI window included), the method, the bands and their year
windows, the units, the aux layers (the coverage-checked aux stack, built once and handed to
the engine) and the tile size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from carbonsr_cli import units
from carbonsr_cli.methods import MethodSpec
from carbonsr_cli.nodata import nodata_mask
from carbonsr_cli.rasters import read_window

if TYPE_CHECKING:  # pragma: no cover
    from carbonsr_cli.grids import ChildGrid, ParentGrid

__all__ = ["DEFAULT_NODATA", "TOTALS_UNIT", "Plan", "plan_stack", "read_totals", "year_window"]


#: Methods accepted by ``--method``.
#: Output nodata when the parent's nodata is unset or could be a valid child value.
DEFAULT_NODATA = -9999.0


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
    #: The coverage-checked AuxStack of the run's aux layers on ``child`` (reused by the
    #: pipeline; a plan for another grid must not carry it).
    aux_stack: Any = field(default=None, repr=False, compare=False)


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

    c1 = plan.grid.width if c1 is None else c1
    ro, co = plan.offset
    win = Window(co + c0, ro + r0, c1 - c0, r1 - r0)
    raw = read_window(ds, win, list(bands), out_dtype="float64")
    vals = np.array(raw, dtype=np.float64, copy=True)
    vals[nodata_mask(raw, plan.full_grid.nodata)] = np.nan
    if plan.aoi_mask is not None:
        vals[:, ~plan.aoi_mask[r0:r1, c0:c1]] = np.nan
    if plan.unit is not None:
        vals = _density_to_totals(vals, plan, r0, r1, c0, c1)
    return vals


def _density_to_totals(vals: np.ndarray, plan: Plan, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Density -> totals per parent cell with the cell areas of the processed grid."""
    from rasterio.windows import Window

    areas = units.cell_areas_m2(plan.grid, Window(c0, r0, c1 - c0, r1 - r0))
    return np.asarray(units.to_totals(vals, plan.unit, areas), dtype=np.float64)


def plan_stack(plan: Plan) -> Any:
    """The plan's coverage-checked aux stack (built once, at planning), or, for a plan of another
    grid (a torchrun part: ``distributed.sub_plan``), a stack of the same layers on its grid."""
    from carbonsr_cli.aux import AuxStack, discover_aux

    aux = plan.aux_stack
    if aux is None or aux.grid != plan.child or list(aux.years) != list(plan.aux_years):
        aux = AuxStack(discover_aux(plan.aux_paths, kinds=plan.aux_kinds), plan.child, plan.aux_years, fill_missing=plan.fill_missing)
    return aux
