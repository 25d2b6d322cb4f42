"""Opening user rasters with one-line errors that name the file.

Every raster carbonsr reads goes through :func:`open_raster`, so that the usual
problems of user data (missing file, a text file named ``.tif``, a truncated
download, no CRS, a rotated geotransform) surface as a
:class:`~carbonsr_cli.errors.CarbonSRError` with the path, never as a GDAL
traceback. Reads of windows go through :func:`read_window`, which turns GDAL
read errors (typically a truncated file discovered late) into
:class:`~carbonsr_cli.errors.InputDataError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from carbonsr_cli.errors import InputDataError, UsageError

from carbonsr_cli.errors import MissingInputError

if TYPE_CHECKING:
    from rasterio.io import DatasetReader
    from rasterio.windows import Window

__all__ = ["open_raster", "read_window", "read_years", "year_in_name", "check_north_up", "decode_threads_env"]

#: A 4-digit year (1900-2099) not embedded in a longer number.
_YEAR_RE = re.compile(r"(?<!\d)(19\d{2}|20\d{2})(?!\d)")


def decode_threads_env(threads: int | str = "ALL_CPUS") -> Any:
    """A ``rasterio.Env`` in which GDAL decodes the blocks of one read in parallel threads.

    ``GDAL_NUM_THREADS`` makes the GTiff driver (GDAL >= 3.6; older versions ignore it)
    decompress the blocks of a read that spans several blocks in parallel, e.g. a whole-raster
    warp or a band of rows of a DEFLATE file. The driver takes the option when the dataset is
    opened, so open the file inside this environment (rasterio sets config options per thread).
    A ``GDAL_NUM_THREADS`` environment variable wins.
    """
    import rasterio

    if "GDAL_NUM_THREADS" in os.environ:
        return rasterio.Env()
    return rasterio.Env(GDAL_NUM_THREADS=str(threads))


def _gdal_message(exc: BaseException) -> str:
    """First line of a GDAL error message, without the path repeated."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


class _Capture(logging.Filter):
    """Logging filter that swallows GDAL warnings and keeps them for the debug log."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003
        self.messages.append(record.getMessage())
        return False


@contextlib.contextmanager
def _quiet_gdal(path: Path) -> Iterator[None]:
    """Hold back GDAL warnings (e.g. on a truncated TIFF) while opening ``path``.

    The user gets one ``error:`` line instead; the GDAL messages go to the ``carbonsr`` debug
    log (``carbonsr -v``).
    """
    logger = logging.getLogger("rasterio._env")
    cap = _Capture()
    logger.addFilter(cap)
    try:
        yield
    finally:
        logger.removeFilter(cap)
        for msg in cap.messages:
            logging.getLogger("carbonsr").debug("GDAL while opening %s: %s", path, msg)


def check_north_up(transform: Any, path: str | os.PathLike[str] | None) -> None:
    """Reject rotated, sheared or south-up geotransforms.

    Args:
        transform: ``affine.Affine`` geotransform of the raster.
        path: File named in the error.

    Raises:
        InputDataError: if the transform has rotation/shear terms or a positive pixel height.
    """
    if transform.b != 0 or transform.d != 0:
        raise InputDataError(
            "rotated or sheared geotransform is not supported; make it north-up with "
            "gdalwarp (e.g. gdalwarp -t_srs <same CRS> in.tif out.tif)",
            path,
        )
    if transform.a <= 0 or transform.e >= 0:
        raise InputDataError(
            "geotransform is not north-up (pixel width must be > 0 and pixel height < 0); "
            "fix it with gdalwarp",
            path,
        )


def _check_not_truncated(ds: DatasetReader, path: Path) -> None:
    """Cheap truncation check of a GeoTIFF: the last data block must end inside the file.

    Reads the TIFF block offsets GDAL exposes in the ``TIFF`` metadata domain for the
    last block of the first and last band (no pixel data is read).
    """
    if ds.driver not in ("GTiff", "COG"):
        return
    try:
        size = path.stat().st_size
    except OSError:  # pragma: no cover - vanished between calls
        return
    bh, bw = ds.block_shapes[0]
    nby = -(-ds.height // bh)
    nbx = -(-ds.width // bw)
    bands = sorted({1, ds.count})
    blocks = {(nbx - 1, nby - 1), (0, 0)}
    for bidx in bands:
        for bx, by in blocks:
            try:
                off = ds.get_tag_item(f"BLOCK_OFFSET_{bx}_{by}", "TIFF", bidx=bidx)
                cnt = ds.get_tag_item(f"BLOCK_SIZE_{bx}_{by}", "TIFF", bidx=bidx)
            except Exception:  # noqa: BLE001 - metadata not available: rely on read errors
                return
            if not off or not cnt:
                continue  # sparse block (not written) or unknown
            end = int(off) + int(cnt)
            if end > size:
                raise InputDataError(
                    f"truncated or corrupt GeoTIFF: data extend to byte {end} but the file has "
                    f"{size} bytes; download or copy it again",
                    path,
                )


def open_raster(
    path: str | os.PathLike[str],
    *,
    require_crs: bool = True,
    require_north_up: bool = True,
) -> DatasetReader:
    """Open a raster for reading, with one-line errors naming the file.

    Args:
        path: Raster file (GeoTIFF or anything GDAL reads).
        require_crs: Reject rasters without a CRS (``InputDataError``).
        require_north_up: Reject rotated/sheared/south-up geotransforms (``InputDataError``);
            aux rasters read through a WarpedVRT may pass ``False``.

    Returns:
        An open ``rasterio.DatasetReader``; the caller closes it (use it as a context manager).

    Raises:
        MissingInputError: the file does not exist or is a directory (exit 1).
        InputDataError: not a raster, truncated/corrupt GeoTIFF, no CRS, rotated transform.
    """
    import rasterio
    from rasterio.errors import RasterioError

    p = Path(path)
    if not p.exists():
        raise MissingInputError("file not found", p)
    if p.is_dir():
        raise MissingInputError("is a directory, expected a raster file", p)
    if p.stat().st_size == 0:
        raise InputDataError("empty file (0 bytes), not a raster", p)
    with _quiet_gdal(p):
        try:
            ds = rasterio.open(p)
        except RasterioError as exc:
            msg = _gdal_message(exc)
            if "not recognized as a supported file format" in msg or "not recognized as being in a supported" in msg:
                raise InputDataError("not a raster file GDAL can read (is it really a GeoTIFF?)", p) from None
            raise InputDataError(f"cannot open raster (truncated or corrupt?): {msg}", p) from None
        try:
            _validate(ds, p, require_crs, require_north_up)
        except BaseException:
            ds.close()
            raise
    return ds


def _validate(ds: DatasetReader, p: Path, require_crs: bool, require_north_up: bool) -> None:
    """Checks of :func:`open_raster` on an open dataset."""
    if ds.count < 1:
        raise InputDataError("raster has no bands", p)
    if require_crs and ds.crs is None:
        raise InputDataError(
            "no CRS; assign one with gdal_edit.py -a_srs EPSG:<code> (e.g. EPSG:4326)", p
        )
    if require_north_up:
        check_north_up(ds.transform, p)
    _check_not_truncated(ds, p)


def read_window(
    ds: DatasetReader,
    window: Window | None = None,
    bands: int | Sequence[int] | None = None,
    *,
    boundless: bool = False,
    fill_value: float | None = None,
    out_dtype: Any = None,
) -> np.ndarray:
    """Read a window of a dataset, turning GDAL read errors into ``InputDataError``.

    Args:
        ds: Open dataset (from :func:`open_raster`).
        window: Pixel window; ``None`` reads everything.
        bands: 1-based band index or indexes; ``None`` reads all bands.
        boundless: Allow windows extending past the raster; outside is ``fill_value``
            (default the dataset nodata, else 0).
        fill_value: Value outside the raster when ``boundless``.
        out_dtype: Cast the result to this dtype.

    Returns:
        ``[bands, rows, cols]`` array (``[rows, cols]`` if ``bands`` is an int).

    Raises:
        InputDataError: the file is truncated or corrupt (GDAL read error).
    """
    from rasterio.errors import RasterioError

    indexes: int | list[int] = list(range(1, ds.count + 1)) if bands is None else (
        bands if isinstance(bands, int) else list(bands)
    )
    kwargs: dict[str, Any] = {"window": window}
    if boundless:
        kwargs["boundless"] = True
        kwargs["fill_value"] = fill_value if fill_value is not None else (ds.nodata if ds.nodata is not None else 0)
    if out_dtype is not None:
        kwargs["out_dtype"] = out_dtype
    try:
        with _quiet_gdal(Path(ds.name)):
            return ds.read(indexes, **kwargs)
    except RasterioError as exc:
        raise InputDataError(
            f"cannot read data (truncated or corrupt file?): {_gdal_message(exc)}", ds.name
        ) from None


def year_in_name(name: str) -> str | None:
    """The last 4-digit year (1900-2099) in ``name`` not embedded in a longer number, or None."""
    found = _YEAR_RE.findall(name)
    return found[-1] if found else None


def read_years(ds: DatasetReader) -> list[str]:
    """Names of the bands of a main raster, normally years.

    Rule, in order: the band descriptions (if every band has one and they are unique);
    else a per-band tag ``YEAR``/``year``; else, for a single-band file, a 4-digit year in
    the file name (``co2_2019.tif`` -> ``"2019"``); else ``"band1".."bandN"``.

    Args:
        ds: Open dataset.

    Returns:
        One name per band, unique.
    """
    n = ds.count
    descs = [d.strip() if d else "" for d in ds.descriptions]
    if all(descs) and len(set(descs)) == n:
        return descs
    tagged = []
    for b in range(1, n + 1):
        tags = ds.tags(b)
        tagged.append(str(tags.get("YEAR") or tags.get("year") or "").strip())
    if all(tagged) and len(set(tagged)) == n:
        return tagged
    if n == 1:
        year = year_in_name(Path(ds.name).stem)
        if year:
            return [year]
    return [f"band{k}" for k in range(1, n + 1)]
