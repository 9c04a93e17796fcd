"""pipeline/model/padding.py: padding rows to a static size."""

import numpy as np
import tensorflow as tf

from pipeline.model.padding import pad_rows


def test_missing_rows_are_zero_or_false_at_the_end():
    boxes = pad_rows(tf.ones([2, 3, 4]), 5)
    valid = pad_rows(tf.ones([2, 3], tf.bool), 5)
    assert boxes.shape == (2, 5, 4) and valid.shape == (2, 5)
    np.testing.assert_array_equal(boxes.numpy()[:, 3:], 0.0)
    np.testing.assert_array_equal(valid.numpy(), [[True] * 3 + [False] * 2] * 2)


def test_enough_rows_are_left_as_they_are():
    x = tf.ones([1, 6, 2])
    assert pad_rows(x, 6) is x and pad_rows(x, 4) is x
