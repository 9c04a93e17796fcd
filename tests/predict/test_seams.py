"""pipeline/predict/seams.py: per-window rules and the seam rule, on hand-made model outputs."""

from __future__ import annotations

import numpy as np

from pipeline.config import PredictConfig
from pipeline.predict.seams import stitch, window_boxes
from pipeline.predict.windows import plan_windows


def _out(*boxes_scores):
    boxes = np.array([b for b, _ in boxes_scores], np.float32).reshape(1, -1, 4)
    scores = np.array([[s for _, s in boxes_scores]], np.float32)
    n = len(boxes_scores)
    return {"boxes": boxes, "scores": scores, "classes": np.ones((1, n), np.int32),
            "num_detections": np.array([n], np.int32)}


def test_threshold_clipping_and_nodata_in_window_pixels_then_scene_pixels():
    [w] = plan_windows((100, 50, 64, 64), 64, 16)  # one window: no seams
    mask = np.zeros((64, 64), bool)
    mask[:, :20] = True  # left third is nodata
    out = _out(([10, 10, 30, 30], 0.9), ([40, 40, 70, 70], 0.8), ([30, 5, 50, 20], 0.2), ([0, 40, 12, 60], 0.9))
    boxes, scores, _, strip = window_boxes(out, 0, mask, w, PredictConfig(score_threshold=0.5))
    # kept: the box half over nodata (0.5 is not above the default 0.5 limit) and the box clipped to the
    # window; gone: the low score and the box all over nodata
    np.testing.assert_array_equal(boxes, [[110, 60, 130, 80], [140, 90, 164, 114]])
    np.testing.assert_array_equal(scores, np.float32([0.9, 0.8]))
    assert not strip.any()


def test_of_two_windows_sharing_a_seam_exactly_one_drops_a_box_in_the_strip():
    left, right = plan_windows((0, 0, 112, 64), 64, 16)  # columns 0..64 and 48..112: the strip is 48..64
    assert (left.right_start, right.left_end) == (48, 64)
    cfg = PredictConfig(score_threshold=0.1, edge_tolerance=1.0)
    # an object at scene x 52..60, fully inside the strip: both windows see it whole
    from_left = window_boxes(_out(([52, 10, 60, 20], 0.9)), 0, np.zeros((64, 64), bool), left, cfg)
    from_right = window_boxes(_out(([4, 10, 12, 20], 0.9)), 0, np.zeros((64, 64), bool), right, cfg)
    assert len(from_left[0]) == 1 and len(from_right[0]) == 1  # clear of both edges: both keep it...
    assert from_left[3].all() and from_right[3].all()  # ...in the strip, so the merge makes it one
    # an object cut by the left window's edge at 64: the left window drops it, the right one keeps it whole
    cut = window_boxes(_out(([56, 30, 64, 40], 0.9)), 0, np.zeros((64, 64), bool), left, cfg)
    whole = window_boxes(_out(([8, 30, 20, 40], 0.9)), 0, np.zeros((64, 64), bool), right, cfg)
    assert len(cut[0]) == 0 and len(whole[0]) == 1
    boxes, _scores, labels = stitch([], [from_left[:3], from_right[:3], whole[:3]], cfg)
    np.testing.assert_array_equal(boxes, [[52, 10, 60, 20], [56, 30, 68, 40]])
    assert labels.dtype == np.int64
