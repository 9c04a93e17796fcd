import numpy as np
import rasterio

from pipeline.geo.synth import make_scene


def test_same_seed_gives_identical_scene(tmp_path):
    a = make_scene(tmp_path / "a", "x", 128, 96, seed=7)
    b = make_scene(tmp_path / "b", "x", 128, 96, seed=7)
    with rasterio.open(a.image) as da, rasterio.open(b.image) as db:
        assert np.array_equal(da.read(), db.read())
    assert np.array_equal(a.boxes_px, b.boxes_px)
    assert np.array_equal(a.class_ids, b.class_ids)


def test_different_seed_moves_objects(tmp_path):
    a = make_scene(tmp_path, "a", 200, 200, seed=1)
    b = make_scene(tmp_path, "b", 200, 200, seed=2)
    assert not np.array_equal(a.boxes_px, b.boxes_px)


def test_scene_is_utm_with_all_classes_inside_the_valid_area(tmp_path):
    s = make_scene(tmp_path, "s", 240, 240, seed=0, n_objects=9, nodata_border=20)
    with rasterio.open(s.image) as ds:
        assert ds.crs.to_epsg() == 32633
        assert ds.nodata == 0
        img = ds.read()
    assert set(s.class_ids.tolist()) == {1, 2, 3}
    assert (s.boxes_px[:, :2] >= 20).all() and (s.boxes_px[:, 2:] <= 220).all()
    assert (img[:, :20, :] == 0).all() and (img[:, 20:220, 20:220] > 0).all()


def test_uint16_multiband(tmp_path):
    s = make_scene(tmp_path, "m", 64, 64, seed=0, dtype="uint16", bands=5)
    with rasterio.open(s.image) as ds:
        assert ds.count == 5 and ds.dtypes[0] == "uint16"
        assert ds.read().max() > 255
