"""Raster access: open with one-line errors, header info, band checks, windowed reads and nodata masks.

Everything reads through rasterio windows; no function here reads a whole scene. Dataset objects are
never passed between processes (they cannot be pickled): pass the path and open inside.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

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


@contextlib.contextmanager
def open_raster(path: str | Path) -> Iterator[Any]:
    """Open a raster for reading; missing or unreadable files raise a one-line SatdetError."""
    if not _is_remote(path) and not Path(path).exists():
        raise SatdetError(f"{path}: image file not found; check tiling.scenes[].image (relative paths are "
                          "resolved against the config file's folder)")
    try:
        ds = rasterio.open(path)
    except RasterioIOError as err:
        raise SatdetError(f"{path}: not a readable raster ({str(err).splitlines()[0][:120]}); "
                          "give a GeoTIFF or another GDAL raster") from None
    try:
        yield ds
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
    """Read `window` of `bands` as (C, H, W). Parts of the window outside the raster are not allowed here."""
    return ds.read(list(bands), window=window)


def nodata_mask(ds: Any, data: np.ndarray, window: Window, bands: Sequence[int]) -> np.ndarray | None:
    """Boolean (H, W) mask, True where a pixel is nodata; None when the raster marks no nodata at all.

    A pixel is nodata when every selected band equals the nodata value (or is NaN), or when the
    dataset's internal mask / alpha band says so. `data` is the (C, H, W) block already read.
    """
    flags = ds.mask_flag_enums[0] if ds.count else ()
    names = {f.name for f in flags}
    if ds.nodata is not None:
        nd = ds.nodata
        if np.isnan(nd):
            return np.all(np.isnan(data), axis=0)
        return np.all(data == np.asarray(nd, dtype=data.dtype), axis=0)
    if names & {"per_dataset", "alpha"}:
        return ds.read_masks(bands[0], window=window) == 0
    if np.issubdtype(data.dtype, np.floating):
        nan = np.all(np.isnan(data), axis=0)
        return nan if nan.any() else None
    return None


def pixel_size_m(info: RasterInfo) -> float:
    """Pixel edge length in the CRS unit (metres for projected CRSs); used to convert metre tile sizes."""
    return float(abs(info.res[0]))


def exists_or_remote(path: str | Path) -> bool:
    return _is_remote(path) or os.path.exists(path)
