"""The edge-box policy: what happens to a box cut by a tile (or inference window) edge.

One object, used by tiling (which boxes go into a tile) and by prediction (which detections near a
window seam to trust), so training and inference agree on what a "visible enough" object is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EdgeResult:
    """Boxes that survive a region: clipped to it, with their indices into the input."""

    boxes: np.ndarray  # (K, 4) clipped to the region, same coordinate frame as the input
    index: np.ndarray  # (K,) indices of the kept boxes in the input
    clipped: np.ndarray  # (K,) bool: the kept box was cut by the region edge
    n_dropped: int  # boxes touching the region but less visible than min_visibility

    @property
    def n_clipped(self) -> int:
        return int(self.clipped.sum())


@dataclass(frozen=True)
class EdgePolicy:
    """Keep a box cut by a region edge (clipped) when at least `min_visibility` of its area is inside.

    min_visibility=0 keeps every box with any area inside; 1 keeps only boxes entirely inside.
    """

    min_visibility: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_visibility <= 1.0:
            raise ValueError(f"min_visibility must be in [0, 1], got {self.min_visibility}")

    @staticmethod
    def visibility(boxes: np.ndarray, region: tuple[float, float, float, float]) -> np.ndarray:
        """Fraction of each box's area inside `region` (x0, y0, x1, y1); 0 for degenerate boxes."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        rx0, ry0, rx1, ry1 = region
        iw = np.clip(np.minimum(boxes[:, 2], rx1) - np.maximum(boxes[:, 0], rx0), 0, None)
        ih = np.clip(np.minimum(boxes[:, 3], ry1) - np.maximum(boxes[:, 1], ry0), 0, None)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(area > 0, iw * ih / area, 0.0)

    def apply(self, boxes: np.ndarray, region: tuple[float, float, float, float]) -> EdgeResult:
        """Select and clip the boxes of one region (a tile window in scene pixels)."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        vis = self.visibility(boxes, region)
        touching = vis > 0
        # A tiny tolerance so a box exactly at the threshold (e.g. half inside at 0.5) is kept.
        keep = touching & (vis >= self.min_visibility - 1e-9)
        rx0, ry0, rx1, ry1 = region
        kept = boxes[keep]
        inside = (kept[:, 0] >= rx0) & (kept[:, 1] >= ry0) & (kept[:, 2] <= rx1) & (kept[:, 3] <= ry1)
        clipped_boxes = np.stack([np.clip(kept[:, 0], rx0, rx1), np.clip(kept[:, 1], ry0, ry1),
                                  np.clip(kept[:, 2], rx0, rx1), np.clip(kept[:, 3], ry0, ry1)], axis=1)
        return EdgeResult(clipped_boxes, np.nonzero(keep)[0], ~inside, int((touching & ~keep).sum()))
