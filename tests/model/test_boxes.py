"""pipeline/model/boxes.py: IoU against NumPy, box coder round trip, clipping, grouped padded NMS."""

import numpy as np
import pytest
import tensorflow as tf

from pipeline.model.boxes import (
    BoxCoder,
    batched_nms,
    clip_boxes,
    generalized_iou,
    pairwise_iou,
    xyxy_to_yxyx,
)


def _random_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _iou_numpy(a, b):
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            out[i, j] = inter / union
    return out


def test_pairwise_iou_matches_numpy_reference():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 20), _random_boxes(rng, 15)
    np.testing.assert_allclose(pairwise_iou(a, b).numpy(), _iou_numpy(a, b), atol=1e-6)


def test_pairwise_iou_is_batched_and_empty_boxes_give_zero():
    a = np.array([[[0, 0, 10, 10], [0, 0, 0, 0]]], np.float32)
    b = np.array([[[5, 0, 15, 10], [0, 0, 0, 0]]], np.float32)
    iou = pairwise_iou(a, b).numpy()
    assert iou.shape == (1, 2, 2)
    np.testing.assert_allclose(iou[0], [[1 / 3, 0.0], [0.0, 0.0]], atol=1e-6)


def test_box_coder_round_trip_with_detection_weights():
    rng = np.random.default_rng(1)
    anchors, boxes = _random_boxes(rng, 50), _random_boxes(rng, 50)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    decoded = coder.decode(anchors, coder.encode(anchors, boxes)).numpy()
    np.testing.assert_allclose(decoded, boxes, rtol=1e-4, atol=1e-3)


def test_box_coder_encodes_known_shift_and_scale():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    deltas = coder.encode(np.array([[0, 0, 10, 20]], np.float32), np.array([[5, 0, 25, 20]], np.float32)).numpy()
    np.testing.assert_allclose(deltas, [[1.0, 0.0, np.log(2.0), 0.0]], atol=1e-6)


def test_box_coder_clamps_huge_log_scales():
    coder = BoxCoder()
    out = coder.decode(np.array([[0, 0, 10, 10]], np.float32), np.array([[0, 0, 100.0, 100.0]], np.float32)).numpy()
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0, 2] - out[0, 0], 10 * 1000 / 16, rtol=1e-4)


def test_clip_and_axis_swap():
    clipped = clip_boxes(tf.constant([[-5.0, 3.0, 120.0, 90.0]]), 80, 100).numpy()
    np.testing.assert_allclose(clipped, [[0, 3, 100, 80]])
    np.testing.assert_allclose(xyxy_to_yxyx(tf.constant([[1.0, 2.0, 3.0, 4.0]])).numpy(), [[2, 1, 4, 3]])


@pytest.mark.parametrize("impl", ["padded", "greedy"])
def test_batched_nms_suppresses_within_a_group_only(impl):
    boxes = np.array([[[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]]], np.float32)
    scores = np.array([[0.9, 0.8, 0.7, 0.6]], np.float32)
    groups = np.array([[0, 0, 1, 0]], np.int32)
    keep, num = batched_nms(boxes, scores, groups, max_output=4, iou_threshold=0.5, impl=impl)
    assert int(num[0]) == 3
    assert keep.numpy()[0, :3].tolist() == [0, 2, 3]  # sorted by score; box 1 suppressed by box 0
    keep_all, num_all = batched_nms(boxes, scores, None, max_output=4, iou_threshold=0.5, impl=impl)
    assert int(num_all[0]) == 2 and keep_all.numpy()[0, :2].tolist() == [0, 3]


@pytest.mark.parametrize("impl", ["padded", "greedy"])
def test_batched_nms_applies_score_threshold(impl):
    boxes = np.array([[[0, 0, 10, 10], [50, 50, 60, 60]]], np.float32)
    keep, num = batched_nms(boxes, np.array([[0.9, 0.01]], np.float32), None, 5, 0.5, score_threshold=0.05,
                            impl=impl)
    assert int(num[0]) == 1 and keep.shape == (1, 2)


def test_greedy_and_padded_nms_keep_the_same_boxes_on_random_crowds():
    rng = np.random.default_rng(7)
    xy = rng.uniform(0, 200, (3, 400, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (3, 400, 2))], -1).astype(np.float32)
    scores = rng.uniform(size=(3, 400)).astype(np.float32)
    groups = rng.integers(0, 3, (3, 400)).astype(np.int32)
    a = batched_nms(boxes, scores, groups, 150, 0.6, score_threshold=0.1, impl="padded")
    b = batched_nms(boxes, scores, groups, 150, 0.6, score_threshold=0.1, impl="greedy")
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    assert int(a[1].numpy().min()) > 10  # the crowd leaves enough survivors to compare
    for i, n in enumerate(a[1].numpy()):
        assert a[0].numpy()[i, :n].tolist() == b[0].numpy()[i, :n].tolist()


def test_unknown_nms_impl_is_rejected():
    with pytest.raises(ValueError, match="unknown NMS implementation"):
        batched_nms(np.zeros((1, 2, 4), np.float32), np.zeros((1, 2), np.float32), None, 2, 0.5, impl="fast")


def test_generalized_iou_known_values_and_agrees_with_iou_when_hull_is_the_union():
    a = tf.constant([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    b = tf.constant([[0.0, 0, 10, 10], [5, 0, 15, 10], [20, 0, 30, 10], [2, 2, 8, 8]])
    giou = generalized_iou(a, b).numpy()
    # identical; half overlap (IoU 1/3, hull = union); disjoint: 0 - (300 - 200) / 300; nested (hull = a)
    np.testing.assert_allclose(giou, [1.0, 1 / 3, -1 / 3, 36 / 100], atol=1e-6)
    iou = np.diag(pairwise_iou(a, b).numpy())
    assert giou[2] < iou[2] == 0.0  # GIoU still ranks disjoint boxes by distance, where IoU is flat at 0
    far = generalized_iou(a[2:3], tf.constant([[40.0, 0, 50, 10]])).numpy()
    assert far[0] < giou[2]
