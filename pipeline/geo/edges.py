"""The edge-box policy: what happens to a box cut by a tile (or inference window) edge.

One object, used by tiling (which boxes go into a tile) and by prediction (which detections near a
window seam to trust), so training and inference agree on what a "visible enough" object is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Region = tuple[float, float, float, float]


@dataclass(frozen=True)
class EdgeResult:
    """Boxes that survive a region: clipped to it, with their indices into the input."""

    boxes: np.ndarray  # (K, 4) clipped to the region, same coordinate frame as the input
    index: np.ndarray  # (K,) indices of the kept boxes in the input
    clipped: np.ndarray  # (K,) bool: the kept box was cut by the region edge
    dropped: np.ndarray  # indices of boxes touching the region but less visible than min_visibility

    @property
    def n_clipped(self) -> int:
        return int(self.clipped.sum())

    @property
    def n_dropped(self) -> int:
        return len(self.dropped)


@dataclass(frozen=True)
class EdgePolicy:
    """Keep a box cut by a region edge (clipped) when at least `min_visibility` of its area is inside.

    min_visibility=0 keeps every box with any area inside; 1 keeps only boxes entirely inside.
    A region is (x0, y0, x1, y1): four numbers, or four arrays with one region per box (many windows at once).
    """

    min_visibility: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_visibility <= 1.0:
            raise ValueError(f"min_visibility must be in [0, 1], got {self.min_visibility}")

    @staticmethod
    def visibility(boxes: np.ndarray, region: Region | tuple[np.ndarray, ...]) -> np.ndarray:
        """Fraction of each box's area inside `region` (x0, y0, x1, y1); 0 for degenerate boxes."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        rx0, ry0, rx1, ry1 = region
        iw = np.clip(np.minimum(boxes[:, 2], rx1) - np.maximum(boxes[:, 0], rx0), 0, None)
        ih = np.clip(np.minimum(boxes[:, 3], ry1) - np.maximum(boxes[:, 1], ry0), 0, None)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(area > 0, iw * ih / area, 0.0)

    def apply(self, boxes: np.ndarray, region: Region | tuple[np.ndarray, ...]) -> EdgeResult:
        """Select and clip the boxes of one region (a tile window in scene pixels), or each box against its
        own region."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        r = np.stack([np.broadcast_to(np.asarray(v, np.float64), (len(boxes),)) for v in region], axis=1)
        vis = self.visibility(boxes, tuple(r.T))
        touching = vis > 0
        # A tiny tolerance so a box exactly at the threshold (e.g. half inside at 0.5) is kept.
        keep = touching & (vis >= self.min_visibility - 1e-9)
        kept, r = boxes[keep], r[keep]
        inside = (kept[:, :2] >= r[:, :2]).all(axis=1) & (kept[:, 2:] <= r[:, 2:]).all(axis=1)
        clipped_boxes = np.clip(kept, r[:, [0, 1, 0, 1]], r[:, [2, 3, 2, 3]])
        return EdgeResult(clipped_boxes, np.nonzero(keep)[0], ~inside, np.nonzero(touching & ~keep)[0])
