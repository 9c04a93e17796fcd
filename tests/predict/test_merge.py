"""pipeline/predict/merge.py: class-aware NMS and weighted box fusion."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.predict.merge import merge_boxes, nms, weighted_box_fusion


def _brute_nms(boxes, scores, labels, thr):
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        rest = []
        for j in order:
            lt = np.maximum(boxes[i, :2], boxes[j, :2])
            rb = np.minimum(boxes[i, 2:], boxes[j, 2:])
            inter = np.prod(np.clip(rb - lt, 0, None))
            union = np.prod(boxes[i, 2:] - boxes[i, :2]) + np.prod(boxes[j, 2:] - boxes[j, :2]) - inter
            if labels[i] != labels[j] or inter / union <= thr:
                rest.append(j)
        order = rest
    return keep


def test_nms_matches_brute_force_and_respects_classes():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (300, 2))
    boxes = np.c_[xy, xy + rng.uniform(5, 40, (300, 2))]
    scores, labels = rng.random(300), rng.integers(1, 3, 300)
    assert list(nms(boxes, scores, labels, 0.5)) == _brute_nms(boxes, scores, labels, 0.5)
    same = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float)
    assert len(nms(same, np.array([0.9, 0.8]), np.array([1, 2]), 0.5)) == 2
    assert list(nms(same, np.array([0.8, 0.9]), np.array([1, 1]), 0.5)) == [1]


def test_wbf_averages_duplicates_by_score_and_keeps_max_score():
    boxes = np.array([[0, 0, 10, 10], [2, 0, 12, 10], [50, 50, 60, 60]], float)
    fused, scores, labels = weighted_box_fusion(boxes, np.array([0.75, 0.25, 0.5]), np.array([1, 1, 1]), 0.55)
    np.testing.assert_allclose(fused[0], [0.5, 0, 10.5, 10])
    np.testing.assert_allclose(scores, [0.75, 0.5])
    assert list(labels) == [1, 1]


def test_merge_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown merge"):
        merge_boxes(np.zeros((0, 4)), np.zeros(0), np.zeros(0), "soft")
