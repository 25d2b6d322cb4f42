"""Main rasters as published inventories ship them: netCDF variables, monthly files, CF units.

:func:`resolve_main` looks at what the user gave as the main raster and decides how to read it:

- **Files.** One raster, or several (a quoted glob such as ``'odiac/odiac2023_1km_*_19??.tif'``)
  on one grid, whose bands are stacked in time order. A netCDF (or any GDAL multi-dimensional
  source) is read through GDAL's netCDF driver: the variable is ``--variable`` or the only data
  variable (coordinate bounds, ``crs``, ``lat``/``lon`` are skipped).
- **CRS.** A netCDF without a grid mapping whose grid is CF ``lat``/``lon`` (degrees, within
  -180..360 x -90..90) is read as EPSG:4326 (a note says so). GDAL returns south-up grids
  north-up; a raster that is still south-up (positive pixel height) is flipped when converted.
- **Time.** Band names come from a CF ``time`` coordinate (decoded with xarray's CF time
  decoding: ``2019`` for annual steps, ``2019-01`` for monthly ones), else band descriptions /
  ``YEAR`` tags / file names as for GeoTIFFs (``rasters.read_years``). Names such as
  ``2019-01``, ``2019_01`` or ``201901`` are months; with ``months=True`` a 4-digit ``YYMM``
  (ODIAC's ``..._1901.tif``) is a month too (without it ``1901`` is a year).
- **Units.** ``--units`` wins; else the band/CF ``units`` attribute (or a ``UNITS``/``units``
  tag); else totals in t CO2 / cell / yr (as before). A unit string without a time
  (``Tonnes``, ``t/cell``) is a total over each band's period; with one, values are rates:
  ``kg m-2 s-1`` over a calendar month or year (365/366 days when the year is known, else
  365.25), ``t/cell/yr`` on a monthly band gives ``days_in_month / days_in_year`` of it,
  ``t C/cell/month`` needs monthly bands.
- **Carbon.** ``t C`` stays carbon unless ``co2=True`` (x 44/12, :data:`units.CO2_PER_C`); the
  output unit says which (``t C / cell / month``, ``t CO2 / cell / yr``).
- **Months.** Monthly bands are downscaled month by month (the default) or, with
  ``annual=True``, summed to annual totals first (every year needs its 12 months).

When anything has to be converted (netCDF, several files, a density or per-month rate from the
file, ``co2``, ``annual``, a south-up grid), :func:`write_totals` writes the converted totals per
cell (float64, one band per output period) to a GeoTIFF that the downscaling then reads by
window; :func:`carbonsr_cli.downscale.downscale` puts it in a hidden temp file next to the output
and removes it at the end. A plain GeoTIFF of totals (or with ``--units`` on it, converted as
before) is read directly.
"""

from __future__ import annotations

import calendar
import glob
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from carbonsr_cli.errors import InputDataError, MissingInputError, UsageError
from carbonsr_cli.rasters import _quiet_gdal, check_north_up, open_raster, read_years
from carbonsr_cli.units import parse_unit

__all__ = ["Period", "BandSource", "MainInput", "resolve_main", "period_from_name", "expand_main"]

_NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf", ".h5", ".hdf5", ".he5")
#: Subdataset variables that are never the data variable.
_NOT_DATA = re.compile(r"(^|_)(bnds|bounds|bnd)$|^(lat|lon|latitude|longitude|crs|spatial_ref|time|area|cell_area)$", re.I)
#: 2019-01 / 2019_01 / 2019.01 / 201901 (a month of a 19xx/20xx year).
_YM_RE = re.compile(r"(?<!\d)(19\d{2}|20\d{2})[-_.]?(0[1-9]|1[0-2])(?!\d)")
#: ODIAC-style YYMM (only with ``months=True``).
_YYMM_RE = re.compile(r"(?<!\d)(\d{2})(0[1-9]|1[0-2])(?!\d)")
_YEAR_RE = re.compile(r"(?<!\d)(19\d{2}|20\d{2})(?!\d)")
_TOTALS_DEFAULT = "t CO2 / cell / yr"


@dataclass(frozen=True)
class Period:
    """The time a band covers: a calendar year, a calendar month, or unknown.

    Attributes:
        year: Calendar year, or None (unknown period: a year of 365.25 days).
        month: 1..12 for a monthly band, else None.
    """

    year: int | None = None
    month: int | None = None

    @property
    def label(self) -> str:
        """``2019``, ``2019-01`` or ``""`` (unknown)."""
        if self.year is None:
            return ""
        return f"{self.year:04d}-{self.month:02d}" if self.month else f"{self.year:04d}"

    @property
    def days(self) -> float:
        """Length in days (365.25 when the year is unknown)."""
        if self.year is None:
            return 365.25
        if self.month:
            return float(calendar.monthrange(self.year, self.month)[1])
        return 366.0 if calendar.isleap(self.year) else 365.0

    @property
    def year_days(self) -> float:
        """Days of the calendar year the band lies in (365.25 when unknown)."""
        if self.year is None:
            return 365.25
        return 366.0 if calendar.isleap(self.year) else 365.0


def period_from_name(name: str, *, months: bool = False) -> Period | None:
    """The period a band or file name says: ``2019-01``/``201901`` (a month), ``2019`` (a year).

    With ``months`` a 4-digit ``YYMM`` (e.g. ODIAC's ``_1901``, January 2019; years 00-69 are
    20xx, 70-99 19xx) is a month before it is a year. Returns None when the name has no date.
    """
    found = _YM_RE.findall(name)
    if found:
        y, m = found[-1]
        return Period(int(y), int(m))
    if months:
        found = _YYMM_RE.findall(name)
        if found:
            yy, m = found[-1]
            y = int(yy)
            return Period(2000 + y if y < 70 else 1900 + y, int(m))
    found = _YEAR_RE.findall(name)
    if found:
        return Period(int(found[-1]))
    return None


@dataclass
class BandSource:
    """One band of the main input.

    Attributes:
        dataset: GDAL name to open (a path, or ``NETCDF:"file":var``).
        index: 1-based band index in ``dataset``.
        period: Time it covers.
        name: Band name (the period label, else the raster's own band name).
    """

    dataset: str
    index: int
    period: Period
    name: str


@dataclass
class MainInput:
    """The main input as resolved by :func:`resolve_main`.

    Attributes:
        paths: Input files (time order).
        bands: Input bands in time order.
        crs: CRS (EPSG:4326 when assumed for lat/lon).
        transform: Geotransform as read (may be south-up).
        width: Columns.
        height: Rows.
        nodata: Nodata of the input (None: unset).
        unit: Unit string of the input values (None: totals per cell, t CO2 / cell / yr).
        unit_origin: ``"option"``, ``"file"`` or ``"default"``.
        co2: Convert carbon to CO2.
        annual: Sum monthly bands to annual totals.
        needs_prepare: A converted totals raster must be written (see module docstring).
        out_names: Names of the bands of the totals (one per output period).
        out_groups: Per output band, indices into ``bands`` that are summed.
        totals_unit: Unit of the converted totals (``t C / cell / month``, ...).
        notes: Remarks for the user (assumed CRS, unit from the file, ...).
    """

    paths: list[Path]
    bands: list[BandSource]
    crs: Any
    transform: Any
    width: int
    height: int
    nodata: float | None
    unit: str | None
    unit_origin: str
    co2: bool = False
    annual: bool = False
    needs_prepare: bool = False
    out_names: list[str] = field(default_factory=list)
    out_groups: list[list[int]] = field(default_factory=list)
    totals_unit: str = _TOTALS_DEFAULT
    notes: list[str] = field(default_factory=list)
    scales: list[tuple[float, float]] = field(default_factory=list)

    @property
    def south_up(self) -> bool:
        """True if row 0 is the southernmost row."""
        return self.transform.e > 0

    @property
    def north_up_transform(self) -> Any:
        """The geotransform of the (flipped if needed) totals raster."""
        from affine import Affine

        t = self.transform
        if t.e > 0:
            return Affine(t.a, t.b, t.c, t.d, -t.e, t.f + t.e * self.height)
        return t


def expand_main(main: str | os.PathLike[str]) -> list[Path]:
    """Main input path(s): ``main`` itself, or the sorted files a quoted glob matches.

    Raises:
        MissingInputError: a glob that matches nothing.
    """
    text = str(main)
    if any(ch in text for ch in "*?[") and not Path(text).exists():
        found = sorted(Path(p) for p in glob.glob(text))
        if not found:
            raise MissingInputError("the pattern matches no file", text)
        return found
    return [Path(text)]


def _is_netcdf(path: Path) -> bool:
    if path.suffix.lower() in _NETCDF_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return False
    return head[:3] == b"CDF" or head[:8] == b"\x89HDF\r\n\x1a\n"


def _netcdf_dataset(path: Path, variable: str | None) -> tuple[str, list[str]]:
    """``(GDAL dataset name, notes)`` of the data variable of a netCDF file."""
    import rasterio
    from rasterio.errors import RasterioError

    with _quiet_gdal(path):
        try:
            with rasterio.open(path) as ds:
                subs = list(ds.subdatasets)
                own = ds.tags(1).get("NETCDF_VARNAME") if ds.count else None
        except RasterioError as exc:
            raise InputDataError(f"cannot open netCDF: {str(exc).splitlines()[0][:200]}", path) from None
    if not subs:
        if own is None:
            raise InputDataError("no gridded variable (2-D or more) in this netCDF", path)
        if variable and variable != own:
            raise UsageError(f"no variable {variable!r}; the file holds {own!r}", path)
        return str(path), []
    names = [s.rsplit(":", 1)[-1] for s in subs]
    if variable:
        if variable not in names:
            raise UsageError(f"no variable {variable!r}; its gridded variables are {', '.join(names)}", path)
        return subs[names.index(variable)], []
    data = [s for s, n in zip(subs, names) if not _NOT_DATA.search(n)]
    if len(data) != 1:
        cand = [n for s, n in zip(subs, names) if s in data] or names
        raise UsageError(f"several variables ({', '.join(cand)}); choose one with --variable", path)
    return data[0], []


def _cf_times(tags: dict[str, str], nbands: int, band_tags: list[dict[str, str]]) -> list[Any] | None:
    """Decoded CF times of the bands (numpy datetime64 values), or None without a time axis."""
    extra = tags.get("NETCDF_DIM_EXTRA", "").strip("{}").split(",")
    tdim = next((d for d in extra if d and (d == "time" or d.lower().startswith("time") or d == "t")), None)
    if tdim is None:
        return None
    units = tags.get(f"{tdim}#units")
    if not units or " since " not in units:
        return None
    try:
        raw = np.array([float(bt[f"NETCDF_DIM_{tdim}"]) for bt in band_tags], dtype=np.float64)
    except (KeyError, ValueError):
        return None
    if len(extra) > 1 or raw.size != nbands:
        return None
    from xarray.coding.times import decode_cf_datetime

    cal = tags.get(f"{tdim}#calendar", "standard")
    try:
        return list(decode_cf_datetime(raw, units, cal))
    except Exception as exc:  # noqa: BLE001 - odd calendars without cftime, bad units
        raise InputDataError(f"cannot decode the time axis ({units!r}, calendar {cal!r}): {exc}") from None


def _periods_from_times(times: list[Any], path: Path) -> list[Period]:
    """Annual periods if every step is in its own year, else monthly (one step per month)."""
    ym = []
    for t in times:
        if hasattr(t, "year") and not isinstance(t, np.datetime64):
            ym.append((int(t.year), int(t.month)))
        else:
            d = np.datetime64(t, "M").astype(object)
            ym.append((d.year, d.month))
    years = [y for y, _ in ym]
    if len(set(years)) == len(years):
        # One step per year: annual (a single step is annual unless it is obviously a month).
        return [Period(y) for y in years]
    if len(set(ym)) == len(ym):
        return [Period(y, m) for y, m in ym]
    raise InputDataError(
        "time steps finer than a month are not supported (sum them to months or years first, "
        "e.g. cdo monsum)",
        path,
    )


def _file_unit(ds: Any) -> str | None:
    """Unit string stored in the file: band units, CF ``units``, else a UNITS/units tag."""
    units = [u for u in (ds.units or ()) if u]
    if units:
        return str(units[0])
    tags = ds.tags()
    for key in ("CARBONSR_UNITS", "UNITS", "units"):
        if tags.get(key):
            return str(tags[key])
    var = ds.tags(1).get("NETCDF_VARNAME")
    if var and tags.get(f"{var}#units"):
        return str(tags[f"{var}#units"])
    return None


def _looks_lat_lon(ds: Any) -> bool:
    """True for a netCDF grid on CF lat/lon coordinates (degrees) without a grid mapping."""
    tags = ds.tags()
    lat_deg = any(k.endswith("#units") and str(v).lower().startswith("degree") for k, v in tags.items()
                  if k.split("#")[0].lower() in ("lat", "latitude", "y"))
    b = ds.bounds
    inside = -180.5 <= min(b.left, b.right) and max(b.left, b.right) <= 360.5 and -90.5 <= min(b.bottom, b.top) and max(b.bottom, b.top) <= 90.5
    return bool(lat_deg and inside)


def resolve_main(
    main: str | os.PathLike[str],
    *,
    variable: str | None = None,
    units: str | None = None,
    months: bool = False,
    annual: bool = False,
    co2: bool = False,
) -> MainInput:
    """Resolve the main input: files, variable, CRS, band periods and units (nothing is read).

    Args:
        main: A raster, a netCDF, or a quoted glob of rasters on one grid (e.g. monthly files).
        variable: netCDF variable (default: the only data variable).
        units: Unit of the values (``--units``); None: from the file, else t CO2 / cell / yr.
        months: Read 4-digit ``YYMM`` in file/band names as months (ODIAC file names).
        annual: Sum monthly bands to annual totals.
        co2: Convert carbon (``t C``) to CO2 (x 44/12).

    Returns:
        A :class:`MainInput`.

    Raises:
        UsageError: missing file, unknown variable, conflicting options.
        InputDataError: grids of the files differ, no CRS and no lat/lon, unknown unit in the
            file, an incomplete year with ``annual``, ...
    """
    import rasterio
    from rasterio.crs import CRS

    paths = expand_main(main)
    bands: list[BandSource] = []
    notes: list[str] = []
    ref: dict[str, Any] | None = None
    file_units: list[tuple[Path, str | None]] = []
    scales: list[tuple[float, float]] = []
    any_netcdf = False
    assumed = False
    for path in paths:
        if not path.exists():
            raise MissingInputError("file not found", path)
        if path.is_dir():
            raise UsageError("is a directory, expected a raster file", path)
        if _is_netcdf(path):
            any_netcdf = True
            dsname, _ = _netcdf_dataset(path, variable)
            with _quiet_gdal(path), rasterio.open(dsname) as ds:
                crs = ds.crs
                if crs is None:
                    if not _looks_lat_lon(ds):
                        raise InputDataError(
                            "no grid mapping and no CF lat/lon coordinates in degrees: the CRS is unknown", path
                        )
                    crs = CRS.from_epsg(4326)
                    assumed = True
                t = ds.transform
                if t.is_identity:
                    raise InputDataError(
                        "no georeferencing: GDAL did not recognise the x/y or lat/lon coordinate variables "
                        "(they need CF units or standard_name attributes)",
                        path,
                    )
                if t.b != 0 or t.d != 0 or t.a <= 0 or t.e == 0:
                    check_north_up(t, path)
                times = _cf_times(ds.tags(), ds.count, [ds.tags(b) for b in range(1, ds.count + 1)])
                periods = _periods_from_times(times, path) if times is not None else None
                names = _band_names(ds, path, periods, months)
                info = dict(crs=crs, transform=t, width=ds.width, height=ds.height, nodata=ds.nodata)
                file_units.append((path, _file_unit(ds)))
                for b in range(ds.count):
                    scales.append((float(ds.scales[b] or 1.0), float(ds.offsets[b] or 0.0)))
                    bands.append(BandSource(dsname, b + 1, names[b][1], names[b][0]))
        else:
            if variable:
                raise UsageError("--variable is for netCDF inputs", path)
            with open_raster(path, require_north_up=False) as ds:
                t = ds.transform
                if t.b != 0 or t.d != 0 or t.a <= 0 or t.e == 0:
                    check_north_up(t, path)
                names = _band_names(ds, path, None, months, default=read_years(ds))
                info = dict(crs=ds.crs, transform=t, width=ds.width, height=ds.height, nodata=ds.nodata)
                file_units.append((path, _file_unit(ds)))
                for b in range(ds.count):
                    scales.append((float(ds.scales[b] or 1.0), float(ds.offsets[b] or 0.0)))
                    bands.append(BandSource(str(path), b + 1, names[b][1], names[b][0]))
        if ref is None:
            ref = info
        else:
            _check_same_grid(ref, info, path, paths[0])
    assert ref is not None
    if assumed:
        notes.append("no grid mapping in the netCDF: its lat/lon coordinates were read as EPSG:4326 (WGS 84)")

    # Time order and unique names.
    if len(paths) > 1 or any(b.period.year is not None for b in bands):
        if len(paths) > 1 and any(b.period.year is None for b in bands):
            bad = next(b for b in bands if b.period.year is None)
            raise InputDataError(
                "several main files are stacked in time, but this one has no year or month in its name "
                "or bands (e.g. co2_2019-01.tif, or --months for YYMM names)",
                bad.dataset,
            )
        if any(b.period.year is not None for b in bands) and all(b.period.year is not None for b in bands):
            bands.sort(key=lambda b: (b.period.year, b.period.month or 0))
    names = [b.name for b in bands]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputDataError(f"two bands cover the same period {dup}; give each period once", main)

    # Units.
    unit_text, origin = _choose_unit(units, file_units)
    if origin == "file":
        notes.append(f"units {unit_text!r} read from the file (give --units to override)")

    parsed = None
    if unit_text is not None:
        try:
            parsed = parse_unit(unit_text)
        except UsageError as exc:
            if origin == "file":
                raise InputDataError(
                    f"units {unit_text!r} in the file are not understood ({exc.message}); give --units", paths[0]
                ) from None
            raise
    monthly = any(b.period.month for b in bands)
    if parsed is not None and parsed.time_s is not None and parsed.time_s < 0 and not all(b.period.month for b in bands):
        raise InputDataError(
            f"units {unit_text!r} are per month, but not every band is a month (name them 2019-01, ... "
            "or use --months for YYMM file names)",
            paths[0],
        )
    if annual and not monthly:
        raise UsageError("--annual sums monthly bands, but the main input has no monthly bands")
    species = parsed.species if parsed is not None else None
    if co2:
        if species is None or species.upper() not in ("C", "CO2"):
            raise UsageError(
                f"--co2 converts carbon to CO2, but the units {unit_text or 'totals'!r} do not say carbon; "
                "give e.g. --units 't C/cell/month'"
            )
        if species.upper() == "C":
            notes.append("carbon converted to CO2 (x 44/12)")
    out_species = "CO2" if co2 or parsed is None else (species or "")

    # Output periods.
    if annual:
        years = sorted({b.period.year for b in bands if b.period.month})
        groups: list[list[int]] = []
        for y in years:
            idx = [i for i, b in enumerate(bands) if b.period.year == y and b.period.month]
            got = {bands[i].period.month for i in idx}
            if len(got) != 12 or len(idx) != 12:
                missing = ", ".join(f"{y}-{m:02d}" for m in range(1, 13) if m not in got)
                raise InputDataError(f"--annual needs the 12 months of {y}; missing {missing}", main)
            groups.append(idx)
        if len(years) * 12 != len(bands):
            raise InputDataError("--annual: some bands are not months", main)
        out_names = [str(y) for y in years]
    else:
        groups = [[i] for i in range(len(bands))]
        out_names = names
    period_word = "month" if (monthly and not annual) else "yr"
    totals_unit = f"t {out_species} / cell / {period_word}".replace("t  /", "t /")
    if parsed is None:
        totals_unit = _TOTALS_DEFAULT if period_word == "yr" else "t CO2 / cell / month"
    needs = bool(
        any_netcdf or len(paths) > 1 or annual or co2 or ref["transform"].e > 0
        or (parsed is not None and origin == "file" and (parsed.is_density or parsed.time_s is not None and parsed.time_s < 0))
        or (parsed is not None and monthly and parsed.time_given)
        or any(s != (1.0, 0.0) for s in scales)
    )
    if not needs and parsed is not None and not parsed.is_density:
        totals_unit = parsed.text
    return MainInput(
        paths=paths, bands=bands, crs=ref["crs"], transform=ref["transform"], width=ref["width"],
        height=ref["height"], nodata=ref["nodata"], unit=unit_text, unit_origin=origin, co2=co2, annual=annual,
        needs_prepare=needs, out_names=out_names, out_groups=groups, totals_unit=totals_unit, notes=notes,
        scales=scales,
    )


def _band_names(ds: Any, path: Path, periods: list[Period] | None, months: bool,
                default: Sequence[str] | None = None) -> list[tuple[str, Period]]:
    """``(name, period)`` of every band: CF time, else descriptions/YEAR tags/file name."""
    n = ds.count
    if periods is not None:
        return [(p.label, p) for p in periods]
    descs = [(d or "").strip() for d in ds.descriptions]
    tags = [ds.tags(b) for b in range(1, n + 1)]
    out: list[tuple[str, Period]] = []
    for b in range(n):
        cand = [descs[b], str(tags[b].get("YEAR") or tags[b].get("year") or "")]
        if tags[b].get("MONTH") and cand[1]:
            cand.insert(0, f"{cand[1]}-{int(tags[b]['MONTH']):02d}")
        if n == 1:
            cand.append(path.stem)
        per = None
        for c in cand:
            if c:
                per = period_from_name(c, months=months)
                if per is not None:
                    break
        if per is not None:
            out.append((per.label, per))
        else:
            name = default[b] if default is not None else (descs[b] or f"band{b + 1}")
            out.append((name, Period()))
    return out


def _choose_unit(units: str | None, file_units: list[tuple[Path, str | None]]) -> tuple[str | None, str]:
    """``(unit text or None for default totals, origin)``."""
    if units is not None and str(units).strip() and str(units).strip().lower() not in ("auto",):
        text = str(units).strip()
        if text.lower() in ("totals", "total"):
            return None, "option"
        return text, "option"
    found = {u for _, u in file_units if u}
    if len(found) > 1:
        raise InputDataError(f"the main files have different units ({', '.join(sorted(found))}); give --units",
                             file_units[0][0])
    if found:
        return found.pop(), "file"
    return None, "default"


def _check_same_grid(ref: dict[str, Any], info: dict[str, Any], path: Path, first: Path) -> None:
    same = (
        ref["width"] == info["width"] and ref["height"] == info["height"]
        and ref["transform"].almost_equals(info["transform"]) and ref["crs"] == info["crs"]
    )
    if not same:
        raise InputDataError(f"grid differs from {first.name} (CRS, extent or cell size); main files must share one grid", path)
    nd0, nd1 = ref["nodata"], info["nodata"]
    if not (nd0 == nd1 or (nd0 is not None and nd1 is not None and math.isnan(nd0) and math.isnan(nd1))):
        raise InputDataError(f"nodata {nd1} differs from {nd0} in {first.name}", path)


