"""pipeline/predict/resolution.py: scenes predicted at the pixel size the model was trained at."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from pipeline.config import PredictConfig
from pipeline.predict.adapt import scene_detector
from pipeline.predict.resolution import (
    Resampled,
    pixel_size_m,
    resize_images,
    scene_scale,
    scene_window,
    training_pixel_size,
)
from pipeline.predict.scene import predict_region

from .fakes import SizedSquareDetector, write_scene_at

UTM = "EPSG:32617"


def _sorted(boxes):
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    return boxes[np.lexsort((boxes[:, 1], boxes[:, 0]))]


# --------------------------------------------------------------------------------------------- pixel sizes
def test_pixel_size_in_metres_only_for_projected_crs():
    assert pixel_size_m(UTM, (0.1, 0, 5e5, 0, -0.1, 4e6)) == pytest.approx(0.1)
    assert pixel_size_m(UTM, (0.3, 0, 5e5, 0, -0.2, 4e6)) == pytest.approx(0.25)  # mean of the two sides
    assert pixel_size_m("EPSG:2263", (1.0, 0, 0, 0, -1.0, 0)) == pytest.approx(0.3048, rel=1e-4)  # US feet
    assert pixel_size_m("EPSG:4326", (1e-6, 0, 0, 0, -1e-6, 0)) is None  # degrees: not a ground size
    assert pixel_size_m(None, (1, 0, 0, 0, -1, 0)) is None
    assert pixel_size_m("not a crs", (1, 0, 0, 0, -1, 0)) is None


def _manifest(tmp_path, tiles):
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tiles))
    return tmp_path


def test_training_pixel_size_reads_the_train_tiles_of_the_manifest(tmp_path):
    t01 = [0.1, 0, 5e5, 0, -0.1, 4e6]
    tiles = [{"scene": "a", "split": "train", "crs": UTM, "transform": t01},
             {"scene": "b", "split": "train", "crs": "EPSG:32612", "transform": t01},
             {"scene": "c", "split": "test", "crs": UTM, "transform": [0.5, 0, 0, 0, -0.5, 0]}]  # not trained on
    assert training_pixel_size(_manifest(tmp_path, tiles)) == pytest.approx(0.1)
    mixed = tiles + [{"scene": "d", "split": "train", "crs": UTM, "transform": [0.3, 0, 0, 0, -0.3, 0]}]
    assert training_pixel_size(_manifest(tmp_path, mixed)) is None  # no single training pixel size
    unreferenced = [{"scene": "a", "split": "train", "crs": None, "transform": [1, 0, 0, 0, 1, 0]}]
    assert training_pixel_size(_manifest(tmp_path, unreferenced)) is None
    assert training_pixel_size(tmp_path / "nowhere") is None


def test_scene_scale_and_window():
    info = {"pixel_size_m": 0.1}
    assert scene_scale(info, UTM, (0.2, 0, 0, 0, -0.2, 0)) == pytest.approx(2.0)
    assert scene_scale(info, UTM, (0.05, 0, 0, 0, -0.05, 0)) == pytest.approx(0.5)
    assert scene_scale(info, UTM, (0.108, 0, 0, 0, -0.108, 0)) == 1.0  # within the 10 % tolerance
    assert scene_scale({}, UTM, (0.2, 0, 0, 0, -0.2, 0)) == 1.0  # an export without a pixel size
    assert scene_scale(info, None, (0.2, 0, 0, 0, -0.2, 0)) == 1.0
    assert scene_window(400, 2.0) == 200 and scene_window(400, 0.5) == 800 and scene_window(400, 3.0) == 133


def test_resize_keeps_dtype_bands_and_values():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 65535, (2, 10, 12, 6), dtype=np.uint16)
    up = resize_images(img, (20, 24))
    assert up.shape == (2, 20, 24, 6) and up.dtype == np.uint16
    for band in range(6):  # every band resized alike, as OpenCV does one band
        expected = cv2.resize(img[1, :, :, band].astype(np.float32), (24, 20), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(up[1, :, :, band], np.rint(expected).astype(np.uint16))
    flat = np.full((1, 8, 8, 3), 77, np.uint8)
    down = resize_images(flat, (4, 4))
    assert down.dtype == np.uint8 and np.all(down == 77)
    blocks = np.kron(np.arange(4, dtype=np.float32).reshape(2, 2), np.ones((2, 2), np.float32))[None, :, :, None]
    np.testing.assert_array_equal(resize_images(blocks, (2, 2))[0, :, :, 0], [[0, 1], [2, 3]])  # area means


# --------------------------------------------------------------------------------------------- end to end
def test_a_coarser_scene_is_found_at_the_training_pixel_size(tmp_path):
    # 2 m squares: 20 px at the model's 0.1 m, 10 px in this 0.2 m scene (too small for the model)
    squares = [(10, 10, 20, 20), (40, 70, 50, 80), (95, 30, 105, 40)]
    path = write_scene_at(tmp_path / "coarse.tif", 120, 0.2, squares)
    det = SizedSquareDetector(tile_size=64)
    det.info["pixel_size_m"] = 0.1
    as_is = PredictConfig(overlap=16, score_threshold=0.1, normalize="train", match_resolution=False)
    assert len(predict_region(scene_detector(det, path, as_is), path, as_is)) == 0
    cfg = as_is.model_copy(update={"match_resolution": True})
    adapted = scene_detector(det, path, cfg)
    assert isinstance(adapted, Resampled) and adapted.scale == pytest.approx(2.0)
    det.batches.clear()
    out = predict_region(adapted, path, cfg)
    np.testing.assert_allclose(_sorted(out.boxes), _sorted(squares), atol=0.5)  # back in scene pixels
    assert {s[1:3] for s in det.batches} == {(64, 64)}  # 32 px scene windows, upsampled to the 64 px tile


def test_a_finer_scene_is_downsampled_and_tta_composes(tmp_path):
    # 2.5 m squares are 50 px at 0.05 m: beyond the detector's 16-40 px unless halved
    squares = [(20, 20, 70, 70), (120, 100, 170, 150)]
    path = write_scene_at(tmp_path / "fine.tif", 200, 0.05, squares)
    det = SizedSquareDetector(tile_size=64)
    det.info["pixel_size_m"] = 0.1
    cfg = PredictConfig(overlap=32, score_threshold=0.1, normalize="train", tta=True)
    adapted = scene_detector(det, path, cfg)
    assert adapted.scale == pytest.approx(0.5)
    out = predict_region(adapted, path, cfg)
    np.testing.assert_allclose(_sorted(out.boxes), _sorted(squares), atol=1.0)
    assert {s[1:3] for s in det.batches} == {(64, 64)}  # 128 px scene windows at half size
    assert out.windows == 3 * 3  # the overlap counts training pixels too: 64 scene px, columns 0, 64, 72


def test_scenes_at_the_training_pixel_size_or_without_one_are_untouched(tmp_path):
    path = write_scene_at(tmp_path / "same.tif", 64, 0.1, [(10, 10, 30, 30)])
    det = SizedSquareDetector(tile_size=64)
    det.info["pixel_size_m"] = 0.1
    cfg = PredictConfig(normalize="train")
    assert scene_detector(det, path, cfg) is det
    degrees = write_scene_at(tmp_path / "deg.tif", 64, 1e-6, [(10, 10, 30, 30)], crs="EPSG:4326")
    assert scene_detector(det, degrees, cfg) is det
    del det.info["pixel_size_m"]  # an export written before pixel sizes were stored
    assert scene_detector(det, write_scene_at(tmp_path / "c.tif", 64, 0.3, []), cfg) is det
