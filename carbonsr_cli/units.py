"""Cell areas and unit conversion between densities and totals per cell.

carbonsr works with **totals per cell** (e.g. t CO2 / cell / yr). Inputs given as densities
(fluxes such as EDGAR/ODIAC ``kg m-2 s-1``) are converted with the area of each cell:

- projected CRS: the nominal map area ``|a * e|`` of the geotransform, times the square of
  the CRS linear unit in metres (map units are taken at face value: the scale distortion of
  the projection, e.g. 0.9996 at a UTM central meridian, is ignored, as every GIS does);
- geographic CRS: the exact area on the CRS's ellipsoid of the cell bounded by two parallels
  and two meridians (closed form via the authalic latitude; checked against
  ``pyproj.Geod.polygon_area_perimeter`` in the tests). Areas depend only on latitude, so they
  are computed once per row and broadcast along the row.

Unit strings are space- or slash-separated factors with exponents, e.g. ``kg m-2 s-1``,
``g m-2 yr-1``, ``t km-2 yr-1``, ``t ha-1 yr-1``, ``kg/m2/s``, ``t/cell/yr``,
``t CO2 cell-1 yr-1`` (a species label such as CO2 is kept but does not change the value).
Mass: g, kg, t (= Mg, tonne), kt (= Gg), Mt (= Tg), Gt (= Pg). Area: m-2, km-2, ha-1, cell-1
(or no area: per cell). Time: s, min, h, d (day), yr (a, year); none means per year. A year
has 365.25 days (Julian year, 31 557 600 s) unless ``days_per_year`` is given (EDGAR, for
instance, uses the calendar year: 365 or 366).

Densities convert to ``t / cell / yr``; totals (per cell) pass through unchanged, in their
own unit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from carbonsr_cli.nodata import nodata_mask
from carbonsr_cli.errors import UsageError

__all__ = [
    "Unit",
    "parse_unit",
    "cell_areas_m2",
    "row_areas_m2",
    "to_totals",
    "from_totals",
    "totals_unit",
    "SECONDS_PER_DAY",
    "DEFAULT_DAYS_PER_YEAR",
    "CANONICAL_TOTALS",
    "MONTH",
    "CO2_PER_C",
]

#: Mass of CO2 per mass of carbon (44/12, molar masses rounded as in inventories).
CO2_PER_C = 44.0 / 12.0

SECONDS_PER_DAY = 86400.0
#: Marker for "per month" in :attr:`Unit.time_s` (the length depends on the month).
MONTH = -1.0
#: Julian year, used to turn per-second fluxes into annual totals unless told otherwise.
DEFAULT_DAYS_PER_YEAR = 365.25
#: Unit of converted densities.
CANONICAL_TOTALS = "t / cell / yr"

#: Mass units in tonnes (case-sensitive: Mg is a megagram = 1 t).
_MASS = {"g": 1e-6, "kg": 1e-3, "t": 1.0, "Mg": 1.0, "tonne": 1.0, "tonnes": 1.0, "ton": 1.0,
         "kt": 1e3, "Gg": 1e3, "Mt": 1e6, "Tg": 1e6, "Gt": 1e9, "Pg": 1e9}
#: Case-insensitive fallbacks that are unambiguous.
_MASS_LOWER = {"g": 1e-6, "kg": 1e-3, "t": 1.0, "tonne": 1.0, "tonnes": 1.0, "ton": 1.0, "kt": 1e3}
_LENGTH = {"m": 1.0, "km": 1e3}  # metres; appear with exponent -2 (area)
_AREA = {"ha": 1e4, "cell": None, "pixel": None, "gridcell": None}  # m2 (None: per cell); exponent -1
_TIME = {"s": 1.0, "sec": 1.0, "min": 60.0, "h": 3600.0, "hr": 3600.0, "d": SECONDS_PER_DAY,
         "day": SECONDS_PER_DAY, "yr": None, "a": None, "y": None, "year": None,  # None: one year
         "month": MONTH, "mon": MONTH, "mo": MONTH}  # MONTH: one calendar month (of the band)
#: Species labels allowed in unit strings (ignored in the conversion).
_SPECIES = {"co2", "c", "ch4", "n2o", "co2e", "co2eq", "co2-eq", "co", "nox", "so2", "pm2.5", "pm25", "pm10",
            "nh3", "ghg", "voc", "nmvoc", "bc", "oc", "fco2"}
_TOKEN = re.compile(r"^([A-Za-z]+)\^?([-+]?\d+)?$")


@dataclass(frozen=True)
class Unit:
    """A parsed value unit.

    Attributes:
        text: The unit string as given.
        mass_t: Tonnes per mass unit (e.g. 1e-3 for kg).
        area_m2: Square metres per area unit for densities (1 for m-2, 1e6 for km-2, 1e4 for
            ha-1), or None for totals per cell.
        time_s: Seconds per time unit, None for "per year" (or no time unit, see
            ``time_given``), or :data:`MONTH` for "per month".
        species: Species label found in the string (e.g. "CO2", "C"), or None.
        time_given: The string names a time unit (``t/cell/yr``); without one (``Tonnes``,
            ``t/cell``) values are totals over whatever period a band covers.
    """

    text: str
    mass_t: float
    area_m2: float | None
    time_s: float | None
    species: str | None = None
    time_given: bool = True

    @property
    def is_density(self) -> bool:
        """True if values are per area (need cell areas to become totals per cell)."""
        return self.area_m2 is not None

    def factor_to_t_per_m2_yr(self, days_per_year: float = DEFAULT_DAYS_PER_YEAR) -> float:
        """Multiplier from this density unit to ``t m-2 yr-1`` (densities only)."""
        if self.area_m2 is None:
            raise ValueError(f"{self.text!r} is not a density unit")
        if self.time_s == MONTH:
            raise ValueError(f"{self.text!r} is per month; convert it per band (carbonsr_cli.inventory)")
        per_year = 1.0 if self.time_s is None else days_per_year * SECONDS_PER_DAY / self.time_s
        return self.mass_t / self.area_m2 * per_year


def parse_unit(text: str) -> Unit:
    """Parse a unit string such as ``"kg m-2 s-1"`` or ``"t/cell/yr"``.

    Raises:
        UsageError: unknown or inconsistent unit (exit 2), with the accepted forms.
    """
    raw = text.strip()
    if not raw:
        raise UsageError("empty unit string")
    norm = _normalise(raw)
    # "kg/m2/s" -> ["kg", "/m2", "/s"]; "t / cell / yr" -> ["t", "/cell", "/yr"]
    spaced = re.sub(r"\s*/\s*", " /", norm)
    tokens = [t for t in spaced.replace("*", " ").replace("·", " ").split() if t]
    mass: float | None = None
    area: float | None = None
    area_seen = False
    time: float | None = None
    time_seen = False
    species: str | None = None
    for tok in tokens:
        inverse = tok.startswith("/")
        body = tok[1:] if inverse else tok
        if body.lower() in _SPECIES and not inverse:
            species = body
            continue
        m = _TOKEN.match(body)
        if not m:
            raise UsageError(_unit_help(raw, f"cannot read {body!r}"))
        sym, exp_s = m.group(1), m.group(2)
        exp = int(exp_s) if exp_s else 1
        if inverse:
            exp = -exp
        low = sym.lower()
        mass_value = _MASS.get(sym, _MASS_LOWER.get(low))
        if mass_value is not None:
            if exp != 1 or mass is not None:
                raise UsageError(_unit_help(raw, f"mass unit {body!r} must appear once, to the power 1"))
            mass = mass_value
        elif low in _LENGTH:
            if exp != -2 or area_seen:
                raise UsageError(_unit_help(raw, f"length {body!r} must be an area per unit, e.g. m-2 or /m2"))
            area, area_seen = _LENGTH[low] ** 2, True
        elif low in _AREA:
            if exp != -1 or area_seen:
                raise UsageError(_unit_help(raw, f"{body!r} must appear once, per unit (e.g. ha-1 or /cell)"))
            area, area_seen = _AREA[low], True
        elif low in _TIME:
            if exp != -1 or time_seen:
                raise UsageError(_unit_help(raw, f"time {body!r} must appear once, per unit (e.g. s-1 or /yr)"))
            time, time_seen = _TIME[low], True
        else:
            raise UsageError(_unit_help(raw, f"unknown unit {body!r}"))
    if mass is None:
        raise UsageError(_unit_help(raw, "no mass unit (g, kg, t, kt, Mt, ...)"))
    return Unit(raw, float(mass), area, time, species, time_seen)


#: Mass symbols that inventories glue to the species (``tC``, ``kgCO2``, ``MtC``).
_GLUED = re.compile(r"(?<![A-Za-z])(g|kg|t|kt|Mt|Gt|Tg|Gg|Pg|Mg)(CO2|C)(?![A-Za-z0-9])")


def _normalise(text: str) -> str:
    """Spell-out forms of inventory unit strings -> the short form ``parse_unit`` reads.

    ``"metric tonnes carbon km-2 year-1"`` -> ``"t C km-2 year-1"``; ``"tC/km2/yr"`` ->
    ``"t C/km2/yr"``; ``"ton substance / 0.1degree x 0.1degree / year"`` is not understood.
    """
    s = re.sub(r"\bmetric\s+", "", text, flags=re.IGNORECASE)
    s = re.sub(r"\b(tonnes|tonne|tons)\b", "t", s, flags=re.IGNORECASE)
    s = re.sub(r"\bcarbon\b", "C", s, flags=re.IGNORECASE)
    s = re.sub(r"\bper\s+", "/", s, flags=re.IGNORECASE)
    s = re.sub(r"\b(months)\b", "month", s, flags=re.IGNORECASE)
    s = re.sub(r"\b(years)\b", "year", s, flags=re.IGNORECASE)
    return _GLUED.sub(r"\1 \2", s)


def _unit_help(text: str, problem: str) -> str:
    return (
        f"unit {text!r}: {problem}; examples: 'kg m-2 s-1', 'g m-2 yr-1', 't km-2 yr-1', "
        "'t ha-1 yr-1', 't/cell/yr'"
    )


def totals_unit(unit: str | Unit) -> str:
    """Unit of the values :func:`to_totals` returns for ``unit``.

    Densities become ``"t / cell / yr"`` (with the species if given, e.g. ``"t CO2 / cell / yr"``);
    totals keep their own unit string.
    """
    u = parse_unit(unit) if isinstance(unit, str) else unit
    if not u.is_density:
        return u.text
    if u.time_s == MONTH:
        return f"t {u.species} / cell / month" if u.species else "t / cell / month"
    return f"t {u.species} / cell / yr" if u.species else CANONICAL_TOTALS


def _ellipsoid(crs: Any) -> tuple[float, float]:
    """Semi-major axis (m) and eccentricity of the CRS's ellipsoid (WGS84 if unknown)."""
    from pyproj import CRS as PCRS

    try:
        geod = PCRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs).get_geod()
    except Exception:  # noqa: BLE001
        geod = None
    if geod is None:
        from pyproj import Geod

        geod = Geod(ellps="WGS84")
    a, es = float(geod.a), float(geod.es)
    return a, math.sqrt(max(es, 0.0))


def _zone_area(lat_deg: np.ndarray, a: float, e: float) -> np.ndarray:
    """Area (m2) of the full 360-degree zone between the equator and ``lat_deg`` on the ellipsoid."""
    s = np.sin(np.radians(np.clip(lat_deg, -90.0, 90.0)))
    b2 = a * a * (1.0 - e * e)
    if e < 1e-12:
        return 2.0 * np.pi * a * a * s
    return np.pi * b2 * (s / (1.0 - e * e * s * s) + np.log((1.0 + e * s) / (1.0 - e * s)) / (2.0 * e))


def row_areas_m2(grid: Any, row_off: int, height: int) -> np.ndarray:
    """Cell area (m2) of each row ``row_off .. row_off + height`` of ``grid`` (all cols equal).

    Args:
        grid: ParentGrid or ChildGrid (anything with ``crs`` and north-up ``transform``).
        row_off: First row.
        height: Number of rows.

    Returns:
        float64 ``[height]``.
    """
    t = grid.transform
    crs = grid.crs
    rows = np.arange(row_off, row_off + height, dtype=np.float64)
    if crs.is_geographic:
        a, e = _ellipsoid(crs)
        lat_top = t.f + t.e * rows
        lat_bot = lat_top + t.e
        dlon = abs(t.a)
        return np.abs(_zone_area(lat_top, a, e) - _zone_area(lat_bot, a, e)) * (dlon / 360.0)
    unit = 1.0
    try:
        name, unit = crs.linear_units_factor
    except Exception:  # noqa: BLE001 - unknown linear unit: take metres
        unit = 1.0
    return np.full(height, abs(t.a * t.e) * float(unit) ** 2, dtype=np.float64)


def cell_areas_m2(grid: Any, window: Any = None) -> np.ndarray:
    """Cell areas in square metres over a window of ``grid``.

    Args:
        grid: ParentGrid or ChildGrid (a child cell has 1/factor^2 of its parent's area).
        window: ``rasterio.windows.Window`` (default: the whole grid).

    Returns:
        float64 ``[rows, cols]`` (geodesic per row for geographic CRSs, constant otherwise).
    """
    if window is None:
        c, r, w, h = 0, 0, grid.width, grid.height
    else:
        c, r = int(round(window.col_off)), int(round(window.row_off))
        w, h = int(round(window.width)), int(round(window.height))
    per_row = row_areas_m2(grid, r, h)
    return np.repeat(per_row[:, None], w, axis=1)


def _convert(values: np.ndarray, unit: str | Unit, areas_m2: np.ndarray | None, nodata: float | None,
             days_per_year: float, *, to_density: bool) -> np.ndarray:
    """Densities in ``unit`` -> totals per cell (or back with ``to_density``); totals units pass
    through as float64 copies; ``nodata`` cells are returned unchanged."""
    u = parse_unit(unit) if isinstance(unit, str) else unit
    v = np.asarray(values, dtype=np.float64)
    if not u.is_density:
        return v.copy()
    if areas_m2 is None:
        to = "to density unit" if to_density else "density unit"
        raise ValueError(f"cell areas are needed to convert {to} {u.text!r}")
    scale = u.factor_to_t_per_m2_yr(days_per_year) * np.asarray(areas_m2, dtype=np.float64)
    out = v / scale if to_density else v * scale
    if nodata is not None:
        m = nodata_mask(v, nodata)
        out[m] = v[m]
    return out


def to_totals(
    values: np.ndarray,
    unit: str | Unit,
    areas_m2: np.ndarray | None = None,
    *,
    nodata: float | None = None,
    days_per_year: float = DEFAULT_DAYS_PER_YEAR,
) -> np.ndarray:
    """Convert values in ``unit`` to totals per cell.

    Args:
        values: ``[..., rows, cols]`` values in ``unit``.
        unit: Unit string or parsed :class:`Unit`.
        areas_m2: ``[rows, cols]`` (or broadcastable) cell areas in m2; required for densities.
        nodata: Cells equal to this (NaN allowed) are returned unchanged.
        days_per_year: Days in a year for per-second/per-day fluxes (default 365.25).

    Returns:
        float64 totals per cell in :func:`totals_unit` (``t / cell / yr`` for densities); totals
        input is returned as float64 unchanged.
    """
    return _convert(values, unit, areas_m2, nodata, days_per_year, to_density=False)


def from_totals(
    totals: np.ndarray,
    unit: str | Unit,
    areas_m2: np.ndarray | None = None,
    *,
    nodata: float | None = None,
    days_per_year: float = DEFAULT_DAYS_PER_YEAR,
) -> np.ndarray:
    """Inverse of :func:`to_totals`: totals per cell back to ``unit`` (e.g. for child outputs).

    Args:
        totals: ``[..., rows, cols]`` totals per cell (``t / cell / yr`` for density units).
        unit: Target unit.
        areas_m2: Cell areas (m2) of the grid the totals live on (child areas for child output).
        nodata: Cells equal to this are returned unchanged.
        days_per_year: As in :func:`to_totals`.

    Returns:
        float64 values in ``unit``.
    """
    return _convert(totals, unit, areas_m2, nodata, days_per_year, to_density=True)
