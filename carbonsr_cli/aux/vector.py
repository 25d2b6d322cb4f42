"""Vector aux layers rasterised onto child-grid windows.

Three families, chosen by geometry type:

- **Lines** -> length per child cell in metres (``<stem>:length``, plus ``<stem>:length:<class>``
  per value of a ``class``/``fclass``/``highway`` attribute). Lengths are *exact* up to floating
  point: every line segment is clipped to the window (Liang-Barsky), split at every grid line
  it crosses, and each piece's length goes to the cell that holds the piece's midpoint.
  Lengths are measured in the child CRS: projected CRSs in their linear unit times its metre
  factor (the map projection's scale error is not corrected); geographic CRSs with geodesic
  segment lengths on the WGS84 ellipsoid (pyproj ``Geod``), split along the segment in
  proportion to its angular length (exact for segments much shorter than the Earth's radius).
- **Polygons** -> cover fraction of each child cell in [0, 1] (``<stem>:cover``), by burning the
  union of polygons at 4 x 4 sub-cells per child cell and averaging (error <= 1/16 per cell at
  polygon edges, exact in the interior).
- **Points** -> number of points per child cell (``<stem>:count``), or with a numeric
  attribute (``--aux plants.gpkg:co2_t_yr``) the sum of its values over the points in each
  child cell (``<stem>:<attribute>``, in the attribute's unit; every point of a MultiPoint
  carries its feature's value; missing values count as 0).

Outside the vector data everything is 0 (no features means no roads), so a vector layer
never has nodata. All arrays are float32 ``[channels, h, w]`` on the child window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from affine import Affine

__all__ = ["CLASS_ATTRIBUTES", "VectorData", "rasterize_window", "clip_segments_to_grid"]

#: Attribute names (checked in this order, case-insensitive) whose values split line lengths into classes.
CLASS_ATTRIBUTES: tuple[str, ...] = ("class", "fclass", "highway")

#: Sub-cells per child-cell edge used for polygon cover fractions.
POLYGON_SUPERSAMPLE = 4


@dataclass
class VectorData:
    """Geometries of one vector file reprojected to the child CRS, with spatial indexes.

    Attributes:
        lines: LineString geometries (exploded) in the child CRS.
        line_class: Class index per line (``-1`` = no class kept), int32 ``[n_lines]``.
        seg: Segment endpoints ``[n_seg, 4]`` float64 ``(x0, y0, x1, y1)`` in child CRS units.
        seg_m: Metre length of every segment, float64 ``[n_seg]``.
        seg_start: First segment of each line, int64 ``[n_lines + 1]`` (CSR offsets).
        polygons: Polygon geometries in the child CRS.
        points: Point coordinates ``[n_points, 2]`` in child CRS units, sorted by y.
        classes: Kept line class values (strings), in channel order.
        point_values: Attribute value of every point (float64 ``[n_points]``, same order as
            ``points``; NaN replaced by 0), or None without a value attribute.
    """

    lines: np.ndarray
    line_class: np.ndarray
    seg: np.ndarray
    seg_m: np.ndarray
    seg_start: np.ndarray
    polygons: np.ndarray
    points: np.ndarray
    classes: tuple[str, ...]
    point_values: np.ndarray | None = None
    _line_tree: Any = field(default=None, repr=False)
    _poly_tree: Any = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        gdf: Any,
        crs: Any,
        classes: tuple[str, ...],
        class_attr: str | None,
        value_attr: str | None = None,
    ) -> VectorData:
        """Reproject a GeoDataFrame to ``crs`` and index its lines, polygons and points.

        Args:
            gdf: ``geopandas.GeoDataFrame`` with a CRS.
            crs: Child CRS (``rasterio.crs.CRS``).
            classes: Line class values to keep (others count only in the total length).
            class_attr: Column holding the class, or None.
            value_attr: Numeric column whose values the points carry (``point_sum``), or None.
        """
        import shapely

        g = gdf.to_crs(crs.to_wkt())
        g = g[~(g.geometry.isna() | g.geometry.is_empty)]
        g = g.explode(index_parts=False)
        geoms = np.asarray(g.geometry.values, dtype=object)
        gtype = shapely.get_type_id(geoms)
        # 1 LineString, 2 LinearRing, 3 Polygon, 0 Point (after explode)
        is_line = np.isin(gtype, (1, 2))
        is_poly = gtype == 3
        is_point = gtype == 0

        lines = geoms[is_line]
        if class_attr is not None and len(lines):
            values = g[class_attr].to_numpy()[is_line].astype(str)
            lookup = {c: i for i, c in enumerate(classes)}
            line_class = np.array([lookup.get(v, -1) for v in values], dtype=np.int32)
        else:
            line_class = np.full(len(lines), -1, dtype=np.int32)
        coords, idx = shapely.get_coordinates(lines, return_index=True) if len(lines) else (
            np.zeros((0, 2)),
            np.zeros(0, dtype=np.int64),
        )
        same = idx[1:] == idx[:-1] if len(idx) else np.zeros(0, dtype=bool)
        seg = np.concatenate([coords[:-1][same], coords[1:][same]], axis=1) if len(idx) else np.zeros((0, 4))
        seg_line = idx[:-1][same] if len(idx) else np.zeros(0, dtype=np.int64)
        seg_start = np.searchsorted(seg_line, np.arange(len(lines) + 1)).astype(np.int64)
        seg_m = _segment_metres(seg, crs)

        polygons = geoms[is_poly]
        points = shapely.get_coordinates(geoms[is_point]) if is_point.any() else np.zeros((0, 2))
        order = np.argsort(points[:, 1], kind="stable")  # sorted by y for window queries
        points = points[order]
        point_values = None
        if value_attr is not None:
            import pandas as pd

            vals = pd.to_numeric(g[value_attr], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            vals = vals[is_point][order] if is_point.any() else np.zeros(0)
            point_values = np.where(np.isfinite(vals), vals, 0.0)
        out = cls(
            lines=lines,
            line_class=line_class,
            seg=seg,
            seg_m=seg_m,
            seg_start=seg_start,
            polygons=polygons,
            points=points,
            classes=tuple(classes),
            point_values=point_values,
        )
        out._line_tree = shapely.STRtree(lines) if len(lines) else None
        out._poly_tree = shapely.STRtree(polygons) if len(polygons) else None
        return out

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the line index as envelopes, not geometries (reader processes get it faster).

        ``segments_in`` needs only which line envelopes meet a window; an STRtree of the
        envelope boxes answers that exactly as one of the lines does.
        """
        import shapely

        state = self.__dict__.copy()
        if self._line_tree is not None and len(self.lines):
            state["lines"] = np.asarray(shapely.bounds(self.lines), dtype=np.float64)  # [n, 4] envelopes
            state["_line_tree"] = "envelopes"
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import shapely

        if isinstance(state.get("_line_tree"), str):
            env = state["lines"]
            boxes = shapely.box(env[:, 0], env[:, 1], env[:, 2], env[:, 3])
            state["lines"] = boxes
            state["_line_tree"] = shapely.STRtree(boxes)
        self.__dict__.update(state)

    def segments_in(self, box: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Segments of lines whose envelope intersects ``box`` (a shapely geometry).

        Returns:
            ``(seg [n, 4], seg_m [n], class index [n])``.
        """
        if self._line_tree is None:
            return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int32)
        li = np.sort(self._line_tree.query(box))
        starts, ends = self.seg_start[li], self.seg_start[li + 1]
        counts = ends - starts
        total = int(counts.sum())
        local = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        sidx = np.repeat(starts, counts) + local
        return self.seg[sidx], self.seg_m[sidx], np.repeat(self.line_class[li], counts)


def _segment_metres(seg: np.ndarray, crs: Any) -> np.ndarray:
    """Length in metres of every segment ``[n, 4]`` given in ``crs`` units."""
    if len(seg) == 0:
        return np.zeros(0)
    if crs.is_geographic:
        from pyproj import Geod

        _, _, dist = Geod(ellps="WGS84").inv(seg[:, 0], seg[:, 1], seg[:, 2], seg[:, 3])
        return np.asarray(dist, dtype=np.float64)
    factor = 1.0
    try:
        factor = float(crs.linear_units_factor[1])
    except Exception:  # noqa: BLE001 - unknown unit: assume metres
        factor = 1.0
    return np.hypot(seg[:, 2] - seg[:, 0], seg[:, 3] - seg[:, 1]) * factor


def clip_segments_to_grid(
    cols0: np.ndarray,
    rows0: np.ndarray,
    cols1: np.ndarray,
    rows1: np.ndarray,
    height: int,
    width: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split segments (in fractional cell coordinates) into pieces, one per grid cell crossed.

    Segments are clipped to ``[0, width] x [0, height]`` and cut at every integer column
    and row they cross.

    Args:
        cols0, rows0, cols1, rows1: Segment endpoints in cell units of the window (float64 ``[n]``).
        height: Rows of the window.
        width: Columns of the window.

    Returns:
        ``(segment index, row, col, dt)`` of every piece: ``dt`` is the piece's share of its
        segment's parameter range [0, 1] (so piece length = dt * segment length).
    """
    n = len(cols0)
    if n == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, e, np.zeros(0)
    dc, dr = cols1 - cols0, rows1 - rows0
    t_in, t_out = np.zeros(n), np.ones(n)
    keep = np.ones(n, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        for p, q in ((-dc, cols0), (dc, width - cols0), (-dr, rows0), (dr, height - rows0)):
            zero = p == 0
            keep &= ~(zero & (q < 0))
            t = q / np.where(zero, 1.0, p)
            neg, pos = (p < 0) & ~zero, (p > 0) & ~zero
            t_in = np.where(neg, np.maximum(t_in, t), t_in)
            t_out = np.where(pos, np.minimum(t_out, t), t_out)
    keep &= t_out > t_in
    sel = np.nonzero(keep)[0]
    if len(sel) == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, e, np.zeros(0)
    c0, r0, dc, dr, t_in, t_out = cols0[sel], rows0[sel], dc[sel], dr[sel], t_in[sel], t_out[sel]
    ca, cb = c0 + t_in * dc, c0 + t_out * dc
    ra, rb = r0 + t_in * dr, r0 + t_out * dr

    def crossings(a: np.ndarray, b: np.ndarray, start: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        first = np.floor(lo) + 1
        count = np.maximum(np.ceil(hi) - first, 0).astype(np.int64)
        owner = np.repeat(np.arange(len(a)), count)
        local = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
        k = np.repeat(first, count) + local
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (k - np.repeat(start, count)) / np.repeat(delta, count)
        return owner, t

    ox, tx = crossings(ca, cb, c0, dc)
    oy, ty = crossings(ra, rb, r0, dr)
    m = len(sel)
    owner = np.concatenate([np.arange(m), np.arange(m), ox, oy])
    ts = np.concatenate([t_in, t_out, tx, ty])
    order = np.lexsort((ts, owner))
    owner, ts = owner[order], ts[order]
    same = owner[1:] == owner[:-1]
    seg_i = owner[:-1][same]
    t_a, t_b = ts[:-1][same], ts[1:][same]
    dt = t_b - t_a
    tm = 0.5 * (t_a + t_b)
    col = np.clip(np.floor(c0[seg_i] + tm * dc[seg_i]), 0, width - 1).astype(np.int64)
    row = np.clip(np.floor(r0[seg_i] + tm * dr[seg_i]), 0, height - 1).astype(np.int64)
    good = dt > 0
    return sel[seg_i[good]], row[good], col[good], dt[good]


def rasterize_window(
    data: VectorData,
    op: str,
    transform: Affine,
    height: int,
    width: int,
) -> np.ndarray:
    """Rasterise one vector family onto a child window.

    Args:
        data: Reprojected, indexed vector data.
        op: ``"line_length"`` (channels: total, then one per class), ``"polygon_cover"``,
            ``"point_count"`` or ``"point_sum"`` (one channel each).
        transform: Affine transform of the window's top-left child cell (north-up).
        height: Window rows.
        width: Window columns.

    Returns:
        float32 ``[channels, height, width]``: metres of line per cell, cover fraction in
        [0, 1], points per cell, or the sum of the points' values per cell.
    """
    import shapely

    left, top = transform.c, transform.f
    right, bottom = left + width * transform.a, top + height * transform.e
    box = shapely.box(min(left, right), min(top, bottom), max(left, right), max(top, bottom))
    a, e = transform.a, transform.e
    if op == "line_length":
        n_cls = len(data.classes)
        hw = height * width
        seg, seg_m, cls = data.segments_in(box)
        if len(seg) == 0:
            return np.zeros((1 + n_cls, height, width), dtype=np.float32)
        c0 = (seg[:, 0] - left) / a
        r0 = (seg[:, 1] - top) / e
        c1 = (seg[:, 2] - left) / a
        r1 = (seg[:, 3] - top) / e
        # Lines are selected by envelope: drop their segments that miss the window (the clip
        # would reject them too; the test is inclusive, so touching segments still go through).
        near = np.nonzero(
            (np.maximum(c0, c1) >= 0) & (np.minimum(c0, c1) <= width)
            & (np.maximum(r0, r1) >= 0) & (np.minimum(r0, r1) <= height)
        )[0]
        if len(near) < len(seg):
            c0, r0, c1, r1, seg_m, cls = c0[near], r0[near], c1[near], r1[near], seg_m[near], cls[near]
        si, row, col, dt = clip_segments_to_grid(c0, r0, c1, r1, height, width)
        length = dt * seg_m[si]
        cell = row * width + col
        k = cls[si]
        # float64 sums per channel (segments in order), stored as float32 one channel at a time:
        # the total, then each class; no (1 + classes) x cells float64 array at once.
        out = np.empty((1 + n_cls, height, width), dtype=np.float32)
        out[0] = np.bincount(cell, weights=length, minlength=hw).reshape(height, width)
        for i in range(n_cls):
            mine = k == i
            out[1 + i] = np.bincount(cell[mine], weights=length[mine], minlength=hw).reshape(height, width)
        return out
    if op == "polygon_cover":
        out = np.zeros((1, height, width), dtype=np.float32)
        if data._poly_tree is None:
            return out
        cand = data.polygons[data._poly_tree.query(box)]
        if len(cand) == 0:
            return out
        from affine import Affine
        from rasterio import features

        s = POLYGON_SUPERSAMPLE
        fine = features.rasterize(
            [(g, 1) for g in cand],
            out_shape=(height * s, width * s),
            transform=Affine(transform.a / s, 0.0, left, 0.0, transform.e / s, top),
            fill=0,
            dtype="uint8",
            all_touched=False,
        )
        out[0] = fine.reshape(height, s, width, s).mean(axis=(1, 3), dtype=np.float32)
        return out
    if op in ("point_count", "point_sum"):
        if op == "point_sum" and data.point_values is None:
            raise ValueError("point_sum needs VectorData built with a value attribute")
        out = np.zeros(height * width, dtype=np.float64)
        if len(data.points):
            lo, hi = np.searchsorted(data.points[:, 1], [min(top, bottom), max(top, bottom)], side="left")
            sl = slice(max(lo - 1, 0), hi + 1)
            pts = data.points[sl]
            col = np.floor((pts[:, 0] - left) / a)
            row = np.floor((pts[:, 1] - top) / e)
            ok = (col >= 0) & (col < width) & (row >= 0) & (row < height)
            cell = (row[ok] * width + col[ok]).astype(np.int64)
            weights = data.point_values[sl][ok] if op == "point_sum" else None
            out += np.bincount(cell, weights=weights, minlength=height * width)
        return out.reshape(1, height, width).astype(np.float32)
    raise ValueError(f"unknown vector op {op!r}")


def read_frame(path: Any) -> Any:
    """A vector file as a GeoDataFrame without empty geometries (the frame discovery reads).

    Raises:
        InputDataError: unreadable, no CRS, no geometries.
    """
    import geopandas as gpd

    from carbonsr_cli.errors import InputDataError

    try:
        gdf = gpd.read_file(path, engine="pyogrio")
    except Exception as exc:  # noqa: BLE001 - pyogrio/GDAL errors are varied
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputDataError(f"cannot read vector file: {msg}", path) from None
    if gdf.crs is None:
        raise InputDataError("vector file has no CRS; set one (e.g. ogr2ogr -a_srs EPSG:4326)", path)
    gdf = gdf[~(gdf.geometry.isna() | gdf.geometry.is_empty)]
    if len(gdf) == 0:
        raise InputDataError("vector file has no geometries", path)
    return gdf
