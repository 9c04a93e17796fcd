"""Backbone construction: feature strides, band adaptation, batch-norm momentum."""

import keras
import numpy as np
import pytest

from pipeline.errors import SatdetError
from pipeline.model.backbone import build_backbone


def _bn_momenta(model: keras.Model) -> set[float]:
    return {round(layer.momentum, 6) for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)}


@pytest.mark.parametrize(("name", "channels"), [("mobilenet_v3_large", [72, 240, 672, 960]),
                                              ("mobilenet_v3_small", [72, 96, 288, 576])])
def test_mobilenet_gives_four_levels_at_strides_4_to_32_for_any_band_count(name, channels):
    backbone = build_backbone(name, bands=5)
    outs = backbone(np.zeros((1, 128, 96, 5), np.float32))
    assert [(o.shape[1], o.shape[2]) for o in outs] == [(32, 24), (16, 12), (8, 6), (4, 3)]
    assert [o.shape[3] for o in outs] == channels  # the expanded activations before each strided block


def test_bn_momentum_is_applied_to_every_batch_norm_layer():
    assert _bn_momenta(build_backbone("mobilenet_v3_large", 3)) == {0.999}  # keras' own value
    assert _bn_momenta(build_backbone("mobilenet_v3_large", 3, bn_momentum=0.9)) == {0.9}


def test_bn_momentum_moves_inference_statistics_within_a_few_training_calls():
    backbone = build_backbone("mobilenet_v3_large", 3, bn_momentum=0.9)
    bn = next(layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))
    images = np.random.default_rng(0).normal(3.0, 2.0, (2, 64, 64, 3)).astype(np.float32)
    for _ in range(30):
        backbone(images, training=True)
    # 0.9**30 ~ 4%: the moving mean has left its initial zeros and sits near the batch statistics
    assert float(np.abs(bn.moving_mean.numpy()).max()) > 0.5


def test_unknown_backbone_is_a_user_error():
    with pytest.raises(SatdetError, match="unknown"):
        build_backbone("vgg", 3)


def test_random_weights_keep_plain_inputs_and_trainable_batch_norm():
    backbone = build_backbone("mobilenet_v3_large", 3)  # weights 'none': freeze_bn auto -> trainable
    assert "pretrained_input" not in {layer.name for layer in backbone.layers}
    bns = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(layer.trainable for layer in bns)
    frozen = build_backbone("mobilenet_v3_large", 3, freeze_bn=True)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) and layer.trainable for layer in frozen.layers)


def test_stages_follow_the_feature_strides():
    from pipeline.model.backbone import stage_of

    assert [stage_of("resnet50", n) for n in ("conv1_conv", "pool1_pad", "conv2_block1_1_bn", "conv5_block3_out")] == [
        0, 0, 1, 4]
    names = ("conv_bn", "expanded_conv_depthwise", "expanded_conv_1_expand", "expanded_conv_3_project",
             "expanded_conv_6_expand", "expanded_conv_11_add", "expanded_conv_12_depthwise", "conv_1_bn", "input_1")
    assert [stage_of("mobilenet_v3_large", n) for n in names] == [0, 0, 1, 2, 3, 3, 4, 4, None]
    # MobileNetV3-Small: block 0 already has stride 2 (stage 1); blocks 1, 3 and 8 start stages 2-4
    small = ("conv_bn", "expanded_conv_depthwise", "expanded_conv_1_expand", "expanded_conv_2_add",
             "expanded_conv_3_depthwise", "expanded_conv_7_project", "expanded_conv_8_expand", "conv_1_bn")
    assert [stage_of("mobilenet_v3_small", n) for n in small] == [0, 1, 2, 2, 3, 3, 4, 4]
    assert [stage_of("tiny", n) for n in ("tiny_stem", "tiny_c2_down", "tiny_c5")] == [0, 1, 4]
    with pytest.raises(SatdetError, match="freeze_stages"):
        build_backbone("tiny", 3, freeze_stages=5)


def test_resnet18_half_gives_four_levels_with_its_widths_for_any_band_count():
    backbone = build_backbone("resnet18_half", bands=4, bn_momentum=0.8)
    outs = backbone(np.zeros((1, 128, 96, 4), np.float32))
    assert [(o.shape[1], o.shape[2]) for o in outs] == [(32, 24), (16, 12), (8, 6), (4, 3)]
    assert [o.shape[3] for o in outs] == [32, 64, 128, 256]
    assert _bn_momenta(backbone) == {0.8}
    # random weights only: batch norm trains, no input mapping layer
    assert all(layer.trainable for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))
    assert "pretrained_input" not in {layer.name for layer in backbone.layers}


def test_resnet18_half_stages_freeze_by_stride():
    from pipeline.model.backbone import stage_of

    names = ("r18_stem1", "r18_stem2_bn", "r18_c2_b0_a", "r18_c3_b0_proj_bn", "r18_c4_b1_b", "r18_c5_b1_out")
    assert [stage_of("resnet18_half", n) for n in names] == [0, 0, 1, 2, 3, 4]
    backbone = build_backbone("resnet18_half", 3, freeze_stages=2)
    frozen = {layer.name for layer in backbone.layers if layer.weights and not layer.trainable}
    assert "r18_stem1" in frozen and "r18_c3_b1_b" in frozen
    assert "r18_c4_b0_a" not in frozen and "r18_c5_b1_b_bn" not in frozen


@pytest.mark.parametrize("weights", ["imagenet", "/nowhere/weights.h5"])
def test_from_scratch_backbones_refuse_pretrained_weights_without_a_download(weights):
    with pytest.raises(SatdetError, match="resnet18_half has no pretrained weights"):
        build_backbone("resnet18_half", 3, weights=weights)
