"""CF netCDF output of ``downscale`` (``-o out.nc``).

The run writes its GeoTIFF as usual, to a hidden temp file next to the output, and checks its
conservation; GDAL's netCDF driver then copies it block by block (bounded memory) into a
netCDF-4 file (deflate) with a ``time`` dimension (one step per output band: years at 1 July,
months at the 15th, as ``days since 1970-01-01``), ``x``/``y`` (or ``lon``/``lat``)
coordinates, a grid-mapping variable and the data variable ``emissions`` with ``units`` and
``_FillValue``. The netCDF is re-read strip by strip and compared with the checked GeoTIFF
(values must be identical), then renamed into place; the temp GeoTIFF is removed.
"""

from __future__ import annotations

import datetime as _dt
import functools
import inspect
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from carbonsr_cli.atomic import atomic_path, check_output_path, make_temp_path, remove_quietly
from carbonsr_cli.distributed import in_torchrun
from carbonsr_cli.errors import OutputError, UsageError

__all__ = ["NETCDF_SUFFIXES", "VARIABLE", "is_netcdf_path", "time_axis", "write_netcdf", "netcdf_output"]

#: Output names written as netCDF.
NETCDF_SUFFIXES = (".nc", ".nc4")
#: Name of the data variable.
VARIABLE = "emissions"
_EPOCH = _dt.date(1970, 1, 1)


def is_netcdf_path(path: str | os.PathLike[str] | None) -> bool:
    """True if ``path`` ends in ``.nc`` or ``.nc4``."""
    return path is not None and Path(str(path)).suffix.lower() in NETCDF_SUFFIXES


def time_axis(names: Sequence[str]) -> tuple[str, list[float], dict[str, str]]:
    """``(dimension name, values, attributes)`` of the band axis of the output.

    Years (``2019``) -> 1 July, months (``2019-03``, ``201903``) -> the 15th, in
    ``days since 1970-01-01``; other band names -> a ``band`` dimension numbered from 1.
    """
    days: list[float] = []
    for n in names:
        s = str(n).strip()
        m = re.fullmatch(r"(\d{4})(?:-?(\d{2}))?", s)
        if not m or (m.group(2) and not 1 <= int(m.group(2)) <= 12):
            days = []
            break
        d = _dt.date(int(m.group(1)), 7, 1) if m.group(2) is None else _dt.date(int(m.group(1)), int(m.group(2)), 15)
        days.append(float((d - _EPOCH).days))
    if days and len(set(days)) == len(days):
        return "time", days, {
            "units": "days since 1970-01-01", "standard_name": "time", "calendar": "standard", "axis": "T",
            "long_name": "middle of the period (band names: " + ", ".join(map(str, names)) + ")",
        }
    return "band", [float(i) for i in range(1, len(names) + 1)], {
        "long_name": "output band (names: " + ", ".join(map(str, names)) + ")", "units": "1",
    }


def write_netcdf(tif: Path, dst: Path, *, overwrite: bool, compress: str = "deflate", check: bool = True) -> list[str]:
    """Copy the checked GeoTIFF ``tif`` to the CF netCDF ``dst`` (atomically); returns notes.

    Raises:
        OutputError: GDAL could not write it, or (``check``) its values differ from ``tif``.
    """
    import rasterio
    import rasterio.shutil

    with rasterio.open(tif, "r+") as ds:  # GDAL netCDF metadata, read by CreateCopy
        names = [d or str(i) for i, d in enumerate(ds.descriptions, 1)]
        dim, values, attrs = time_axis(names)
        unit = ds.units[0] or ds.tags().get("CARBONSR_UNITS", "")
        ds.update_tags(
            NETCDF_DIM_EXTRA="{" + dim + "}",
            **{f"NETCDF_DIM_{dim}_DEF": f"{{{len(values)},6}}",  # 6: NC_DOUBLE
               f"NETCDF_DIM_{dim}_VALUES": "{" + ",".join(f"{v:.17g}" for v in values) + "}"},
            **{f"{dim}#{k}": v for k, v in attrs.items()},
        )
        for i, v in enumerate(values, 1):
            ds.update_tags(
                i, NETCDF_VARNAME=VARIABLE, units=unit, long_name=f"{VARIABLE} ({unit})" if unit else VARIABLE,
                **{f"NETCDF_DIM_{dim}": f"{v:.17g}"},
            )
    opts = {"FORMAT": "NC4"}
    if str(compress).lower() != "none":
        opts.update(COMPRESS="DEFLATE", ZLEVEL="4")
    with atomic_path(dst, overwrite) as tmp:
        try:
            rasterio.shutil.copy(str(tif), str(tmp), driver="netCDF", **opts)
        except rasterio.errors.RasterioError as exc:
            raise OutputError(f"cannot write netCDF: {str(exc).splitlines()[0][:200]}", dst) from None
        if check:
            _check_equal(tif, tmp, dst)
    return [f"written as CF netCDF-4: variable {VARIABLE!r} ({dim}: {len(values)}), {unit or 'no unit'}"]


def _check_equal(tif: Path, nc: Path, dst: Path, rows: int = 256) -> None:
    """Compare the netCDF with the GeoTIFF strip by strip (identical values and nodata)."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(tif) as a, rasterio.open(nc, driver="netCDF") as b:
        if (a.count, a.height, a.width) != (b.count, b.height, b.width) or not a.transform.almost_equals(b.transform):
            raise OutputError("the netCDF written does not have the grid of the checked GeoTIFF (this is a bug)", dst)
        for r0 in range(0, a.height, rows):
            win = Window(0, r0, a.width, min(rows, a.height - r0))
            if not np.array_equal(a.read(window=win), b.read(window=win), equal_nan=True):
                raise OutputError(f"the netCDF written differs from the checked GeoTIFF near row {r0} (this is a bug)", dst)


def netcdf_output(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``downscale``: a ``.nc`` output is written as a GeoTIFF, checked, then converted."""
    sig = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        unc = a.get("uncertainty")
        if not is_netcdf_path(a["dst"]):
            if is_netcdf_path(unc):
                raise UsageError("--uncertainty: netCDF is written only for the main output (give a .tif)")
            return func(*bound.args, **bound.kwargs)
        for flag, on in (("--cog", a.get("cog")), ("--co", a.get("creation_options")),
                         ("--overviews", a.get("overviews")), ("--uncertainty", unc is not None)):
            if on:
                raise UsageError(f"{flag} applies to GeoTIFF outputs only, not to the netCDF {Path(str(a['dst'])).name}")

        if in_torchrun():  # each rank would write its own temp GeoTIFF
            raise UsageError("a netCDF output is not written under torchrun; write a .tif (then gdal_translate -of netCDF)")

        overwrite = bool(a.get("overwrite", False))
        dst = check_output_path(a["dst"], overwrite)
        tif = make_temp_path(Path(str(dst) + ".tif"), tag="gtiff")
        try:
            a["dst"], a["overwrite"] = tif, True
            summary = func(*bound.args, **bound.kwargs)
            summary.output = str(dst)
            if a.get("check", True) and not summary.conservation.ok:
                return summary  # the caller reports the failed check; no netCDF written
            summary.notes.extend(
                write_netcdf(tif, dst, overwrite=overwrite, compress=a.get("compress", "deflate"), check=a.get("check", True))
            )
            return summary
        finally:
            remove_quietly(tif)

    return wrapper
