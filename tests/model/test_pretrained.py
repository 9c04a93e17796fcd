"""Pretrained backbones without any download: weights files written here, input mapping, frozen batch norm."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from pydantic import ValidationError

from pipeline.config import ModelConfig
from pipeline.data.stats import normalize_numpy
from pipeline.errors import SatdetError
from pipeline.model import backbone as backbone_module
from pipeline.model.backbone import PretrainedInput, build_backbone, input_affine

STATS3 = {"dtype": "uint8", "channels": 3, "low": [10.0, 20.0, 5.0], "high": [200.0, 230.0, 250.0],
          "mean": [90.0, 110.0, 100.0], "std": [40.0, 50.0, 60.0]}
STATS5 = {"dtype": "uint16", "channels": 5, "low": [10.0, 20.0, 5.0, 100.0, 0.0],
          "high": [200.0, 230.0, 250.0, 3000.0, 900.0], "mean": [90.0, 110.0, 100.0, 1500.0, 300.0],
          "std": [40.0, 50.0, 60.0, 700.0, 0.0]}  # band 5 constant: std 0 is divided by 1, as in normalize


def _app(name: str, **kwargs) -> keras.Model:
    if name == "resnet50":
        return keras.applications.ResNet50(input_shape=(None, None, 3), include_top=False, weights=None)
    app = keras.applications.MobileNetV3Small if name == "mobilenet_v3_small" else keras.applications.MobileNetV3Large
    return app(input_shape=(None, None, 3), include_top=False, weights=None,
               include_preprocessing=kwargs.get("include_preprocessing", False))


def _weights_file(name: str, path) -> dict[str, np.ndarray]:
    """Save a 3-band application with known, non-default values (batch norm included); return them by path."""
    app = _app(name)
    rng = np.random.default_rng(0)
    for w in app.weights:
        leaf = w.path.rsplit("/", 1)[-1]
        if leaf in ("gamma", "moving_variance"):
            w.assign(rng.uniform(0.8, 1.2, w.shape).astype(np.float32))
        elif leaf in ("beta", "moving_mean", "bias"):
            w.assign(rng.normal(0.0, 0.05, w.shape).astype(np.float32))
    app.save_weights(str(path))
    return {w.path: w.numpy() for w in app.weights}


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "resnet50.weights.h5"
    return path, _weights_file("resnet50", path)


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_large.weights.h5"
    return path, _weights_file("mobilenet_v3_large", path)


def _weights_by_path(model: keras.Model) -> dict[str, np.ndarray]:
    return {w.path: w.numpy() for w in model.weights if not w.path.startswith("pretrained_input/")}


def _batch_norms(model: keras.Model) -> list:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


# ------------------------------------------------------------------------------------------- weights files
def test_weights_file_loads_bit_exact(resnet_file):
    path, saved = resnet_file
    backbone = build_backbone("resnet50", 3, str(path))
    loaded = _weights_by_path(backbone)
    assert loaded.keys() == saved.keys()
    assert all(np.array_equal(loaded[k], saved[k]) for k in saved)
    outs = backbone(np.zeros((1, 64, 64, 3), np.float32))
    assert [o.shape[1] for o in outs] == [16, 8, 4, 2]


def test_mobilenet_small_weights_file_loads_bit_exact_with_stage_freezing(tmp_path):
    path = tmp_path / "mobilenet_v3_small.weights.h5"
    saved = _weights_file("mobilenet_v3_small", path)
    backbone = build_backbone("mobilenet_v3_small", 3, str(path), freeze_stages=2)
    loaded = _weights_by_path(backbone)
    assert loaded.keys() == saved.keys()
    assert all(np.array_equal(loaded[k], saved[k]) for k in saved)
    trainable = {layer.name for layer in backbone.layers if layer.trainable_weights}
    assert "expanded_conv_2_expand" not in trainable and "expanded_conv_3_expand" in trainable


def test_four_bands_adapt_the_first_convolution_and_copy_the_rest(mobilenet_file):
    path, saved = mobilenet_file
    backbone = build_backbone("mobilenet_v3_large", 4, str(path))
    loaded = _weights_by_path(backbone)
    rgb = saved["conv/kernel"]  # [3, 3, 3, 16]
    expected = np.repeat(rgb.mean(axis=2, keepdims=True), 4, axis=2) * (3.0 / 4.0)
    np.testing.assert_allclose(loaded["conv/kernel"], expected, rtol=1e-6)
    assert all(np.array_equal(loaded[k], saved[k]) for k in saved if k != "conv/kernel")
    outs = backbone(np.zeros((1, 64, 64, 4), np.float32))
    assert [o.shape[1] for o in outs] == [16, 8, 4, 2]


def test_missing_or_invalid_weights_file_is_a_one_line_error(tmp_path, mobilenet_file):
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    for weights, name, match in [
        (str(tmp_path / "absent.h5"), "resnet50", "weights file not found"),
        (str(junk), "resnet50", "not a resnet50 weights file"),
        (str(mobilenet_file[0]), "resnet50", "not a resnet50 weights file"),  # the wrong architecture
    ]:
        with pytest.raises(SatdetError, match=match) as err:
            build_backbone(name, 3, weights)
        assert "\n" not in str(err.value) and "model.weights" in str(err.value)


def test_failed_imagenet_download_is_a_one_line_error(monkeypatch):
    def offline(name, bands, weights, input_tensor=None):
        if weights == "imagenet":
            raise Exception("URL fetch failure on https://x/y.h5: None -- [Errno -3]\nmore")  # noqa: TRY002 - as keras
        raise AssertionError("only the download is attempted")

    monkeypatch.setattr(backbone_module, "_application", offline)
    with pytest.raises(SatdetError, match="KERAS_HOME") as err:
        build_backbone("resnet50", 3, "imagenet")
    assert "\n" not in str(err.value) and "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in str(err.value)


# ------------------------------------------------------------------------------------------- batch norm
def test_frozen_batch_norm_does_not_move_in_a_training_step(resnet_file):
    backbone = build_backbone("resnet50", 3, str(resnet_file[0]), bn_momentum=0.9)  # freeze_bn auto: frozen
    bns = _batch_norms(backbone)
    assert bns and not any(layer.trainable for layer in bns)
    trainable = {id(v) for v in backbone.trainable_variables}
    assert not any(id(w) in trainable for layer in bns for w in layer.weights)
    before = {w.path: w.numpy() for layer in bns for w in layer.weights}
    conv = backbone.get_layer("conv5_block3_3_conv").kernel
    conv_before = conv.numpy()

    images = tf.constant(np.random.default_rng(1).normal(3.0, 2.0, (2, 64, 64, 3)).astype(np.float32))
    optimizer = keras.optimizers.SGD(0.1)
    with tf.GradientTape() as tape:
        loss = tf.add_n([tf.reduce_mean(tf.square(o)) for o in backbone(images, training=True)])
    grads = tape.gradient(loss, backbone.trainable_variables)
    optimizer.apply_gradients(zip(grads, backbone.trainable_variables))

    assert np.isfinite(float(loss)) and not np.array_equal(conv.numpy(), conv_before)  # a real step
    assert all(np.array_equal(w.numpy(), before[w.path]) for layer in bns for w in layer.weights)
    # inference statistics even when called with training=True
    np.testing.assert_allclose(backbone(images, training=True)[-1], backbone(images, training=False)[-1],
                               rtol=1e-5, atol=1e-5)


def test_freeze_bn_false_keeps_pretrained_batch_norm_trainable(mobilenet_file):
    backbone = build_backbone("mobilenet_v3_large", 3, str(mobilenet_file[0]), freeze_bn=False)
    assert all(layer.trainable for layer in _batch_norms(backbone))


# ------------------------------------------------------------------------------------------- freeze_stages
def test_freeze_stages_freezes_the_resnet_stem_and_first_stages(resnet_file):
    backbone = build_backbone("resnet50", 3, str(resnet_file[0]), freeze_bn=False, freeze_stages=2)
    weighted = [layer for layer in backbone.layers if layer.weights and not isinstance(layer, PretrainedInput)]
    frozen = {layer.name for layer in weighted if not layer.trainable}
    assert frozen == {layer.name for layer in weighted if layer.name.startswith(("conv1_", "conv2_", "conv3_"))}
    assert "conv3_block4_3_bn" in frozen and "conv4_block1_1_conv" not in frozen


def test_freeze_stages_groups_mobilenet_blocks_by_stride(mobilenet_file):
    backbone = build_backbone("mobilenet_v3_large", 3, str(mobilenet_file[0]), freeze_bn=False, freeze_stages=1)
    weighted = [layer for layer in backbone.layers if layer.weights and not isinstance(layer, PretrainedInput)]
    frozen = {layer.name for layer in weighted if not layer.trainable}
    # stem conv and block 0 (stride 2), then blocks 1-2 (stride 4); block 3 starts the stride-8 stage
    stem_and_first = re.compile(r"conv$|conv_bn$|expanded_conv_(depthwise|project)|expanded_conv_[12]_")
    assert frozen == {layer.name for layer in weighted if stem_and_first.match(layer.name)}
    assert "expanded_conv_2_project_bn" in frozen and "expanded_conv_3_expand" not in frozen

    everything = build_backbone("mobilenet_v3_large", 3, str(mobilenet_file[0]), freeze_stages=4)
    assert everything.trainable_variables == []


def test_config_defaults_leave_random_backbones_as_they_were():
    cfg = ModelConfig()
    assert (cfg.weights, cfg.freeze_bn, cfg.freeze_stages, cfg.pretrained_input) == ("none", None, 0, None)
    with pytest.raises(ValidationError, match="freeze_stages"):
        ModelConfig(weights="imagenet", freeze_stages=5)


# ------------------------------------------------------------------------------------------- input mapping
def _stretch(raw: np.ndarray, stats: dict) -> np.ndarray:
    low, high = np.asarray(stats["low"], np.float32), np.asarray(stats["high"], np.float32)
    return 255.0 * (np.clip(raw, low, high) - low) / np.where(high > low, high - low, 1.0)


def test_resnet_input_matches_keras_preprocess_input_on_the_same_0_255_image():
    raw = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 3)).astype(np.float32)
    raw[0, 0, 0] = [10, 230, 128]  # a known pixel: band 1 at low, band 2 at high
    layer = PretrainedInput(*input_affine("resnet50", 3, STATS3))
    got = np.asarray(layer(normalize_numpy(raw, STATS3)))
    expected = keras.applications.resnet50.preprocess_input(_stretch(raw, STATS3).copy())
    np.testing.assert_allclose(got, expected, atol=1e-3)
    np.testing.assert_allclose(got[0, 0, 0], [255 * 123 / 245 - 103.939, 255 - 116.779, 0 - 123.68], atol=1e-3)


def test_resnet_input_with_five_bands_uses_rgb_means_then_their_mean():
    raw = np.random.default_rng(3).uniform(0, 3000, (1, 4, 4, 5)).astype(np.float32)
    got = np.asarray(PretrainedInput(*input_affine("resnet50", 5, STATS5))(normalize_numpy(raw, STATS5)))
    v = _stretch(raw, STATS5)
    np.testing.assert_allclose(got[..., :3], keras.applications.resnet50.preprocess_input(v[..., :3].copy()),
                               atol=1e-3)
    np.testing.assert_allclose(got[..., 3:], v[..., 3:] - np.mean([103.939, 116.779, 123.68]), atol=1e-3)


def test_mobilenet_input_matches_its_own_rescaling_layer():
    rescaling = next(layer for layer in _app("mobilenet_v3_large", include_preprocessing=True).layers
                     if isinstance(layer, keras.layers.Rescaling))
    for stats in (STATS3, STATS5):
        bands = stats["channels"]
        raw = np.random.default_rng(bands).uniform(0, 3000 if bands == 5 else 255, (1, 4, 4, bands))
        raw = raw.astype(np.float32)
        got = PretrainedInput(*input_affine("mobilenet_v3_large", bands, stats))(normalize_numpy(raw, stats))
        expected = rescaling(_stretch(raw, stats))
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_without_stats_z_scores_land_on_the_imagenet_mean_and_std():
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    z = np.array([[[[0.0, 0.0, 0.0]], [[1.0, -1.0, 2.0]]]], np.float32)  # [1, 2, 1, 3]
    expected_rgb = 255.0 * (mean + z * std)
    mobile = PretrainedInput(*input_affine("mobilenet_v3_large", 3))(z)
    np.testing.assert_allclose(np.asarray(mobile), expected_rgb / 127.5 - 1.0, atol=1e-5)
    resnet = PretrainedInput(*input_affine("resnet50", 3))(z)
    expected = keras.applications.resnet50.preprocess_input(expected_rgb.astype(np.float32))
    np.testing.assert_allclose(np.asarray(resnet), expected, atol=1e-3)


def test_detector_wires_stats_and_freezing_into_the_backbone(tmp_path, mobilenet_file, make_config):
    from pipeline.model.detector import build_detector

    stats4 = {k: (v[:4] if isinstance(v, list) else v) for k, v in STATS5.items()} | {"channels": 4}
    cfg = make_config(backbone="mobilenet_v3_large", weights=str(mobilenet_file[0]), freeze_stages=1)
    model = build_detector(cfg, num_classes=1, bands=4, stats=stats4)
    layer = model.backbone.get_layer("pretrained_input")
    scale, offset, _ = input_affine("mobilenet_v3_large", 4, stats4)
    np.testing.assert_array_equal(layer.scale.numpy(), scale)
    np.testing.assert_array_equal(layer.offset.numpy(), offset)
    trainable = {id(v) for v in model.trainable_variables}
    assert not any(id(w) in trainable for bn in _batch_norms(model.backbone) for w in bn.weights)
    assert id(model.backbone.get_layer("conv").kernel) not in trainable
    assert id(model.backbone.get_layer("expanded_conv_3_expand").kernel) in trainable
    assert model.get_config()["stats"] == stats4

    # an export's rebuild (pipeline.predict.adapt): its model_config with weights 'none', then load_weights
    model.save_weights(str(tmp_path / "model.weights.h5"))
    assert model.cfg.pretrained_input is True  # resolved and recorded in the config the export writes
    rebuilt_cfg = ModelConfig.model_validate({**model.cfg.model_dump(mode="json"), "weights": "none"})
    rebuilt = build_detector(rebuilt_cfg, num_classes=1, bands=4)  # no stats, no weights file
    rebuilt.load_weights(str(tmp_path / "model.weights.h5"))
    np.testing.assert_array_equal(rebuilt.backbone.get_layer("pretrained_input").offset.numpy(), offset)
    images = np.random.default_rng(4).normal(0.0, 1.0, (1, 64, 64, 4)).astype(np.float32)
    for a, b in zip(model.backbone(images), rebuilt.backbone(images)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pretrained_input_false_feeds_the_normalised_bands_unchanged(mobilenet_file):
    backbone = build_backbone("mobilenet_v3_large", 3, str(mobilenet_file[0]), pretrained_input=False)
    assert not any(isinstance(layer, PretrainedInput) for layer in backbone.layers)
    assert all(np.array_equal(v, mobilenet_file[1][k]) for k, v in _weights_by_path(backbone).items())
