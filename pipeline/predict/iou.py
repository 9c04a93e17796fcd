"""IoU of axis-aligned pixel boxes in NumPy (xyxy, continuous pixel edges: no "+1" in widths).

The one home of NumPy IoU: the seam merge and test-time fusion (pipeline.predict.merge) and the VOC and
P/R/F1 matching of the metrics (pipeline.evaluate.metrics) use it. The model's IoU on tensors is
pipeline.model.boxes.pairwise_iou.
"""

from __future__ import annotations

import numpy as np


def _areas(boxes: np.ndarray) -> np.ndarray:
    """Areas of (..., 4) boxes; an inverted box has area 0."""
    return np.prod(np.clip(boxes[..., 2:] - boxes[..., :2], 0, None), axis=-1)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between (N, 4) and (M, 4) boxes as an (N, M) array; 0 where the union is empty."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    union = _areas(a)[:, None] + _areas(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (4,) box against (M, 4) boxes."""
    return iou_matrix(box[None], boxes)[0]
