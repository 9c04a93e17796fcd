"""From each window's model output to scene boxes, and the stitch of all windows.

Per window, after the model:
1. boxes below `score_threshold` are dropped; boxes are clipped to the pixels actually read;
2. boxes lying mostly over nodata (fraction of the box area > `max_nodata_fraction`) are dropped;
3. boxes are shifted to scene pixels;
4. the seam rule: a box that touches an *interior* edge of its window (an edge with a neighbouring
   window beyond it; scene/region edges never count) within `edge_tolerance` px, and that lies inside
   the overlap strip along that edge and clear of the strip's far side by more than the tolerance, is
   dropped. The neighbouring window contains that whole strip and more, so it sees the same object at
   least as completely — in full when the object is no larger than the overlap — and, because the box
   is clear of its edge, does not drop it: of two windows sharing a seam at most one drops a box.
   Objects larger than the overlap are seen truncated by every window; their fragments are kept and
   left to the merge (choose `overlap` ≥ the largest object to avoid that).
Across windows, boxes that touch an overlap strip (the only places where duplicates can occur) are
merged with class-aware NMS or WBF (`merge`, `merge_iou`); boxes away from the strips pass untouched.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import PredictConfig
from pipeline.predict.merge import merge_boxes
from pipeline.predict.windows import Window

Boxes = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (N, 4) xyxy, scores (N,), labels (N,)


def window_boxes(out: dict[str, np.ndarray], n: int, mask: np.ndarray, w: Window, cfg: PredictConfig
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Boxes, scores, labels of image `n` of a batch's model output `out` after steps 1-4 (scene
    pixels), and for each box whether it touches an overlap strip."""
    boxes, scores, labels = _detections(out, n)
    keep = scores >= cfg.score_threshold
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w.width)  # never report pad pixels
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, w.height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if mask.any() and keep.any():
        keep[keep] = _nodata_fraction(mask, boxes[keep]) <= cfg.max_nodata_fraction
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    boxes = boxes + np.array([w.col, w.row, w.col, w.row], np.float64)
    keep = ~_seam_drop(boxes, w, cfg.edge_tolerance)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    return boxes, scores, labels, _in_strip(boxes, w)


def stitch(kept: list[Boxes], seam: list[Boxes], cfg: PredictConfig) -> Boxes:
    """All windows' boxes, scores and labels: those away from the strips as they are, the strip ones merged."""

    def cat(parts: list[Boxes], i: int, shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate([p[i] for p in parts]) if parts else np.zeros(shape)

    sb, ss, sl = merge_boxes(cat(seam, 0, (0, 4)), cat(seam, 1, (0,)), cat(seam, 2, (0,)),
                             cfg.merge, cfg.merge_iou)
    boxes = np.concatenate([cat(kept, 0, (0, 4)), sb])
    scores = np.concatenate([cat(kept, 1, (0,)), ss])
    return boxes, scores, np.concatenate([cat(kept, 2, (0,)), sl]).astype(np.int64)


def _detections(out: dict[str, np.ndarray], n: int) -> Boxes:
    """Image `n`'s valid detections of a batch's model output, in window pixels."""
    k = int(out["num_detections"][n]) if "num_detections" in out else len(out["scores"][n])
    boxes = np.asarray(out["boxes"][n][:k], np.float64).reshape(-1, 4)
    scores = np.asarray(out["scores"][n][:k], np.float64)
    return boxes, scores, np.asarray(out["classes"][n][:k], np.int64)


def _nodata_fraction(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each box's whole pixels that are nodata, via an integral image (boxes in window px)."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, 0), 1)
    x0 = np.floor(boxes[:, 0]).astype(int)
    y0 = np.floor(boxes[:, 1]).astype(int)
    x1 = np.maximum(np.ceil(boxes[:, 2]).astype(int), x0 + 1)
    y1 = np.maximum(np.ceil(boxes[:, 3]).astype(int), y0 + 1)
    x1, y1 = np.minimum(x1, mask.shape[1]), np.minimum(y1, mask.shape[0])
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / np.maximum((x1 - x0) * (y1 - y0), 1)


def _seam_drop(b: np.ndarray, w: Window, tol: float) -> np.ndarray:
    """The seam rule (module docstring, step 4) for boxes `b` in scene pixels."""
    drop = np.zeros(len(b), bool)
    right, bottom = w.col + w.width, w.row + w.height
    # "Inside the strip" is strict by the same tolerance, so the neighbour never counts that box as
    # touching its own facing edge: of two windows sharing a seam, at most one drops a given box.
    if w.right_start is not None:
        drop |= (b[:, 2] >= right - tol) & (b[:, 0] > w.right_start + tol)
    if w.left_end is not None:
        drop |= (b[:, 0] <= w.col + tol) & (b[:, 2] < w.left_end - tol)
    if w.bottom_start is not None:
        drop |= (b[:, 3] >= bottom - tol) & (b[:, 1] > w.bottom_start + tol)
    if w.top_end is not None:
        drop |= (b[:, 1] <= w.row + tol) & (b[:, 3] < w.top_end - tol)
    return drop


def _in_strip(b: np.ndarray, w: Window) -> np.ndarray:
    """True for boxes touching an overlap strip of `w` (where other windows may report them too)."""
    hit = np.zeros(len(b), bool)
    if w.right_start is not None:
        hit |= b[:, 2] > w.right_start
    if w.left_end is not None:
        hit |= b[:, 0] < w.left_end
    if w.bottom_start is not None:
        hit |= b[:, 3] > w.bottom_start
    if w.top_end is not None:
        hit |= b[:, 1] < w.top_end
    return hit
