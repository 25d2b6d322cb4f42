"""Coverage of the aux layers over the parent extent: covered and nodata fractions on a decimated
sample grid, the fill value of each layer, and the error (or, with ``fill_missing``, the warning)
for a layer that does not cover the extent. Run once when a stack is built."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from carbonsr_cli.aux import cache
from carbonsr_cli.aux.sources import LayerCoverage, MIN_COVERAGE, SAMPLE_EDGE, _Slot
from carbonsr_cli.aux.warp import _subgrid
from carbonsr_cli.errors import AuxFillWarning, InputDataError
from carbonsr_cli.rasters import decode_threads_env, open_raster

if TYPE_CHECKING:
    from carbonsr_cli.aux.stack import AuxStack


__all__ = ["check_coverage"]


def sample_grid(stack: AuxStack) -> tuple[Any, int, int]:
    """Transform and shape of a decimated grid (<= SAMPLE_EDGE per side) over the extent."""
    g = stack.grid
    sw, sh = min(g.width, SAMPLE_EDGE), min(g.height, SAMPLE_EDGE)
    return _subgrid(g.transform, 0, 0, g.width / sw, g.height / sh), sw, sh


def covered_fraction(stack: AuxStack, crs: Any, bounds: tuple[float, float, float, float]) -> float:
    """Fraction of sample points of the extent inside ``bounds`` (given in ``crs``)."""
    from pyproj import CRS as ProjCRS
    from pyproj import Transformer

    if stack._sample_xy is None:
        t, sw, sh = sample_grid(stack)
        cols, rows = np.meshgrid(np.arange(sw) + 0.5, np.arange(sh) + 0.5)
        stack._sample_xy = (t.c + cols.ravel() * t.a, t.f + rows.ravel() * t.e)
    xs, ys = stack._sample_xy
    try:
        src_crs = ProjCRS.from_user_input(crs.to_wkt())
        dst = ProjCRS.from_user_input(stack.grid.crs.to_wkt())
        if src_crs == dst:
            tx, ty = xs, ys
        else:
            tx, ty = Transformer.from_crs(dst, src_crs, always_xy=True).transform(xs, ys, errcheck=False)
    except Exception:  # noqa: BLE001 - no transformation between the CRSs
        return 0.0
    tx, ty = np.asarray(tx), np.asarray(ty)
    left, bottom, right, top = bounds
    inside = np.isfinite(tx) & np.isfinite(ty) & (tx >= left) & (tx <= right) & (ty >= bottom) & (ty <= top)
    return float(inside.mean())


def coverage_samples(stack: AuxStack, by_source: Mapping[Path, list[_Slot]]) -> dict[Path, Any]:
    """Start reading every raster source on the decimated sample grid, one thread per file.

    The warp of a decimated grid still decompresses the whole source, ~1-2 s for a
    10,000 x 10,000 layer; the files are read in parallel (GDAL releases the GIL), each with
    multi-threaded block decoding (:func:`~carbonsr_cli.rasters.decode_threads_env`). Datasets
    are opened here, in this thread. Returns ``path -> Future`` of ``[bands, sh, sw]`` float64
    (NaN = nodata/outside); ``result()`` raises ``InputDataError`` for an unreadable file.
    """
    import concurrent.futures as cf

    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    t, sw, sh = sample_grid(stack)

    def sample(ds: Any, bands: list[int], path: Path) -> np.ndarray:
        kwargs: dict[str, Any] = {}
        if ds.nodata is not None:
            kwargs["src_nodata"] = ds.nodata
        try:
            with decode_threads_env(), WarpedVRT(
                ds, crs=stack.grid.crs, transform=t, width=sw, height=sh, resampling=Resampling.nearest,
                nodata=float("nan"), dtype="float64", **kwargs,
            ) as vrt:
                return vrt.read(bands)
        except Exception as exc:  # noqa: BLE001 - GDAL read/warp error
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise InputDataError(f"cannot read aux data (corrupt file?): {msg}", path) from None

    rasters = [(p, sl) for p, sl in by_source.items() if sl[0].source.kind != "vector"]
    out: dict[Path, Any] = {}
    if not rasters:
        return out

    params = (tuple(t)[:6], sw, sh, stack.grid.crs.to_wkt(), "nearest", "float64")

    def sample_and_keep(ds: Any, bands: list[int], path: Path, ident: Any) -> np.ndarray:
        arr = sample(ds, bands, path)
        cache.store_array("coverage", path, ident, (*params, tuple(bands)), arr)
        return arr

    with cf.ThreadPoolExecutor(max_workers=min(len(rasters), 8)) as ex:
        for path, sl in rasters:
            bands = sorted({s.entry.band for s in sl})
            ident = cache.file_identity(path)
            kept = cache.load_array("coverage", ident, (*params, tuple(bands)))
            if kept is not None and kept.shape == (len(bands), sh, sw) and kept.dtype == np.float64:
                done: cf.Future = cf.Future()  # the same file sampled on the same grid before
                done.set_result(kept)
                out[path] = done
                continue
            # A handle of its own: rasterio datasets are not thread-safe. An unreadable file
            # raises here, in order, after waiting for the samples already started.
            with decode_threads_env():  # GTiff reads the option when the file is opened
                own = open_raster(path, require_north_up=False)
            fut = ex.submit(sample_and_keep, own, bands, path, ident)
            fut.add_done_callback(lambda _f, d=own: d.close())
            out[path] = fut
    return out


def check_coverage(stack: AuxStack) -> None:
    from rasterio.crs import CRS

    slots = {id(s): s for g in stack._groups for s in [*g.by_year.values(), *([g.static] if g.static else [])]}
    by_source: dict[Path, list[_Slot]] = {}
    for s in slots.values():
        by_source.setdefault(s.source.path, []).append(s)
    used = {id(s) for g in stack._groups for s in g.per_t}
    samples = coverage_samples(stack, by_source)
    for path, sl in by_source.items():
        src = sl[0].source
        if src.kind == "vector":
            vcrs = CRS.from_user_input(src.crs.to_wkt())
            covered = covered_fraction(stack, vcrs, src.vector_bounds())
            if covered == 0.0:
                raise InputDataError(
                    f"does not overlap the main raster extent ({extent_text(stack)}); check both CRSs", path
                )
            for s in sl:
                s.fill = 0.0
                s.coverage = LayerCoverage(s.entry.group, str(path), s.entry.year, covered, 0.0, 0.0)
            continue
        ds = stack._dataset(path)
        covered = covered_fraction(stack, ds.crs, tuple(ds.bounds))
        if covered == 0.0:
            raise InputDataError(
                f"does not overlap the main raster extent ({extent_text(stack)}); aux bounds "
                f"{tuple(round(v, 6) for v in ds.bounds)} in {ds.crs.to_string()}; check both CRSs",
                path,
            )
        sample = samples[path].result()
        bands = sorted({s.entry.band for s in sl})
        for s in sl:
            arr = sample[bands.index(s.entry.band)]
            valid = np.isfinite(arr)
            if s.op == "classes":
                valid &= np.isin(arr, np.asarray(s.entry.classes, dtype=np.float64))
            nodata_frac = float(1.0 - valid.mean())
            if s.op == "value" and src.kind == "continuous":
                s.fill = float(arr[valid].mean()) if valid.any() else 0.0
            else:
                s.fill = 0.0
            s.coverage = LayerCoverage(s.entry.group, str(path), s.entry.year, covered, nodata_frac, s.fill)
            if id(s) not in used:
                continue
            problem = None
            if covered < MIN_COVERAGE:
                problem = f"covers only {covered:.1%} of the main raster extent"
            elif not valid.any():
                problem = f"aux layer {s.entry.group!r} is all nodata over the main raster extent"
            if problem is None:
                continue
            rule = "valid mean" if s.fill and s.op == "value" and src.kind == "continuous" else "0"
            if not stack.fill_missing:
                raise InputDataError(f"{problem}; pass --fill-missing to fill the gaps with {rule}", path)
            warnings.warn(
                f"{path}: {problem}; filling {nodata_frac:.1%} of the extent with {rule} ({s.fill:.6g})",
                AuxFillWarning,
                stacklevel=3,
            )


def extent_text(stack: AuxStack) -> str:
    b = stack.grid.bounds
    return f"main bounds {tuple(round(v, 6) for v in b)} in {stack.grid.crs.to_string()}"
