"""Conversion of a resolved main input (:class:`~carbonsr_cli.inventory.MainInput`) to a float64
GeoTIFF of totals per cell per output period (:func:`write_totals`), streamed by strips of rows:
densities x geodesic area x seconds, per-year rates on months, months summed, C -> CO2, south-up
grids flipped."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carbonsr_cli import units as U
from carbonsr_cli.inventory import MainInput, Period
from carbonsr_cli.nodata import nodata_mask
from carbonsr_cli.rasters import read_window
from carbonsr_cli.units import MONTH, SECONDS_PER_DAY

__all__ = ["write_totals"]


def _band_factor(unit: Any, period: Period) -> tuple[float, bool]:
    """``(multiplier, needs cell area in m2)`` from a value in ``unit`` to the band's total in t."""

    f = unit.mass_t
    if unit.is_density:
        f /= unit.area_m2
    if unit.time_given:
        duration_s = period.days * SECONDS_PER_DAY
        if unit.time_s is None:  # per year
            unit_s = period.year_days * SECONDS_PER_DAY
        elif unit.time_s == MONTH:
            unit_s = duration_s  # checked: monthly bands only
        else:
            unit_s = unit.time_s
        f *= duration_s / unit_s
    return f, unit.is_density



def write_totals(inp: MainInput, dest: str | os.PathLike[str], *, rows_per_strip: int | None = None) -> Path:
    """Write the converted totals per cell (float64, north-up, one band per output period).

    Streams over strips of rows (bounded memory). Nodata cells (in any summed month) stay nodata.

    Args:
        inp: From :func:`resolve_main`.
        dest: GeoTIFF to write (overwritten).
        rows_per_strip: Rows converted at once (default: about 2^22 values per strip).

    Returns:
        ``dest`` as a Path.
    """
    import rasterio
    from rasterio.windows import Window

    dest = Path(dest)
    parsed = U.parse_unit(inp.unit) if inp.unit is not None else None
    co2 = U.CO2_PER_C if (inp.co2 and parsed is not None and (parsed.species or "").upper() == "C") else 1.0
    h, w = inp.height, inp.width
    nodata = inp.nodata
    out_nodata = nodata if nodata is not None else None
    profile = {
        "driver": "GTiff", "width": w, "height": h, "count": len(inp.out_names), "dtype": "float64",
        "crs": inp.crs, "transform": inp.north_up_transform, "nodata": out_nodata, "tiled": True,
        "blockxsize": 256, "blockysize": 256, "compress": "deflate", "predictor": 3, "BIGTIFF": "IF_SAFER",
    }
    step = rows_per_strip or max(1, min(h, (1 << 22) // max(1, w * max(len(g) for g in inp.out_groups))))
    grid = _GridView(inp.crs, inp.north_up_transform, w, h)
    handles: dict[str, Any] = {}
    try:
        with rasterio.open(dest, "w", **profile) as out:
            for k, name in enumerate(inp.out_names, start=1):
                out.set_band_description(k, name)
            for r0 in range(0, h, step):
                r1 = min(h, r0 + step)
                # Source rows of output rows [r0, r1) (flipped for south-up inputs).
                src_win = Window(0, h - r1, w, r1 - r0) if inp.south_up else Window(0, r0, w, r1 - r0)
                areas = None
                for k, group in enumerate(inp.out_groups, start=1):
                    acc = np.zeros((r1 - r0, w), dtype=np.float64)
                    nd = np.zeros((r1 - r0, w), dtype=bool)
                    for i in group:
                        band = inp.bands[i]
                        ds = handles.get(band.dataset)
                        if ds is None:
                            ds = handles[band.dataset] = rasterio.open(band.dataset)
                        raw = read_window(ds, src_win, band.index, out_dtype="float64")
                        if inp.south_up:
                            raw = raw[::-1]
                        if nodata is not None:
                            nd |= nodata_mask(raw, nodata)
                        scale, offset = inp.scales[i] if i < len(inp.scales) else (1.0, 0.0)
                        vals = raw * scale + offset if (scale, offset) != (1.0, 0.0) else raw
                        if parsed is not None:
                            f, need_area = _band_factor(parsed, band.period)
                            if need_area:
                                if areas is None:
                                    areas = U.cell_areas_m2(grid, Window(0, r0, w, r1 - r0))
                                vals = vals * (f * areas)
                            elif f != 1.0:
                                vals = vals * f
                        acc += np.where(nd, 0.0, vals) if nodata is not None else vals
                    if co2 != 1.0:
                        acc *= co2
                    if nodata is not None:
                        acc[nd] = nodata
                    out.write(acc, k, window=Window(0, r0, w, r1 - r0))
    finally:
        for ds in handles.values():
            ds.close()
    return dest



@dataclass(frozen=True)
class _GridView:
    """Just enough of a grid for ``units.cell_areas_m2``."""

    crs: Any
    transform: Any
    width: int
    height: int
