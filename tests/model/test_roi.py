"""pipeline/model/roi.py: ROIAlign against a NumPy reference of torchvision's aligned ROIAlign, FPN level
assignment, and ROI sampling counts."""

import math

import numpy as np
import pytest
import tensorflow as tf

from pipeline.model.boxes import BoxCoder
from pipeline.model.roi import GIOU_LOSS_WEIGHT, assign_levels, roi_align, roi_loss, sample_rois


def _bilinear(feat, y, x):
    """torchvision's roi_align bilinear_interpolate (edge clamp, zero beyond one pixel outside)."""
    h, w = feat.shape[:2]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(feat.shape[2])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return (feat[y0, x0] * (1 - ly) * (1 - lx) + feat[y0, x1] * (1 - ly) * lx
            + feat[y1, x0] * ly * (1 - lx) + feat[y1, x1] * ly * lx)


def _roi_align_numpy(feat, box, scale, size=7, ratio=2, shift=0.0):
    x0, y0, x1, y1 = ((c - shift) * scale - 0.5 for c in box)
    bin_h, bin_w = (y1 - y0) / size, (x1 - x0) / size
    out = np.zeros((size, size, feat.shape[2]))
    for ph in range(size):
        for pw in range(size):
            acc = 0.0
            for iy in range(ratio):
                for ix in range(ratio):
                    y = y0 + ph * bin_h + (iy + 0.5) * bin_h / ratio
                    x = x0 + pw * bin_w + (ix + 0.5) * bin_w / ratio
                    acc = acc + _bilinear(feat, y, x)
            out[ph, pw] = acc / ratio**2
    return out


def _level_numpy(box):
    s = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
    return int(min(max(math.floor(4 + math.log2(s / 224) + 1e-6), 2), 5))


@pytest.mark.parametrize("impl", ["crop_and_resize", "gather"])
@pytest.mark.parametrize("sign", [0.0, 1.0, -1.0])  # no shift; MobileNetV3's; ResNet-50's
def test_roi_align_matches_numpy_reference_on_all_levels(impl, sign):
    rng = np.random.default_rng(0)
    image = 512  # level 5 needs sqrt(area) >= 448
    features = [rng.normal(size=(2, image // 2**lvl, image // 2**lvl, 3)).astype(np.float32) for lvl in (2, 3, 4, 5)]
    # boxes of many sizes (so every level is used), touching the image border, and degenerate-thin ones
    sides = np.array([3, 12, 30, 60, 90, 120, 180, 240, 300, 400, 480, 512], np.float64)
    wh = np.stack([sides * rng.uniform(0.7, 1.0, 12), sides * rng.uniform(0.7, 1.0, 12)], -1)[None].repeat(2, 0)
    xy = rng.uniform(0, 1, (2, 12, 2)) * (image - wh)
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    boxes[0, 0] = [0, 0, image, image]
    boxes[1, 0] = [500, 3, 512, 4]
    shifts = [sign * 0.5 * (2**lvl - 1) for lvl in (2, 3, 4, 5)] if sign else None
    got = roi_align([tf.constant(f) for f in features], tf.constant(boxes), 2, 7, 2, impl, shifts).numpy()
    assert got.shape == (2, 12, 7, 7, 3)
    levels_seen = set()
    for b in range(2):
        for r in range(12):
            lvl = _level_numpy(boxes[b, r])
            levels_seen.add(lvl)
            want = _roi_align_numpy(features[lvl - 2][b], boxes[b, r], 2.0**-lvl, shift=sign * 0.5 * (2**lvl - 1))
            np.testing.assert_allclose(got[b, r], want, atol=1e-4, rtol=1e-4)
    assert levels_seen == {2, 3, 4, 5}


def test_roi_align_gradients_flow_to_features():
    feats = [tf.Variable(tf.ones([1, 16, 16, 2])), tf.Variable(tf.ones([1, 8, 8, 2]))]
    with tf.GradientTape() as tape:
        out = roi_align(feats, tf.constant([[[8.0, 8.0, 40.0, 40.0]]]), 2, 7, 2, "crop_and_resize")
        loss = tf.reduce_sum(out)
    grads = tape.gradient(loss, feats)
    assert float(tf.reduce_sum(grads[0])) == pytest.approx(7 * 7 * 2, rel=1e-4)  # bilinear weights sum to one
    assert float(tf.reduce_sum(grads[1])) == 0.0


def test_level_assignment_follows_fpn_formula():
    boxes = tf.constant([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 111, 111], [0, 0, 10, 10], [0, 0, 900, 900]],
                        tf.float32)
    assert assign_levels(boxes, 2, 5).numpy().tolist() == [4, 3, 2, 2, 5]


def test_sample_rois_counts_fractions_and_labels():
    rng = np.random.default_rng(3)
    gt = np.array([[[10, 10, 50, 50], [60, 60, 100, 90], [0, 0, 0, 0]]], np.float32)
    # 40 proposals near GT 0 (foreground), 300 elsewhere (background)
    jitter = rng.uniform(-2, 2, (40, 4))
    near = gt[0, 0] + jitter
    xy = rng.uniform(120, 200, (300, 2))
    far = np.concatenate([xy, xy + 20], 1)
    proposals = np.concatenate([near, far], 0)[None].astype(np.float32)
    valid = np.ones((1, 340), bool)
    valid[0, -10:] = False  # padding proposals are never sampled
    out = sample_rois(tf.constant(proposals), tf.constant(valid), tf.constant(gt), tf.constant([[1, 2, 0]]),
                      tf.constant([2]), num_samples=64, positive_fraction=0.25, fg_iou=0.5, seed=1)
    labels, ok = out["labels"].numpy()[0], out["valid"].numpy()[0]
    assert ok.sum() == 64
    assert (labels > 0).sum() == 16  # quota: 0.25 * 64, plenty of candidates (40 + 2 GT)
    assert set(labels[labels > 0].tolist()) <= {1, 2}
    ious = tf.linalg.diag_part(tf.reshape(
        __import__("pipeline.model.boxes", fromlist=["pairwise_iou"]).pairwise_iou(out["boxes"][0], out["matched"][0]),
        [64, 64])).numpy()
    assert np.all(ious[labels > 0] >= 0.5) and np.all(ious[labels == 0] < 0.5)
    picked = out["boxes"].numpy()[0]
    assert not any(np.allclose(p, q) for p in picked for q in proposals[0, -10:])


def test_sample_rois_with_few_candidates_pads_invalid_and_keeps_gt():
    gt = np.array([[[10, 10, 50, 50]]], np.float32)
    proposals = np.array([[[100, 100, 120, 120], [0, 0, 0, 0]]], np.float32)
    out = sample_rois(tf.constant(proposals), tf.constant([[True, False]]), tf.constant(gt), tf.constant([[1]]),
                      tf.constant([1]), num_samples=8, positive_fraction=0.5, fg_iou=0.5, seed=0)
    assert out["boxes"].shape == (1, 8, 4)
    assert out["valid"].numpy()[0].sum() == 2
    assert sorted(out["labels"].numpy()[0][out["valid"].numpy()[0]].tolist()) == [0, 1]


def _rois(boxes, matched, labels):
    return {"boxes": tf.constant([boxes], tf.float32), "matched": tf.constant([matched], tf.float32),
            "labels": tf.constant([labels], tf.int32), "valid": tf.ones([1, len(labels)], tf.bool)}


@pytest.mark.parametrize("box_loss", ["smooth_l1", "giou"])
def test_roi_box_loss_is_zero_for_exact_deltas_and_counts_positives_only(box_loss):
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    rois = _rois([[10, 10, 50, 50], [0, 0, 30, 20], [60, 60, 90, 90]],
                 [[12, 8, 54, 50], [2, 1, 28, 22], [0, 0, 1, 1]], [1, 1, 0])
    exact = coder.encode(rois["boxes"], rois["matched"])[:, :, None, :]  # [1, 3, 1 class, 4]
    logits = tf.zeros([1, 3, 2])
    _, box = roi_loss(logits, exact, rois, coder, box_loss)
    assert float(box) == pytest.approx(0.0, abs=1e-5)
    # A wrong delta on the background ROI costs nothing; on a positive it does.
    wrong_bg = tf.tensor_scatter_nd_update(exact, [[0, 2, 0, 0]], [3.0])
    assert float(roi_loss(logits, wrong_bg, rois, coder, box_loss)[1]) == pytest.approx(0.0, abs=1e-5)
    wrong_fg = tf.tensor_scatter_nd_update(exact, [[0, 0, 0, 0]], [3.0])
    assert float(roi_loss(logits, wrong_fg, rois, coder, box_loss)[1]) > 0.01


def test_giou_box_loss_value_and_gradient():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    rois = _rois([[0, 0, 10, 10], [0, 0, 10, 10]], [[5, 0, 15, 10], [0, 0, 10, 10]], [1, 1])
    deltas = tf.Variable(tf.zeros([1, 2, 1, 4]))  # decoded boxes = the ROIs: GIoU 1/3 and 1 with their GT
    with tf.GradientTape() as tape:
        _, box = roi_loss(tf.zeros([1, 2, 2]), deltas, rois, coder, "giou")
    # sum over positives of 10 x (1 - GIoU), divided by the 2 sampled ROIs
    assert float(box) == pytest.approx(GIOU_LOSS_WEIGHT * (1 - 1 / 3) / 2, rel=1e-5)
    grad = tape.gradient(box, deltas).numpy()[0, :, 0]
    assert grad[0, 0] < 0  # moving the first box right (dx > 0) towards its GT lowers the loss
    assert np.abs(grad[1]).max() < 1e-3 * np.abs(grad[0]).max() + 1e-9  # the exact box sits at the optimum
    with pytest.raises(ValueError, match="unknown box loss"):
        roi_loss(tf.zeros([1, 2, 2]), deltas, rois, coder, "l2")
