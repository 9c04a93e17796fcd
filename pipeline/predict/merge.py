"""Merging duplicate boxes across window seams: class-aware NMS or weighted box fusion (WBF).

Both take boxes (N, 4) xyxy in scene pixels, scores (N,), labels (N,) and return merged arrays in the
same layout, sorted by score (highest first). Boxes of different classes never merge.
"""

from __future__ import annotations

import numpy as np

from pipeline.predict.iou import iou_one_to_many


def nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """Indices kept by class-aware greedy NMS, highest score first.

    Classes are separated by shifting each class's boxes by ``label * (max_coord + 1)`` so one pass
    suppresses within classes only (the trick from torchvision's ``batched_nms``).
    """
    n = len(boxes)
    if n == 0:
        return np.zeros(0, np.int64)
    offset = labels.astype(np.float64)[:, None] * (float(np.max(boxes)) + 1.0)
    shifted = boxes.astype(np.float64) + offset
    order = np.argsort(-scores, kind="stable")
    # Sort by x0 too so each box is only compared with boxes that can overlap it (sweep along x).
    x_order = np.argsort(shifted[:, 0], kind="stable")
    x0_sorted = shifted[x_order, 0]
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    suppressed = np.zeros(n, bool)
    widths = shifted[:, 2] - shifted[:, 0]
    max_w = float(widths.max())
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        lo = np.searchsorted(x0_sorted, shifted[i, 0] - max_w, side="left")
        hi = np.searchsorted(x0_sorted, shifted[i, 2], side="right")
        cand = x_order[lo:hi]
        cand = cand[(~suppressed[cand]) & (rank[cand] > rank[i])]
        if len(cand):
            suppressed[cand[iou_one_to_many(shifted[i], shifted[cand]) > iou]] = True
    return np.asarray(keep, np.int64)


def weighted_box_fusion(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float = 0.55, n_models: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fuse overlapping boxes of the same class (Solovyev et al. 2021), for duplicates across seams.

    Boxes are visited by descending score; a box joins the first cluster of its class whose fused box it
    overlaps with IoU > `iou`, otherwise starts a cluster. A cluster's box is the score-weighted mean of
    its members; its score is the members' maximum (not WBF's mean × count/models: here the "models"
    are overlapping windows, and an object seen by one window only must not be penalised).

    With `n_models` (test-time views of one image, each contributing at most one box per object) the
    score is WBF's own: the members' score sum / n_models, so a box found in one view out of four keeps
    a quarter of its score.
    """
    if len(boxes) == 0:
        return boxes.reshape(0, 4), scores.reshape(0), labels.reshape(0)
    order = np.argsort(-scores, kind="stable")
    fused: list[np.ndarray] = []
    sums: list[np.ndarray] = []
    weights: list[float] = []
    best: list[float] = []
    cls: list[int] = []
    for i in order:
        b, s, c = boxes[i].astype(np.float64), float(scores[i]), int(labels[i])
        j = -1
        if fused:
            arr = np.asarray(fused)
            same = np.flatnonzero(np.asarray(cls) == c)
            if len(same):
                ious = iou_one_to_many(b, arr[same])
                k = int(np.argmax(ious))
                if ious[k] > iou:
                    j = int(same[k])
        if j < 0:
            fused.append(b.copy())
            sums.append(b * s)
            weights.append(s)
            best.append(s)
            cls.append(c)
        else:
            sums[j] = sums[j] + b * s
            weights[j] += s
            best[j] = max(best[j], s)
            fused[j] = sums[j] / max(weights[j], 1e-12)
    out_scores = np.asarray(best) if n_models is None else np.minimum(np.asarray(weights) / n_models, 1.0)
    o = np.argsort(-out_scores, kind="stable")
    return np.asarray(fused)[o], out_scores[o], np.asarray(cls, labels.dtype)[o]


def merge_boxes(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, method: str = "nms", iou: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge with `method` 'nms' or 'wbf'; returns (boxes, scores, labels) sorted by score."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels, np.int64).reshape(-1)
    if method == "wbf":
        return weighted_box_fusion(boxes, scores, labels, iou)
    if method != "nms":
        raise ValueError(f"unknown merge method {method!r}; use 'nms' or 'wbf'")
    keep = nms(boxes, scores, labels, iou)
    return boxes[keep], scores[keep], labels[keep]
