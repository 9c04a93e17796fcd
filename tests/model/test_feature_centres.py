"""Where each backbone level's cells are centred, measured: the receptive field of a central cell, found by
bumping single input pixels, must be centred exactly where ``feature_centre_shift`` says, and ROIAlign with
the detector's shifts must pool a box's central bin from the box's own centre."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from pipeline.model.backbone import BACKBONES, build_backbone, feature_centre_shift
from pipeline.model.detector import build_detector

SIZE = 320  # big enough for the whole receptive field of levels 2-3 (and 4 for the smaller backbones)


def _uniform(model: tf.keras.Model) -> None:
    """Every kernel uniform (each output the mean of its inputs), squeeze-excite gates constant: a cell's
    response to one input pixel is then symmetric about the cell's true centre, and positive inside its
    receptive field."""
    for layer in model.layers:
        for name in ("kernel", "depthwise_kernel"):
            if hasattr(layer, name):
                var = getattr(layer, name)
                fan_in = np.prod(var.shape[:2]) * (1 if name == "depthwise_kernel" else var.shape[2])
                var.assign(np.full(var.shape, 0.0 if "squeeze_excite" in layer.name else 1.0 / fan_in, var.dtype))


def _centroid(backbone: tf.keras.Model, level: int, cell: int) -> tuple[float, float]:
    """(x, y) pixel index of the centroid of d(sum of the 5 x 5 cells around (cell, cell) of `level`)/d input:
    with uniform kernels each cell's response is positive and symmetric about its true centre, so the
    centroid is the true centre of the middle cell. The input is flat (activations in their linear range,
    hard-swish > 3) with a little noise that decides ResNet's max-pooling ties (averaged over the 25 cells)."""
    x = tf.constant(10.0 + np.random.default_rng(0).uniform(0, 0.01, (1, SIZE, SIZE, 3)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = backbone(x, training=False)[level - 2]
        value = tf.reduce_sum(out[0, cell - 2 : cell + 3, cell - 2 : cell + 3])
    grad = tape.gradient(value, x).numpy()[0].sum(-1)
    assert grad.min() >= 0
    rows, cols = np.mgrid[:SIZE, :SIZE]
    assert grad[0].max() < 1e-3 * grad.max() and grad[:, 0].max() < 1e-3 * grad.max(), "receptive field cut"
    return float((grad * cols).sum() / grad.sum()), float((grad * rows).sum() / grad.sum())


@pytest.mark.parametrize("name", BACKBONES)
def test_cells_are_centred_where_feature_centre_shift_says(name):
    backbone = build_backbone(name, 3, "none")
    _uniform(backbone)
    for level in (2, 3, 4):
        cell = SIZE // 2**level // 2
        nominal = (cell + 0.5) * 2**level - 0.5  # pixel index of the nominal centre
        want = nominal + feature_centre_shift(name, level)
        # within 0.1 px (0.5 for ResNet-50, whose max pooling routes each window's gradient to one of 9 pixels);
        # the shifts of neighbouring levels differ by 2 px or more, the wrong sign by 3 px or more
        tol = 0.5 if name == "resnet50" else 0.1
        assert _centroid(backbone, level, cell) == pytest.approx((want, want), abs=tol), (name, level, nominal)


def _pooled_bump(make_config, shifted: bool) -> np.ndarray:
    """The 7 x 7 pooled response of a 56 px box (level 3) to a round blob at its centre, uniform weights."""
    cfg = make_config(backbone="tiny", min_level=3, max_level=5, anchor_sizes=[16, 32, 64], roi_align_shift=shifted)
    model = build_detector(cfg, num_classes=1, bands=3)
    _uniform(model.backbone)
    for var in model.fpn.weights:  # P3 from C3 alone: no top-down mix of the coarser levels' centres
        if "kernel" in var.path:
            top_down = "lateral" in var.path and "lateral_0" not in var.path
            var.assign(np.full(var.shape, 0.0 if top_down else 1.0 / np.prod(var.shape[:-1]), np.float32))
    box = tf.constant([[[100.0, 100.0, 156.0, 156.0]]])  # centre 127.5 in pixel indices
    d2 = ((np.mgrid[:256, :256] - 127.5) ** 2).sum(0)
    x = np.repeat(np.exp(-d2 / (2 * 12.0**2))[None, :, :, None], 3, -1).astype(np.float32)  # smooth at stride 8
    return model._roi_features(model._features(tf.constant(x), training=False), box).numpy()[0, 0].sum(-1)


def test_roi_align_pools_a_box_symmetrically_about_its_centre(make_config):
    """With the shift the pooled response to a blob at the box centre is symmetric (the grid sits on the
    box); on the nominal grid it leans up-left, the features being centred 3.5 px right of and below it."""
    def asymmetry(p: np.ndarray) -> float:
        return float(np.abs(p - p[::-1, ::-1]).sum() / p.sum())

    shifted, nominal = _pooled_bump(make_config, True), _pooled_bump(make_config, False)
    assert np.unravel_index(np.argmax(shifted), shifted.shape) == (3, 3)
    assert asymmetry(shifted) < 0.02
    assert asymmetry(nominal) > 5 * max(asymmetry(shifted), 0.01)
    # each nominal sample reads the image 3.5 px right of and below itself: the blob shows up-left in the bins
    assert nominal[:3, :3].sum() > 1.5 * nominal[4:, 4:].sum()
