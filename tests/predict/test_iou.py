"""pipeline/predict/iou.py: NumPy IoU of pixel boxes, shared by the seam merge and the metrics."""

from __future__ import annotations

import numpy as np

from pipeline.predict.iou import iou_matrix, iou_one_to_many


def test_iou_of_hand_computed_pairs():
    a = np.array([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 2.0, 2.0]])
    b = np.array([[5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0]])
    np.testing.assert_allclose(iou_matrix(a, b), [[50 / 150, 0.0, 1.0], [0.0, 0.0, 4 / 100]])


def test_pixel_edges_are_continuous_touching_boxes_do_not_overlap():
    assert iou_one_to_many(np.array([0.0, 0.0, 4.0, 4.0]), np.array([[4.0, 0.0, 8.0, 4.0]]))[0] == 0.0


def test_empty_and_degenerate_boxes_give_zero_not_nan():
    point = np.array([[3.0, 3.0, 3.0, 3.0]])
    assert iou_matrix(point, point)[0, 0] == 0.0
    assert iou_matrix(np.zeros((0, 4)), point).shape == (0, 1)


def test_one_to_many_is_a_row_of_the_matrix():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (20, 2))
    boxes = np.c_[xy, xy + rng.uniform(1, 20, (20, 2))]
    for i in range(5):
        assert iou_one_to_many(boxes[i], boxes).tobytes() == iou_matrix(boxes[i:i + 1], boxes)[0].tobytes()
