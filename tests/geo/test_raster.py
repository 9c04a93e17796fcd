import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from pipeline.errors import SatdetError
from pipeline.geo.raster import check_bands, nodata_mask, open_raster, raster_info
from pipeline.geo.synth import make_scene


def test_missing_image_is_a_one_line_error(tmp_path):
    with pytest.raises(SatdetError, match="missing.tif: image file not found") as err:
        raster_info(tmp_path / "missing.tif")
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_a_raster(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("this is not a GeoTIFF")
    with pytest.raises(SatdetError, match="notes.tif: not a readable raster"):
        raster_info(path)


def test_band_index_out_of_range(tmp_path):
    s = make_scene(tmp_path, "b", 64, 64, seed=0, n_objects=1)
    info = raster_info(s.image)
    assert check_bands([3, 1], info) == [3, 1]
    assert check_bands(None, info) == [1, 2, 3]
    with pytest.raises(SatdetError, match="band index 4 out of range .* 3 bands"):
        check_bands([1, 4], info)


def test_nodata_mask_marks_the_border(tmp_path):
    s = make_scene(tmp_path, "n", 128, 128, seed=0, n_objects=1, nodata_border=10)
    with open_raster(s.image) as ds:
        win = Window(0, 0, 128, 32)
        data = ds.read([1, 2, 3], window=win)
        mask = nodata_mask(ds, data, win, [1, 2, 3])
    assert mask[:10].all() and mask[:, :10].all() and mask[:, -10:].all()
    assert not mask[10:, 10:-10].any()


def test_no_nodata_means_no_mask(tmp_path):
    s = make_scene(tmp_path, "v", 64, 64, seed=0, n_objects=1)
    with rasterio.open(s.image) as ds:
        data = ds.read()
        assert nodata_mask(ds, data, Window(0, 0, 64, 64), [1, 2, 3]) is None
    assert np.all(data > 0)
