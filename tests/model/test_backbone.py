"""Backbone construction: feature strides, band adaptation, batch-norm momentum."""

import keras
import numpy as np
import pytest

from pipeline.errors import SatdetError
from pipeline.model.backbone import build_backbone


def _bn_momenta(model: keras.Model) -> set[float]:
    return {round(layer.momentum, 6) for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)}


def test_mobilenet_gives_four_levels_at_strides_4_to_32_for_any_band_count():
    backbone = build_backbone("mobilenet_v3_large", bands=5)
    outs = backbone(np.zeros((1, 128, 96, 5), np.float32))
    assert [(o.shape[1], o.shape[2]) for o in outs] == [(32, 24), (16, 12), (8, 6), (4, 3)]


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
