"""pipeline/predict/adapt.py: scene statistics, the Keras detector, AdaBN, test-time flips."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from pipeline.config import ModelConfig, PredictConfig
from pipeline.data.stats import percentile_stats
from pipeline.errors import SatdetError
from pipeline.predict.adapt import FlipTTA, SceneAdapter, load_for_predict, scene_detector, scene_stats
from pipeline.predict.exported import load_detector
from pipeline.predict.merge import weighted_box_fusion
from pipeline.predict.scene import predict_region

from .fakes import BrightSquareDetector, write_scene

TILE = 64


def _write(path, img: np.ndarray, nodata=None):
    bands, height, width = img.shape
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=bands, dtype=img.dtype.name,
                       crs="EPSG:32617", transform=from_origin(440000, 3280000, 0.1, 0.1), nodata=nodata) as ds:
        ds.write(img)
    return path


def _stats(dtype: str, low, high, mean, std) -> dict:
    return {"dtype": dtype, "bands": [1, 2, 3], "channels": 3, "nodata": None, "tile_size": TILE,
            "percentiles": [1.0, 99.0], "low": low, "high": high, "mean": mean, "std": std}


def _export(tmp_path, backbone: str, stats: dict):
    from pipeline.model.detector import build_detector
    from pipeline.model.export import export_model

    cfg = ModelConfig(backbone=backbone, fpn_channels=16, head_dim=32, min_level=2, max_level=5,
                      anchor_sizes=[8, 16, 32, 64], rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100,
                      max_detections=40, score_threshold=0.0)
    model = build_detector(cfg, num_classes=1, bands=3)
    return export_model(model, stats, ["tree"], tmp_path / "export", tile_size=TILE)


def _sha(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _adapter(export) -> SceneAdapter:
    adapter = load_for_predict(export, PredictConfig(adapt_bn=True))
    assert isinstance(adapter, SceneAdapter)
    return adapter


def _rows(dets) -> np.ndarray:
    rows = np.column_stack([dets.scores, dets.boxes]).round(2)
    return rows[np.lexsort(rows.T[::-1])]


# --------------------------------------------------------------------------------------------- statistics
def test_scene_stats_match_numpy_on_the_valid_pixels_and_ignore_nodata(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(30, 220, (3, 150, 170), dtype=np.uint8)
    img[:, :40, :] = 0  # nodata strip: must not pull the low percentile down
    scene = _write(tmp_path / "s.tif", img, nodata=0)
    got = scene_stats(scene, [1, 2, 3], (1.0, 99.0), max_pixels=10**6, block=64)
    valid = img[:, 40:, :].reshape(3, -1).T
    low, high, mean, std = percentile_stats(valid, (1.0, 99.0))
    assert got["pixels_sampled"] == len(valid)
    np.testing.assert_allclose(got["low"], low)
    np.testing.assert_allclose(got["high"], high)
    np.testing.assert_allclose(got["mean"], mean)
    np.testing.assert_allclose(got["std"], std)
    assert min(got["low"]) >= 30


def test_scene_stats_keep_a_bounded_sample(tmp_path):
    img = np.random.default_rng(1).integers(0, 255, (3, 300, 300), dtype=np.uint8)
    scene = _write(tmp_path / "s.tif", img)
    got = scene_stats(scene, [1, 2, 3], (2.0, 98.0), max_pixels=5000, block=100)
    assert 5000 <= got["pixels_sampled"] <= 5000 + 9  # one rounding-up pixel per block at most
    np.testing.assert_allclose(got["mean"], img.reshape(3, -1).mean(1), rtol=0.05)


def test_scene_stats_of_an_all_nodata_scene_is_a_clear_error(tmp_path):
    scene = _write(tmp_path / "s.tif", np.zeros((3, 50, 50), np.uint8), nodata=0)
    with pytest.raises(SatdetError, match="no valid pixels"):
        scene_stats(scene, [1, 2, 3], (1.0, 99.0))


# --------------------------------------------------------------------------------------------- Keras detector
def test_keras_detector_reproduces_the_savedmodel_with_training_statistics(tmp_path):
    export = _export(tmp_path, "tiny", _stats("uint8", [5.0] * 3, [250.0] * 3, [100.0] * 3, [40.0] * 3))
    scene = write_scene(tmp_path / "s.tif", 150, 110, [(10, 10, 30, 30), (70, 40, 95, 60)])
    cfg = PredictConfig(score_threshold=0.0, overlap=16, normalize="train")
    plain = predict_region(load_for_predict(export, cfg), scene, cfg)
    assert not isinstance(load_for_predict(export, cfg), SceneAdapter)  # no adaptation: the SavedModel
    adapter = _adapter(export)
    keras_dets = predict_region(adapter.for_scene(scene, cfg), scene, cfg)
    assert len(plain) > 0 and len(keras_dets) == len(plain)
    np.testing.assert_allclose(keras_dets.boxes, plain.boxes, atol=1e-3)
    np.testing.assert_allclose(keras_dets.scores, plain.scores, atol=1e-5)


def test_scene_normalisation_makes_detections_blind_to_a_scene_wide_brightness_change(tmp_path):
    stats = _stats("float32", [0.0] * 3, [1000.0] * 3, [300.0] * 3, [150.0] * 3)
    export = _export(tmp_path, "tiny", stats)
    rng = np.random.default_rng(2)
    img = rng.normal(300, 80, (3, 120, 140)).astype(np.float32)
    img[:, 20:50, 30:60] += 400
    dim = _write(tmp_path / "dim.tif", img)
    bright = _write(tmp_path / "bright.tif", (img * 1.7 + 250).astype(np.float32))
    scene_cfg = PredictConfig(score_threshold=0.0, normalize="scene")
    base = load_for_predict(export, scene_cfg)  # the export's Keras model, normalising with scene statistics
    assert isinstance(base, SceneAdapter)
    a = predict_region(scene_detector(base, dim, scene_cfg), dim, scene_cfg)
    b = predict_region(scene_detector(base, bright, scene_cfg), bright, scene_cfg)
    assert len(a) > 0 and len(a) == len(b)
    rows_a, rows_b = _rows(a), _rows(b)  # order-free: equal scores may come out in either order
    np.testing.assert_allclose(rows_a, rows_b, atol=0.05)
    train_cfg = PredictConfig(score_threshold=0.0, normalize="train")  # the training statistics: the shift shows
    c = predict_region(scene_detector(base, bright, train_cfg), bright, train_cfg)
    assert len(c) != len(a) or not np.allclose(c.scores, a.scores, atol=1e-3)
    # any raw-pixel detector (here the SavedModel itself): the pixels are moved onto the training stretch
    saved = load_detector(export)
    d = predict_region(scene_detector(saved, bright, scene_cfg), bright, scene_cfg)
    np.testing.assert_allclose(_rows(d), rows_a, atol=0.05)


def test_a_model_trained_on_each_scenes_stretch_says_so_when_given_the_pooled_one(tmp_path, caplog):
    import json

    export = _export(tmp_path, "tiny", _stats("uint8", [5.0] * 3, [250.0] * 3, [100.0] * 3, [40.0] * 3))
    assert json.loads((export / "model_info.json").read_text())["training_normalize"] == "global"
    info = json.loads((export / "model_info.json").read_text())
    (export / "model_info.json").write_text(json.dumps({**info, "training_normalize": "scene"}))
    scene = _write(tmp_path / "s.tif", np.full((3, TILE, TILE), 90, np.uint8))
    detector = load_detector(export)
    with caplog.at_level("WARNING"):
        scene_detector(detector, scene, PredictConfig(normalize="train"))
    assert "trained on each scene's own stretch (data.normalize: scene)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        scene_detector(detector, scene, PredictConfig(normalize="scene"))
    assert "data.normalize" not in caplog.text


def test_adaptation_of_an_export_without_keras_weights(tmp_path):
    export = _export(tmp_path, "tiny", _stats("uint8", [5.0] * 3, [250.0] * 3, [100.0] * 3, [40.0] * 3))
    (export / "model.weights.h5").unlink()
    assert not isinstance(load_for_predict(export, PredictConfig(normalize="scene")), SceneAdapter)
    with pytest.raises(SatdetError, match="adapt_bn needs the export's Keras weights"):
        load_for_predict(export, PredictConfig(adapt_bn=True))


# --------------------------------------------------------------------------------------------- AdaBN
@pytest.fixture(scope="module")
def bn_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bn")
    return _export(tmp, "mobilenet_v3_large", _stats("uint8", [0.0] * 3, [255.0] * 3, [120.0] * 3, [60.0] * 3))


def test_adabn_sets_batchnorm_statistics_to_the_scene_windows_and_restores_them(tmp_path, bn_export):
    import keras

    before = _sha(bn_export)
    img = np.random.default_rng(3).integers(150, 256, (3, TILE, TILE), dtype=np.uint8)  # brighter than training
    scene = _write(tmp_path / "s.tif", img)
    adapter = _adapter(bn_export)
    first = adapter._bn[0]
    saved_mean = first.moving_mean.numpy().copy()
    cfg = PredictConfig(adapt_bn=True, score_threshold=0.0, normalize="train")
    adapter.for_scene(scene, cfg)
    # The first BN layer's statistics are exactly those of its input over the scene's single window.
    probe = keras.Model(adapter.model.backbone.input, first.input)
    x = (np.moveaxis(img, 0, -1)[None].astype(np.float32) - 120.0) / 60.0
    x = np.pad(x, ((0, 0), (0, 0), (0, 0), (0, 0)))  # 64 px: already a multiple of 32
    feats = probe(x, training=True).numpy().reshape(-1, first.moving_mean.shape[0])
    np.testing.assert_allclose(first.moving_mean.numpy(), feats.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(first.moving_variance.numpy(), feats.var(0), rtol=1e-3, atol=1e-4)
    assert not np.allclose(first.moving_mean.numpy(), saved_mean)
    adapter.for_scene(scene, PredictConfig(normalize="train"))  # no AdaBN for the next scene: the trained statistics are back
    np.testing.assert_array_equal(first.moving_mean.numpy(), saved_mean)
    assert _sha(bn_export) == before  # the export on disk is never touched


def test_adabn_averages_batch_statistics_over_all_windows(tmp_path, bn_export):
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (3, TILE, 3 * TILE), dtype=np.uint8)
    img[:, :, :TILE] //= 4  # one dark window, two bright ones
    scene = _write(tmp_path / "s.tif", img)
    adapter = _adapter(bn_export)
    cfg = PredictConfig(adapt_bn=True, overlap=0, batch_size=2, normalize="train")  # batches of 2 and 1 windows
    stats = adapter.info["stats"]
    seen = adapter.adapt_bn(scene, [1, 2, 3], stats, cfg)
    assert seen == 3
    pooled = adapter._bn[0].moving_mean.numpy().copy()
    per_window = []
    for k in range(3):
        one = _write(tmp_path / f"w{k}.tif", np.ascontiguousarray(img[:, :, k * TILE:(k + 1) * TILE]))
        adapter.adapt_bn(one, [1, 2, 3], stats, cfg)
        per_window.append(adapter._bn[0].moving_mean.numpy().copy())
    np.testing.assert_allclose(pooled, np.mean(per_window, axis=0), rtol=1e-4, atol=1e-5)


def test_adabn_sees_the_windows_at_the_training_pixel_size(tmp_path, bn_export):
    from pipeline.predict.resolution import resize_images

    img = np.random.default_rng(5).integers(0, 256, (3, TILE // 2, 3 * TILE // 2), dtype=np.uint8)
    with rasterio.open(tmp_path / "coarse.tif", "w", driver="GTiff", width=img.shape[2], height=img.shape[1],
                       count=3, dtype="uint8", crs="EPSG:32617", transform=from_origin(440000, 3280000, 0.2, 0.2)) as ds:
        ds.write(img)
    adapter = _adapter(bn_export)
    adapter.info["pixel_size_m"] = 0.1  # trained at 0.1 m: the 0.2 m scene is read as 32 px windows, upsampled
    cfg = PredictConfig(adapt_bn=True, overlap=0, normalize="train")
    assert adapter.adapt_bn(tmp_path / "coarse.tif", [1, 2, 3], adapter.info["stats"], cfg) == 3
    first = adapter._bn[0]
    probe = keras_probe(adapter, first)
    windows = np.stack([np.moveaxis(img[:, :, k * 32:(k + 1) * 32], 0, -1) for k in range(3)])
    x = (resize_images(windows, (TILE, TILE)).astype(np.float32) - 120.0) / 60.0
    feats = probe(x, training=True).numpy().reshape(-1, first.moving_mean.shape[0])
    np.testing.assert_allclose(first.moving_mean.numpy(), feats.mean(0), rtol=1e-3, atol=1e-4)
    assert adapter.adapt_bn(tmp_path / "coarse.tif", [1, 2, 3], adapter.info["stats"],
                            cfg.model_copy(update={"match_resolution": False})) == 2  # 64 px windows as they are


def keras_probe(adapter, layer):
    import keras

    return keras.Model(adapter.model.backbone.input, layer.input)


# --------------------------------------------------------------------------------------------- flips
def test_flip_tta_finds_the_same_boxes_and_averages_scores_over_views(tmp_path):
    squares = [(5, 8, 20, 30), (33, 40, 60, 55)]
    scene = write_scene(tmp_path / "s.tif", 64, 64, squares)
    cfg = PredictConfig(score_threshold=0.0, tta=True, normalize="train")
    base = BrightSquareDetector(tile_size=64)
    plain = predict_region(base, scene, PredictConfig(score_threshold=0.0))
    flipped = predict_region(scene_detector(base, scene, cfg), scene, cfg)
    np.testing.assert_allclose(np.sort(flipped.boxes, 0), np.sort(plain.boxes, 0), atol=1e-6)
    np.testing.assert_allclose(np.sort(flipped.scores), np.sort(plain.scores), atol=1e-6)
    assert len(base.batches) == 1 + 4  # four views of the one window


class _OneViewDetector(BrightSquareDetector):
    """Sees the squares only when the image is not flipped left-right (bright pixel in the top-left corner)."""

    def predict(self, images):
        out = super().predict(images)
        for i, img in enumerate(images):
            if img[0, 0, 2] != 255:
                out["num_detections"][i] = 0
        return out


def test_flip_tta_down_weights_a_box_seen_in_one_view(tmp_path):
    img = np.full((3, 64, 64), 20, np.uint8)
    img[0, 10:30, 10:30] = 200
    img[2, 0, 0] = 255  # the marker survives top-bottom flips only with its column: one view of four
    scene = _write(tmp_path / "s.tif", img)
    det = FlipTTA(_OneViewDetector(tile_size=64))
    out = det.predict(np.moveaxis(img, 0, -1)[None])
    assert out["num_detections"][0] == 1
    assert out["scores"][0, 0] == pytest.approx(200 / 255 / 4, rel=1e-5)
    assert scene.exists()


def test_wbf_with_n_models_scores_the_mean_over_views():
    boxes = np.array([[0, 0, 10, 10], [0.5, 0, 10.5, 10], [50, 50, 60, 60]], float)
    b, s, _ = weighted_box_fusion(boxes, np.array([0.8, 0.4, 0.6]), np.array([1, 1, 1]), 0.5, n_models=4)
    np.testing.assert_allclose(s, [0.3, 0.15])
    np.testing.assert_allclose(b[0], [0.5 / 3, 0, 10 + 0.5 / 3, 10])
