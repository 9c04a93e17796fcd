"""The window reader of scene inference: batches of windows read ahead by a thread.

Memory is bounded regardless of scene size: the reader thread reads windows with rasterio (one window
per read) into a queue of at most two batches while the caller runs the model. A read error (corrupt
or cut-short file) arrives in the caller as one SatdetError naming the file and the window. Nodata
pixels of float scenes are handed on as a fill value (the training mean, 0 after normalisation), never
as NaN.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pipeline.predict.windows import Window

Batch = tuple[np.ndarray, np.ndarray, Sequence[Window]]  # images (B, H, W, C), nodata masks (B, H, W), windows


def nodata_fill(info: dict[str, Any], bands: list[int]) -> list[float]:
    """Raw per-band value for nodata pixels of float scenes: the training mean (0 after normalisation);
    0 when the model carries no statistics."""
    mean = (info.get("stats") or {}).get("mean")
    if mean is None or len(mean) != len(bands) or not np.all(np.isfinite(mean)):
        return [0.0] * len(bands)
    return [float(v) for v in mean]


def read_batches(path: str, windows: Sequence[Window], bands: list[int], batch: int,
                 fill: Sequence[float] | None = None) -> Iterator[Batch]:
    """(images, nodata masks, windows) per batch of `batch` windows, read ahead by a thread; its errors
    are raised here.

    Nodata pixels of float scenes (NaN, the nodata value, masked) get `fill` (per band; None: NaN, which
    `pipeline.data.stats.normalize` turns into the band mean); integer pixels are passed as read.
    """
    q: queue.Queue = queue.Queue(maxsize=2)  # at most two batches in flight: flat memory
    stop = threading.Event()
    t = threading.Thread(target=_read_into, args=(path, windows, bands, batch, fill, q, stop), daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


def _read_into(path: str, windows: Sequence[Window], bands: list[int], batch: int,
               fill: Sequence[float] | None, out: queue.Queue, stop: threading.Event) -> None:
    """Reader thread: each batch, then None; an error (a GDAL read error as a one-line SatdetError
    naming the window) is put on the queue for the caller to raise."""
    from pipeline.geo.raster import open_raster

    try:
        with open_raster(path) as ds:
            fill_col = (np.full((len(bands), 1), np.nan) if fill is None
                        else np.asarray(fill, np.float64).reshape(-1, 1))
            for k in range(0, len(windows), batch):
                if not _put(out, _read_batch(ds, windows[k:k + batch], bands, fill_col), stop):
                    return
        out.put(None)
    except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
        out.put(err)


def _read_batch(ds: Any, chunk: Sequence[Window], bands: list[int], fill_col: np.ndarray) -> Batch:
    """The pixels and nodata masks of one batch of windows."""
    from rasterio.windows import Window as RasterWindow

    from pipeline.geo.raster import nodata_mask, read_window

    floating = np.dtype(ds.dtypes[0]).kind == "f"
    # Windows are `size` square unless the region is smaller: then the window is the region itself, and
    # padding is left to the detector (the export pads after normalising).
    hh, ww = chunk[0].height, chunk[0].width
    images = np.zeros((len(chunk), hh, ww, len(bands)), ds.dtypes[0])
    masks = np.zeros((len(chunk), hh, ww), bool)
    for n, w in enumerate(chunk):
        win = RasterWindow(w.col, w.row, w.width, w.height)
        data = read_window(ds, win, bands)  # a read error names the file and the window
        m = nodata_mask(ds, data, win, bands)
        if floating and m is not None and m.any():
            data[:, m] = fill_col  # NaN never reaches the model
        images[n, :w.height, :w.width] = np.moveaxis(data, 0, -1)
        masks[n, :w.height, :w.width] = False if m is None else m
    return images, masks, chunk


def _put(out: queue.Queue, item: Batch, stop: threading.Event) -> bool:
    """Put `item` on the queue, waiting while it is full; False when the caller has stopped reading."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.2)
            break
        except queue.Full:
            continue
    return not stop.is_set()
