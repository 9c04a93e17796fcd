"""Raster access: open with one-line errors, header info, band checks, windowed reads and nodata masks.

Everything reads through rasterio windows; no function here reads a whole scene. Dataset objects are
never passed between processes (they cannot be pickled): pass the path and open inside.

GDAL read failures (a corrupt or cut-short file: `RasterioIOError: Read failed`, libtiff's
`TIFFReadEncodedStrip`...) become one-line SatdetErrors naming the file, where it failed and the fix
(`read_error`); anything read inside `open_raster` gets that for free.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

try:  # GDAL errors rasterio raises as they are (without its RasterioIOError wrapper)
    from rasterio._err import CPLE_BaseError
except ImportError:  # pragma: no cover - rasterio moved it
    CPLE_BaseError = RasterioIOError  # type: ignore[misc, assignment]

from pipeline.errors import SatdetError


def _is_remote(path: str | Path) -> bool:
    text = str(path)
    return "://" in text or text.startswith("/vsi")


@dataclass(frozen=True)
class RasterInfo:
    """Header facts of one raster (picklable, unlike a rasterio dataset)."""

    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs: str | None  # "EPSG:xxxx" where possible, else WKT; None when the file has no CRS
    transform: tuple[float, float, float, float, float, float]  # a, b, c, d, e, f (rasterio/affine order)
    nodata: float | None
    res: tuple[float, float]

    @property
    def stem(self) -> str:
        return Path(self.path.split("?")[0]).stem


READ_ERRORS: tuple[type[BaseException], ...] = (RasterioIOError, CPLE_BaseError)


def gdal_detail(err: BaseException) -> str:
    """The most specific line of a GDAL error: rasterio's 'Read failed' hides libtiff's reason in its causes."""
    lines: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = str(cur).strip()
        if text:
            lines.append(text.splitlines()[0])
        cur = cur.__cause__ or cur.__context__
    specific = [t for t in lines if not t.startswith(("Read failed", "Read or write failed"))]
    text = specific[-1] if specific else lines[0] if lines else err.__class__.__name__
    return text if len(text) <= 160 else text[:157] + "..."


def read_error(path: str | Path, err: BaseException, where: str | None = None) -> SatdetError:
    """One-line SatdetError for a failed pixel read of `path` (`where`: e.g. 'rows 64-95')."""
    at = f" at {where}" if where else ""
    return SatdetError(f"{path}: pixel read failed{at} ({gdal_detail(err)}); the file is corrupt or cut short "
                       f"(a partial download?): download it again and confirm with `gdalinfo -checksum {path}`")


@contextlib.contextmanager
def open_raster(path: str | Path) -> Iterator[Any]:
    """Open a raster for reading; missing or unreadable files raise a one-line SatdetError, and so does a
    GDAL read error anywhere inside the `with` block (`read_error`)."""
    if not _is_remote(path) and not Path(path).exists():
        raise SatdetError(f"{path}: image file not found; check tiling.scenes[].image (relative paths are "
                          "resolved against the config file's folder)")
    try:
        with warnings.catch_warnings():  # a scene in pixel coordinates is valid here: said where it matters
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(path)
    except READ_ERRORS as err:
        raise SatdetError(f"{path}: not a readable raster ({gdal_detail(err)}); give a GeoTIFF or another GDAL "
                          f"raster (if it is one, it is corrupt: download it again, check with `gdalinfo {path}`)"
                          ) from None
    try:
        yield ds
    except READ_ERRORS as err:
        raise read_error(path, err) from None
    finally:
        ds.close()


def crs_string(crs: Any) -> str | None:
    """A compact CRS text: 'EPSG:xxxx' when the CRS has a code, otherwise WKT; None for no CRS."""
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def info_from_dataset(ds: Any, path: str | Path) -> RasterInfo:
    t = ds.transform
    return RasterInfo(
        path=str(path),
        width=ds.width,
        height=ds.height,
        count=ds.count,
        dtype=ds.dtypes[0],
        crs=crs_string(ds.crs),
        transform=(t.a, t.b, t.c, t.d, t.e, t.f),
        nodata=None if ds.nodata is None else float(ds.nodata),
        res=(float(ds.res[0]), float(ds.res[1])),
    )


def raster_info(path: str | Path) -> RasterInfo:
    """Read only the header of `path`."""
    with open_raster(path) as ds:
        return info_from_dataset(ds, path)


def check_bands(bands: Sequence[int] | None, info: RasterInfo) -> list[int]:
    """Validate 1-based band indices against the raster; None means all bands."""
    if bands is None:
        return list(range(1, info.count + 1))
    bad = [b for b in bands if b < 1 or b > info.count]
    if bad:
        raise SatdetError(f"{info.path}: band index {bad[0]} out of range (the file has {info.count} bands, "
                          f"numbered 1..{info.count}); fix tiling.bands")
    return list(bands)


def read_window(ds: Any, window: Window, bands: Sequence[int]) -> np.ndarray:
    """Read `window` of `bands` as (C, H, W). Parts of the window outside the raster are not allowed here.
    A GDAL read error is a SatdetError naming the window."""
    try:
        return ds.read(list(bands), window=window)
    except READ_ERRORS as err:
        raise read_error(ds.name, err, window_text(window)) from None


def window_text(window: Window) -> str:
    """'window col 0, row 64, 160x32 px' — where a read failed, for error messages."""
    return (f"window col {int(window.col_off)}, row {int(window.row_off)}, "
            f"{int(window.width)}x{int(window.height)} px")


def nodata_mask(ds: Any, data: np.ndarray, window: Window, bands: Sequence[int]) -> np.ndarray | None:
    """Boolean (H, W) mask, True where a pixel is nodata; None when the raster marks no nodata at all.

    A pixel is nodata when every selected band equals the nodata value (or is NaN), or when the
    dataset's internal mask / alpha band says so; in float rasters also when any band is NaN or
    infinite (such a pixel must never reach the statistics or the model). `data` is the (C, H, W) block
    already read.
    """
    flags = ds.mask_flag_enums[0] if ds.count else ()
    names = {f.name for f in flags}
    mask: np.ndarray | None = None
    if ds.nodata is not None:
        nd = ds.nodata
        if np.isnan(nd):
            mask = np.all(np.isnan(data), axis=0)
        else:
            mask = np.all(data == np.asarray(nd, dtype=data.dtype), axis=0)
    elif names & {"per_dataset", "alpha"}:
        mask = ds.read_masks(bands[0], window=window) == 0
    if np.issubdtype(data.dtype, np.floating):
        bad = ~np.all(np.isfinite(data), axis=0)
        if bad.any():
            mask = bad if mask is None else mask | bad
    return mask


def check_raster(path: str | Path, progress: Callable[[int], None] | None = None,
                 max_bytes: int = 16 * 2**20) -> RasterInfo:
    """Decode every block of every band of `path` (and its internal mask), row band by row band; returns the
    header. A read failure is a one-line SatdetError naming the rows. `progress(rows)` after each read.

    Reads span whole block rows (each block decoded once) and at most about `max_bytes`, so memory stays
    flat for any scene size (a file stored as one huge strip is read in slices of it).
    """
    with open_raster(path) as ds:
        info = info_from_dataset(ds, path)
        block_h = max(1, ds.block_shapes[0][0] if ds.block_shapes else 1)
        row_bytes = max(1, ds.width * ds.count * np.dtype(info.dtype).itemsize)
        step = max(1, max_bytes // row_bytes)
        step = max(block_h, step // block_h * block_h) if block_h <= step else step
        per_dataset = bool(ds.count) and any(f.name == "per_dataset" for f in ds.mask_flag_enums[0])

        def read(row: int, rows: int) -> None:
            window = Window(0, row, ds.width, rows)
            ds.read(window=window)
            if per_dataset:
                ds.read_masks(1, window=window)

        for row in range(0, ds.height, step):
            rows = min(step, ds.height - row)
            try:
                read(row, rows)
            except READ_ERRORS as err:
                # name the first bad block row, not the whole read
                for sub in range(row, row + rows, min(rows, block_h)):
                    n = min(block_h, row + rows - sub)
                    try:
                        read(sub, n)
                    except READ_ERRORS as sub_err:
                        raise read_error(path, sub_err, f"rows {sub}-{sub + n - 1}") from None
                raise read_error(path, err, f"rows {row}-{row + rows - 1}") from None
            if progress is not None:
                progress(rows)
    return info


def exists_or_remote(path: str | Path) -> bool:
    return _is_remote(path) or os.path.exists(path)
