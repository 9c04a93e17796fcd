"""A scene read in row strips one tile high, and tiles cut from a strip.

`StripReader` is a thread that starts decoding at once (while the labels are read and the tiles chosen)
and stays up to LOOKAHEAD_BYTES ahead; reads end on block rows and rows shared with the previous strip are
copied, so every pixel is decoded once. Memory is bounded by the strip buffers, whatever the scene size.
A GDAL read error in the thread (a corrupt or cut-short file) reaches the consumer as one SatdetError
naming the file and the rows. Float nodata is written as NaN (normalisation makes it the band mean:
pipeline.data.stats).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, Self

import cv2
import numpy as np
from rasterio.windows import Window

from pipeline.geo.raster import READ_ERRORS, nodata_mask, read_error

Strip = tuple[int, np.ndarray, "np.ndarray | None"]
LOOKAHEAD_BYTES = 32 * 2**20  # strip buffers read ahead of the tile writer (at least 3): flat in scene size


class StripReader:
    """Strips (row_off, data (h, W, C), nodata mask (h, W) | None) of rows `rows[k]..+tile`, in order.

    A thread starts reading at once — while the caller still reads labels and picks tiles — and stays up to
    `LOOKAHEAD_BYTES` of strip buffers ahead; `want(rows)` (once the tiles are picked) makes it skip rows
    that hold no tile. GDAL decodes without the GIL, so reading overlaps the caller's Python work.

    Buffers are pixel-interleaved (the GeoTIFF's usual layout, so a tile is a cheap row-by-row copy rather
    than a band transpose); GDAL decodes into band planes that OpenCV interleaves (`_read_rows`). Reads end
    on block-row boundaries (a buffer holds up to one block row more than a strip), so no block is decoded
    twice, and rows already read for the previous strip are copied, not read again. A yielded strip stays
    valid until the iterator is advanced again. Close the reader (or use it as a context manager) so its
    thread stops.
    """

    def __init__(self, ds: Any, rows: list[int], tile: int, bands: list[int], dtype: str) -> None:
        self.ds, self.rows, self.tile, self.bands = ds, rows, tile, bands
        self.nan_fill = np.dtype(dtype).kind == "f"  # nodata pixels of float strips become NaN
        self.height, self.width = ds.height, ds.width
        block_h = ds.block_shapes[0][0] if ds.block_shapes else 1
        self.block_h = block_h if 1 < block_h <= tile else 1  # huge strips (untiled files): no alignment
        self.cap = min(self.height, tile + self.block_h - 1)
        nbytes = self.cap * self.width * len(bands) * np.dtype(dtype).itemsize
        n = max(3, min(16, LOOKAHEAD_BYTES // max(1, nbytes)))
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        for _ in range(n):
            self._free.put(np.empty((self.cap, self.width, len(bands)), dtype))
        # band planes the reader decodes into before interleaving (multi-band only)
        self._planes = np.empty((len(bands), self.cap, self.width), dtype) if len(bands) > 1 else None
        self._done: queue.Queue[Any] = queue.Queue()
        self._wanted: set[int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="strip-reader", daemon=True)
        self._thread.start()

    def want(self, rows: set[int]) -> None:
        """From now on read only strips starting at these rows."""
        self._wanted = set(rows)

    def _run(self) -> None:
        prev: tuple[int, int, np.ndarray] | None = None  # (first row, rows held, buffer) of the last strip
        where = ""
        try:
            for r in self.rows:
                buf = self._take()
                if buf is None:
                    return
                wanted = self._wanted  # checked once a buffer is held: `want` may come while waiting for one
                if wanted is not None and r not in wanted:
                    self._free.put(buf)
                    continue
                h = min(r + self.tile, self.height) - r
                end = min(self.height, -(-(r + h) // self.block_h) * self.block_h, r + self.cap)
                start = r
                if prev is not None and prev[0] <= r < prev[0] + prev[1]:  # rows already read: copy
                    keep = min(prev[0] + prev[1], end) - r
                    buf[:keep] = prev[2][r - prev[0]:r - prev[0] + keep]
                    start = r + keep
                where = f"rows {start}-{end - 1}"
                if start < end:
                    self._read_rows(start, end, buf[start - r:end - r])
                prev = (r, end - r, buf)
                data = buf[:h]
                where = f"rows {r}-{r + h - 1} (mask)"
                mask = nodata_mask(self.ds, data.transpose(2, 0, 1), Window(0, r, self.width, h), self.bands)
                if self.nan_fill and mask is not None:
                    data[mask] = np.nan  # float nodata is NaN in the tiles: normalisation makes it the band mean
                self._done.put((r, data, mask, buf))
            self._done.put(None)
        except READ_ERRORS as exc:  # a corrupt or cut-short file: one line naming the rows, not a traceback
            self._done.put(read_error(self.ds.name, exc, where))
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, raised there)
            self._done.put(exc)

    def _read_rows(self, start: int, end: int, out: np.ndarray) -> None:
        """Rows start..end into `out` (h, W, C). GDAL decodes a pixel-interleaved file fastest into band
        planes (one third less CPU than into a pixel-interleaved buffer, measured); OpenCV interleaves the
        planes (contiguous rows: a SIMD pass). One band, or a dtype OpenCV lacks: GDAL fills `out` itself."""
        window = Window(0, start, self.width, end - start)
        if self._planes is not None:
            planes = self._planes[:, :end - start]
            self.ds.read(self.bands, window=window, out=planes)
            try:
                merged = cv2.merge(list(planes), dst=out)
            except cv2.error:
                merged = None
            if merged is not None and np.shares_memory(merged, out):
                return
            self._planes = None  # this OpenCV cannot interleave the dtype: from now on GDAL does
        self.ds.read(self.bands, window=window, out=out.transpose(2, 0, 1))  # a (C, h, W) view, filled in place

    def _take(self) -> np.ndarray | None:
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def __iter__(self) -> Iterator[Strip]:
        held: np.ndarray | None = None
        while True:
            item = self._done.get()
            if held is not None:  # the caller is done with the previous strip: its buffer can be refilled
                self._free.put(held)
                held = None
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            r, data, mask, held = item
            yield r, data, mask

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cut_tile(data: np.ndarray, mask: np.ndarray | None, col: int, tile: int, fill: float
             ) -> tuple[np.ndarray, np.ndarray | None, float]:
    """(tile (tile, tile, C) — a view of the strip unless padded —, valid-pixel mask or None when every
    pixel is valid, nodata fraction). Only a scene smaller than a tile is padded, with `fill`."""
    h = data.shape[0]
    piece = data[:, col:col + tile]
    pw = piece.shape[1]
    if h == tile and pw == tile:
        if mask is None:
            return piece, None, 0.0
        valid = ~mask[:, col:col + tile]
        return piece, valid, 1.0 - float(np.count_nonzero(valid)) / (tile * tile)
    out = np.full((tile, tile, data.shape[2]), fill, dtype=data.dtype)
    out[:h, :pw] = piece
    valid = np.zeros((tile, tile), bool)
    valid[:h, :pw] = True if mask is None else ~mask[:, col:col + tile]
    return out, valid, 1.0 - float(np.count_nonzero(valid)) / (tile * tile)
