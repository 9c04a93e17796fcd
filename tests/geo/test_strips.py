"""The look-ahead strip reader: exact pixels whatever the block layout, skipping, bounded buffers, errors
raised in the caller, a clean stop when the caller gives up early."""

import threading

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from pipeline.geo import strips
from pipeline.geo.grid import tile_starts


def _raster(path, width=200, height=150, block=16, tiled=True):
    data = np.random.default_rng(0).integers(0, 255, (3, height, width), dtype=np.uint8)
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32633", "transform": from_origin(500000, 5000000, 0.3, 0.3), "compress": "deflate"}
    if tiled:
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return data


@pytest.mark.parametrize(("block", "tiled"), [(16, True), (48, True), (128, True), (1, False)])
def test_strips_hold_exactly_the_scene_rows(tmp_path, monkeypatch, block, tiled):
    monkeypatch.setattr(strips, "LOOKAHEAD_BYTES", 1)  # fewest buffers: every buffer is reused
    data = _raster(tmp_path / "s.tif", block=block, tiled=tiled)
    rows = tile_starts(150, 40, 8)  # strides of 32 rows, never on a 16/48/128-row block edge at the end
    with rasterio.open(tmp_path / "s.tif") as ds, strips.StripReader(ds, rows, 40, [1, 2, 3], "uint8") as reader:
        got = [(r, strip.copy(), mask) for r, strip, mask in reader]
    assert [r for r, _, _ in got] == rows
    for r, strip, mask in got:
        assert mask is None
        assert np.array_equal(strip, data[:, r:r + 40].transpose(1, 2, 0))


@pytest.mark.parametrize("merge", ["opencv", "no-opencv-merge", "merge-copies"])
def test_strips_are_exact_whether_opencv_interleaves_or_gdal_does(tmp_path, monkeypatch, merge):
    """Band planes are interleaved by OpenCV; when it cannot (an error for the dtype, or a result in a new
    array instead of the buffer) the reader falls back to GDAL filling the buffer itself, without loss."""
    data = _raster(tmp_path / "s.tif", block=48)
    if merge == "no-opencv-merge":
        def refuse(*a, **k):
            raise strips.cv2.error("unsupported format")
        monkeypatch.setattr(strips.cv2, "merge", refuse)
    elif merge == "merge-copies":
        monkeypatch.setattr(strips.cv2, "merge", lambda planes, dst=None: np.stack(planes, axis=-1))
    rows = tile_starts(150, 40, 8)
    with rasterio.open(tmp_path / "s.tif") as ds, strips.StripReader(ds, rows, 40, [1, 2, 3], "uint8") as reader:
        got = [(r, strip.copy()) for r, strip, _ in reader]
        assert (reader._planes is None) == (merge != "opencv")
    assert [r for r, _ in got] == rows
    for r, strip in got:
        assert np.array_equal(strip, data[:, r:r + 40].transpose(1, 2, 0))


def test_strips_skip_unwanted_rows_and_keep_band_order(tmp_path, monkeypatch):
    monkeypatch.setattr(strips, "LOOKAHEAD_BYTES", 1)  # 3 buffers: the thread waits after 3 strips
    data = _raster(tmp_path / "s.tif")
    rows = tile_starts(150, 40, 8)
    assert len(rows) == 5
    with rasterio.open(tmp_path / "s.tif") as ds:
        reader = strips.StripReader(ds, rows, 40, [3, 1], "uint8")
        reader.want({rows[-1]})
        with reader:
            got = {r: strip.copy() for r, strip, _ in reader}
        # up to 3 strips may be read before `want` lands; the 4th never is, the wanted last one is
        assert rows[-1] in got and rows[3] not in got
        for r, strip in got.items():
            assert np.array_equal(strip, ds.read([3, 1], window=Window(0, r, 200, 40)).transpose(1, 2, 0))
        assert np.array_equal(got[rows[-1]][..., 1], data[0, rows[-1]:rows[-1] + 40])


def test_a_read_error_reaches_the_caller(tmp_path):
    _raster(tmp_path / "s.tif")
    with (rasterio.open(tmp_path / "s.tif") as ds, strips.StripReader(ds, [0, 32], 40, [1, 9], "uint8") as reader,
          pytest.raises(Exception, match="9")):
        list(reader)


def test_closing_early_stops_the_reader_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(strips, "LOOKAHEAD_BYTES", 1)
    _raster(tmp_path / "s.tif", height=400)
    with rasterio.open(tmp_path / "s.tif") as ds:
        reader = strips.StripReader(ds, tile_starts(400, 40, 8), 40, [1, 2, 3], "uint8")
        next(iter(reader))  # the thread now waits for a free buffer
        reader.close()
        assert not reader._thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "strip-reader"]
