"""Corrupt and cut-short rasters: every GDAL read error is one SatdetError line naming the file and the rows."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from pipeline.errors import SatdetError
from pipeline.geo import strips
from pipeline.geo.check import check_rasters, describe
from pipeline.geo.raster import check_raster, open_raster, raster_info
from pipeline.geo.synth import make_scene


def _cut_short(path: Path, width: int = 96, height: int = 96, fraction: float = 0.6, **profile: object) -> Path:
    """A valid 3-band uint8 GeoTIFF truncated to `fraction` of its bytes (the header stays readable)."""
    data = np.random.default_rng(0).integers(0, 255, (3, height, width), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(0, 96, 1, 1), **profile) as ds:
        ds.write(data)
    with open(path, "r+b") as fh:
        fh.truncate(int(os.path.getsize(path) * fraction))
    return path


def _assert_one_line(err: SatdetError, path: Path) -> str:
    text = str(err)
    assert "\n" not in text and text.startswith(f"{path}: pixel read failed")
    assert "corrupt or cut short" in text and f"gdalinfo -checksum {path}" in text
    return text


def test_header_survives_truncation_but_reads_inside_open_raster_fail_in_one_line(tmp_path):
    path = _cut_short(tmp_path / "cut.tif", tiled=True, blockxsize=32, blockysize=32)
    assert raster_info(path).width == 96  # only the header is read: no error yet
    with pytest.raises(SatdetError) as err, open_raster(path) as ds:
        ds.read()
    assert "got" in _assert_one_line(err.value, path)  # libtiff's reason: "got N bytes, expected M"


def test_check_raster_names_the_first_bad_block_row(tmp_path):
    path = _cut_short(tmp_path / "strips.tif", blockysize=8)  # 12 strips of 8 rows
    seen: list[int] = []
    with pytest.raises(SatdetError) as err:
        check_raster(path, seen.append)
    text = _assert_one_line(err.value, path)
    first, last = (int(v) for v in text.split(" at rows ")[1].split(" ")[0].split("-"))
    assert first % 8 == 0 and last == first + 7 and 24 <= first < 96  # the strip where the file ends


def test_check_raster_reads_a_good_file_in_bounded_slices(tmp_path):
    s = make_scene(tmp_path, "ok", 64, 80, seed=0, n_objects=1)
    seen: list[int] = []
    info = check_raster(s.image, seen.append, max_bytes=64 * 3 * 16)  # 16 rows per read at most
    assert info.height == 80 and sum(seen) == 80 and max(seen) <= 16


def test_strip_reader_hands_the_read_error_to_the_consumer_as_one_line(tmp_path):
    path = _cut_short(tmp_path / "cut.tif", tiled=True, blockxsize=32, blockysize=32)
    with (rasterio.open(path) as ds, strips.StripReader(ds, [0, 32, 64], 32, [1, 2, 3], "uint8") as reader,
          pytest.raises(SatdetError) as err):
        list(reader)
    assert " at rows " in _assert_one_line(err.value, path)


def test_check_rasters_reports_every_file_and_never_raises(tmp_path):
    good = make_scene(tmp_path, "good", 64, 64, seed=0, n_objects=1).image
    cut = _cut_short(tmp_path / "cut.tif")
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"\x00" * 100)
    results = check_rasters([cut, good, junk, tmp_path / "gone.tif"], progress=False)
    assert [r.ok for r in results] == [False, True, False, False]
    assert results[0].info is not None and "pixel read failed at rows" in results[0].error
    assert "not a readable raster" in results[2].error and results[2].info is None
    assert "image file not found" in results[3].error
    assert describe(results[1].info) == "64x64 px, 3 bands uint8, EPSG:32633, nodata none"


def test_scene_statistics_of_a_cut_short_scene_fail_in_one_line(tmp_path):
    """Test-time normalisation reads the scene inside open_raster: the same one line, not a traceback."""
    from pipeline.predict.adapt import scene_stats

    path = _cut_short(tmp_path / "cut.tif")
    with pytest.raises(SatdetError) as err:
        scene_stats(path, [1, 2, 3], (1.0, 99.0))
    _assert_one_line(err.value, path)
