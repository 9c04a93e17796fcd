"""Validation AP50 from model outputs and padded targets (the number behind best/ and early stopping)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from pipeline.train.validation import make_predict_fn, validation_ap50

GT = np.array(
    [[[2, 2, 10, 10], [20, 20, 30, 34], [0, 0, 0, 0]], [[5, 5, 15, 15], [0, 0, 0, 0], [0, 0, 0, 0]]],
    np.float32,
)
NUM = np.array([2, 1], np.int32)


class _Oracle:
    """Returns the ground truth (shifted by `shift` px) as detections."""

    def __init__(self, shift: float = 0.0):
        self.shift = shift

    def __call__(self, images, training=False):
        boxes = tf.constant(GT) + self.shift
        return {
            "boxes": boxes,
            "scores": tf.constant([[0.9, 0.8, 0.0], [0.9, 0.0, 0.0]]),
            "classes": tf.ones([2, 3], tf.int32),
            "num_detections": tf.constant(NUM),
        }


def _dataset():
    targets = {"boxes": GT, "labels": (GT[..., 2] > 0).astype(np.int32), "num_boxes": NUM}
    return tf.data.Dataset.from_tensors((tf.zeros([2, 8, 8, 3]), targets))


def test_perfect_detections_score_ap50_one():
    assert validation_ap50(_Oracle(), _dataset(), ["tree"]) == pytest.approx(1.0)


def test_detections_off_by_more_than_half_the_box_score_zero():
    model = _Oracle(shift=40.0)
    assert validation_ap50(model, _dataset(), ["tree"], predict_fn=make_predict_fn(model)) == pytest.approx(
        0.0
    )
