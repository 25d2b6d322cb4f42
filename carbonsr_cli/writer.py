"""Window-by-window GeoTIFF / COG writing, atomic (temp file + rename).

Output profile (see :func:`output_profile`): GTiff, internally tiled 512 x 512, DEFLATE
with predictor 3 for floats (2 for integers), ``BIGTIFF=IF_SAFER``, ``NUM_THREADS=ALL_CPUS``,
band interleave, one band per year (or month) with its description, nodata, band unit and
per-band time tags (``YEAR``, ``MONTH`` for monthly bands, ``CARBONSR_PERIOD``), and dataset
tags in one namespace: ``CARBONSR_*`` (units, factor, source, version and whatever the caller
adds) plus ``TIFFTAG_SOFTWARE`` / ``TIFFTAG_DATETIME``. ``creation_options`` (``--co``) are
passed to GDAL over the defaults; ``overviews`` builds average overviews in a plain GeoTIFF. While writing, GDAL's block
cache is limited to a few rows of 512-pixel blocks (see :meth:`RasterWriter.cache_bytes`), so
memory does not grow with the raster height.

With ``cog=True`` the data are first written to a temporary GTiff, then copied with GDAL's
COG driver (internal tiling 512, overviews with ``average`` resampling) to a second
temporary file, which is renamed to the destination. Nothing appears under the destination
name until the file is complete; any exception, Ctrl-C included, removes the temporaries.

Example:
    >>> with RasterWriter("out.tif", child_grid, count=3, nodata=-1.0,
    ...                   band_descriptions=["2019", "2020", "2021"],
    ...                   tags={"units": "t CO2 / cell / yr"}) as w:
    ...     for window, block in blocks:          # block: [3, h, w] float32
    ...         w.write(block, window)
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from carbonsr_cli import __version__
from carbonsr_cli.atomic import atomic_path, make_temp_path, remove_quietly
from carbonsr_cli.errors import OutputError, UsageError
from carbonsr_cli.grids import ChildGrid, window_ints
from carbonsr_cli.inventory import period_from_name

__all__ = ["RasterWriter", "output_profile", "COMPRESSIONS"]

#: Compression names accepted by ``--compress`` (GDAL names, case-insensitive).
COMPRESSIONS = ("deflate", "lzw", "zstd", "lerc", "none")

#: Internal tile edge in pixels.
BLOCK = 512


def output_profile(
    grid: Any,
    *,
    count: int,
    dtype: str = "float32",
    nodata: float | None = None,
    compress: str = "deflate",
) -> dict[str, Any]:
    """Creation profile of carbonsr outputs for ``grid``.

    Args:
        grid: Object with ``crs``, ``transform``, ``width``, ``height`` (ChildGrid or ParentGrid).
        count: Number of bands.
        dtype: numpy dtype name of the bands.
        nodata: Nodata value (None: not set).
        compress: One of :data:`COMPRESSIONS`.

    Returns:
        A dict for ``rasterio.open(path, "w", **profile)``.
    """
    comp = compress.lower()
    if comp not in COMPRESSIONS:
        raise UsageError(f"unknown compression {compress!r}; choose one of {', '.join(COMPRESSIONS)}")
    kind = np.dtype(dtype).kind
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": grid.width,
        "height": grid.height,
        "count": int(count),
        "dtype": np.dtype(dtype).name,
        "crs": grid.crs,
        "transform": grid.transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "interleave": "band",
        "BIGTIFF": "IF_SAFER",
        "NUM_THREADS": "ALL_CPUS",
    }
    if comp != "none":
        profile["compress"] = comp
        if comp in ("deflate", "lzw", "zstd"):
            profile["predictor"] = 3 if kind == "f" else 2
    return profile


class RasterWriter:
    """Context manager writing a raster window by window, atomically.

    Args:
        dest: Output path (``.tif``).
        grid: Target grid, normally a :class:`~carbonsr_cli.grids.ChildGrid` (a ParentGrid or
            any object with ``crs``, ``transform``, ``width``, ``height`` also works).
        count: Number of bands (years).
        dtype: Output dtype (``"float32"`` default, ``"float64"`` on request).
        nodata: Nodata value written in the file (None: unset).
        band_descriptions: One description per band (normally the year); default the grid's
            ``band_names`` when their number matches ``count``.
        tags: Extra dataset tags (strings); merged over the defaults.
        compress: ``deflate`` (default), ``lzw``, ``zstd``, ``lerc`` or ``none``.
        cog: Produce a Cloud Optimized GeoTIFF (GDAL COG driver, with overviews).
        overwrite: Replace an existing ``dest``.
        units: Value unit stored in the ``CARBONSR_UNITS`` tag (e.g. ``"t CO2 / cell / yr"``).
        source: Source file stored in the ``CARBONSR_SOURCE`` tag.
        band_units: Unit set on every band (what QGIS, ``rio info`` and rioxarray show);
            default the first part of ``units`` (before `` (``).
        band_tags: Extra per-band tags, one mapping per band; time tags (``YEAR``, ``MONTH``,
            ``CARBONSR_PERIOD``) are added from band descriptions that name a year or month.
        creation_options: GDAL creation options (``--co``), over the defaults (upper-case keys).
        overviews: Build overviews (average resampling, factors 2, 4, ...) in a plain GeoTIFF.
        read_room: Bytes of GDAL's block cache left for reads of this process while writing
            (see :meth:`cache_bytes`); None: the cache is at least 256 MiB.

    Raises:
        OutputError: dest exists without ``overwrite``; directory missing or not writable;
            disk full; GDAL write failure.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        grid: Any,
        *,
        count: int,
        dtype: str = "float32",
        nodata: float | None = None,
        band_descriptions: Sequence[str] | None = None,
        tags: Mapping[str, Any] | None = None,
        compress: str = "deflate",
        cog: bool = False,
        overwrite: bool = False,
        units: str | None = None,
        source: str | os.PathLike[str] | None = None,
        band_units: str | None = None,
        band_tags: Sequence[Mapping[str, Any]] | None = None,
        creation_options: Mapping[str, Any] | None = None,
        overviews: bool = False,
        read_room: int | None = None,
    ) -> None:
        self.dest = Path(dest)
        self.read_room = read_room
        self.grid = grid
        self.count = int(count)
        if self.count < 1:
            raise ValueError("count must be >= 1")
        self.dtype = np.dtype(dtype)
        self.nodata = nodata
        if band_descriptions is None:
            names = tuple(getattr(grid, "band_names", ()) or ())
            band_descriptions = names if len(names) == self.count else None
        if band_descriptions is not None and len(band_descriptions) != self.count:
            raise ValueError(f"{len(band_descriptions)} band descriptions for {self.count} bands")
        self.band_descriptions = list(band_descriptions) if band_descriptions is not None else None
        self.profile = output_profile(grid, count=self.count, dtype=self.dtype.name, nodata=nodata, compress=compress)
        self.creation_options = {str(k).upper(): str(v) for k, v in (creation_options or {}).items()}
        self.cog = bool(cog)
        if not self.cog:
            for key, val in self.creation_options.items():
                for old in [k for k in self.profile if k.upper() == key]:
                    del self.profile[old]
                self.profile[key.lower()] = val
        self.compress = compress.lower()
        self.overwrite = bool(overwrite)
        self.overviews = bool(overviews)
        import datetime

        all_tags: dict[str, str] = {
            "TIFFTAG_SOFTWARE": f"carbonsr {__version__}",
            "TIFFTAG_DATETIME": datetime.datetime.now().strftime("%Y:%m:%d %H:%M:%S"),
            "CARBONSR_VERSION": __version__,
        }
        if isinstance(grid, ChildGrid):
            all_tags["CARBONSR_FACTOR"] = str(grid.factor)
        if units is not None:
            all_tags["CARBONSR_UNITS"] = str(units)
        if source is not None:
            all_tags["CARBONSR_SOURCE"] = Path(str(source)).name
        for k, v in (tags or {}).items():
            all_tags[str(k)] = str(v)
        self.tags = all_tags
        if band_units is None and units is not None:
            band_units = str(units).split(" (")[0]
        self.band_units = band_units
        self.band_tags = [dict(_time_tags(d)) for d in (self.band_descriptions or [""] * self.count)]
        for i, extra in enumerate(band_tags or []):
            self.band_tags[i].update({str(k): str(v) for k, v in extra.items()})
        self._stack: contextlib.ExitStack | None = None
        self._ds: Any = None
        self._tmp: Path | None = None
        self._gtiff_tmp: Path | None = None

    # -- context manager -------------------------------------------------------------
    def __enter__(self) -> RasterWriter:
        import rasterio
        from rasterio.errors import RasterioError

        stack = contextlib.ExitStack()
        try:
            if "GDAL_CACHEMAX" not in os.environ:  # bound GDAL's block cache (default 5% of RAM)
                stack.enter_context(rasterio.Env(GDAL_CACHEMAX=self.cache_bytes()))
            self._tmp = stack.enter_context(atomic_path(self.dest, self.overwrite))
            target = self._tmp
            if self.cog:
                self._gtiff_tmp = make_temp_path(self.dest.absolute(), tag="gtiff")
                stack.callback(remove_quietly, self._gtiff_tmp)
                target = self._gtiff_tmp
            profile = dict(self.profile)
            try:
                self._ds = rasterio.open(target, "w", **profile)
            except RasterioError as exc:
                raise self._write_error(exc) from None
            if self.band_descriptions:
                for i, d in enumerate(self.band_descriptions, start=1):
                    self._ds.set_band_description(i, str(d))
            if self.tags:
                self._ds.update_tags(**self.tags)
            for i in range(1, self.count + 1):
                if self.band_units:
                    self._ds.set_band_unit(i, self.band_units)
                if self.band_tags[i - 1]:
                    self._ds.update_tags(i, **self.band_tags[i - 1])
        except BaseException:
            self._close_quietly()
            stack.__exit__(*_exc_info())
            raise
        self._stack = stack
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        stack, self._stack = self._stack, None
        assert stack is not None
        try:
            if exc_type is None:
                self._finish()
            else:
                self._close_quietly()
        except BaseException:
            stack.__exit__(*_exc_info())
            raise
        return bool(stack.__exit__(exc_type, exc, tb))

    # -- writing -----------------------------------------------------------------------
    def write(self, array: np.ndarray, window: Any) -> None:
        """Write ``array`` into ``window`` of the output.

        Args:
            array: ``[count, h, w]`` (or ``[h, w]`` when count is 1), any real dtype; cast to the
                output dtype.
            window: ``rasterio.windows.Window`` in cells of the output grid, inside the raster.
        """
        from rasterio.errors import RasterioError
        from rasterio.windows import Window

        if self._ds is None:
            raise RuntimeError("RasterWriter.write called outside its 'with' block")
        arr = np.asarray(array)
        if arr.ndim == 2:
            arr = arr[None]
        c, r, w, h = window_ints(window)
        if arr.shape != (self.count, h, w):
            raise ValueError(f"array shape {arr.shape} does not match window ({self.count}, {h}, {w})")
        if c < 0 or r < 0 or c + w > self.profile["width"] or r + h > self.profile["height"]:
            raise ValueError(f"window {window} extends past the {self.profile['height']}x{self.profile['width']} raster")
        if h == 0 or w == 0:
            return
        try:
            self._ds.write(arr.astype(self.dtype, copy=False), window=Window(c, r, w, h))
        except RasterioError as exc:
            raise self._write_error(exc) from None

    def cache_bytes(self) -> int:
        """GDAL block-cache size used while writing, in bytes.

        Three rows of 512-pixel blocks of every band (so that blocks filled by successive tile
        rows are compressed once, when complete) plus ``read_room`` for reads sharing the
        cache; without ``read_room``, at least 256 MiB (reads of aux layers in this process
        then keep their blocks between strips). Written blocks stay in the cache until it is
        full, so the cache is always used up to this size. Peak memory is therefore bounded by
        the raster width, not its height. Set ``GDAL_CACHEMAX`` to override.
        """
        width = -(-int(self.profile["width"]) // BLOCK) * BLOCK
        block_row = BLOCK * width * self.dtype.itemsize * self.count
        if self.read_room is not None:
            return int(3 * block_row + self.read_room)
        return int(max(256 * 2**20, 3 * block_row))

    @property
    def name(self) -> str:
        """Destination path as a string."""
        return str(self.dest)

    # -- internals -----------------------------------------------------------------------
    def _write_error(self, exc: BaseException) -> OutputError:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "space" in msg.lower() or getattr(exc, "errno", None) == errno.ENOSPC:
            return OutputError(f"disk full while writing ({msg[:160]})", self.dest)
        return OutputError(f"cannot write raster: {msg[:200]}", self.dest)

    def _close_quietly(self) -> None:
        ds, self._ds = self._ds, None
        if ds is not None:
            with contextlib.suppress(Exception):
                ds.close()

    def _finish(self) -> None:
        """Close (flush) the dataset; with ``cog``, translate the GTiff temp to COG."""
        from rasterio.errors import RasterioError

        ds, self._ds = self._ds, None
        try:
            ds.close()
        except RasterioError as exc:
            raise self._write_error(exc) from None
        except OSError as exc:
            raise self._write_error(exc) from None
        if self.cog:
            self._to_cog()
        elif self.overviews:
            self._build_overviews()

    def _build_overviews(self) -> None:
        """Average overviews (factors 2, 4, ... down to about 128 pixels) in the written GTiff."""
        import rasterio
        from rasterio.enums import Resampling
        from rasterio.errors import RasterioError

        assert self._tmp is not None
        w, h = int(self.profile["width"]), int(self.profile["height"])
        factors = []
        f = 2
        while max(w, h) / f >= 128 or not factors:
            factors.append(f)
            f *= 2
            if min(w, h) // f < 1:
                break
        try:
            with rasterio.open(self._tmp, "r+") as ds:
                ds.build_overviews(factors, Resampling.average)
                ds.update_tags(ns="rio_overview", resampling="average")
        except RasterioError as exc:
            raise self._write_error(exc) from None

    def _to_cog(self) -> None:
        import rasterio.shutil
        from rasterio.errors import RasterioError

        assert self._gtiff_tmp is not None and self._tmp is not None
        opts: dict[str, Any] = {
            "BLOCKSIZE": BLOCK,
            "OVERVIEWS": "AUTO",
            "OVERVIEW_RESAMPLING": "AVERAGE",
            "BIGTIFF": "IF_SAFER",
            "NUM_THREADS": "ALL_CPUS",
        }
        comp = self.compress
        opts["COMPRESS"] = "NONE" if comp == "none" else comp.upper()
        if comp in ("deflate", "lzw", "zstd"):
            opts["PREDICTOR"] = "YES"  # COG driver picks 2 or 3 from the data type
        opts.update(self.creation_options)
        remove_quietly(self._tmp)  # the COG driver creates the file itself
        try:
            rasterio.shutil.copy(str(self._gtiff_tmp), str(self._tmp), driver="COG", **opts)
        except RasterioError as exc:
            raise self._write_error(exc) from None
        remove_quietly(self._gtiff_tmp)


def _time_tags(name: str) -> dict[str, str]:
    """Per-band time tags of a band named like ``2019`` or ``2019-01`` (else none)."""

    text = str(name).strip()
    if not text:
        return {}
    per = period_from_name(text)
    if per is None or per.year is None or not text.startswith(per.label):
        return {}
    tags = {"YEAR": str(per.year), "CARBONSR_PERIOD": per.label}
    if per.month:
        tags["MONTH"] = str(per.month)
    return tags


def _exc_info() -> tuple[Any, Any, Any]:
    import sys

    return sys.exc_info()
