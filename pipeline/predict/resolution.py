"""Predict at the pixel size the model was trained at (`predict.match_resolution`, on by default).

A detector learns objects at the size in pixels its training tiles showed them: trees of 4 m are 40 px
at 0.1 m, 20 px at 0.2 m. A scene flown higher or lower, or from another sensor, shows the same objects at
another size in pixels, and the model misses them. With the training pixel size stored in the export
(`pixel_size_m` of model_info.json, from the training tiles' georeferencing), scene inference resamples
every window to that pixel size before the model and maps the boxes back to scene pixels (window size
and overlap count training pixels: pipeline.predict.scene):

    scale = scene_scale(info, crs, transform)      # scene pixel size / training pixel size (1.0: as is)
    detector = Resampled(detector, scale)           # windows of tile/scale scene px, resized to ≤ tile px

Only ground pixel sizes in metres are compared: a scene or a model without a projected CRS in metres
(pixel coordinates only, or degrees) is predicted as it is. Within `TOLERANCE` (10 %) of the training
pixel size nothing is resampled (the training scale jitter covers it). Upsampling is bilinear,
downsampling averages (OpenCV's INTER_AREA). Memory stays flat: one batch of windows at a time.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TOLERANCE = 0.10  # relative difference of pixel sizes below which a scene is predicted as it is


def pixel_size_m(crs: str | None, transform: Sequence[float]) -> float | None:
    """Ground size in metres of a pixel (the mean of its two sides) of a raster with `crs` (text as in
    tile manifests) and affine `transform` (a, b, c, d, e, f); None without a projected CRS in metres."""
    if not crs:
        return None
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        parsed = CRS.from_user_input(crs)
        if not parsed.is_projected:
            return None
        _unit, factor = parsed.linear_units_factor
    except (CRSError, ValueError):
        return None
    a, b, _c, d, e, _f = (float(v) for v in transform[:6])
    size = (math.hypot(a, d) + math.hypot(b, e)) / 2 * float(factor)
    return size if size > 0 and math.isfinite(size) else None


def training_pixel_size(tiles_dir: Path) -> float | None:
    """The pixel size in metres of the training tiles (manifest.jsonl, split train); None when a training
    scene has no projected CRS in metres or the scenes differ by more than 1 %."""
    sizes: dict[str, float | None] = {}
    path = Path(tiles_dir) / "manifest.jsonl"
    if not path.is_file():
        return None
    with path.open() as f:
        for line in f:
            tile = json.loads(line)
            if tile.get("split") == "train" and tile.get("scene") not in sizes:
                sizes[tile.get("scene")] = pixel_size_m(tile.get("crs"), tile.get("transform") or ())
    values = list(sizes.values())
    if not values or any(v is None for v in values):
        return None
    low, high = min(values), max(values)  # type: ignore[type-var]
    return float(np.mean(values)) if high <= low * 1.01 else None


def scene_scale(info: dict[str, Any], crs: str | None, transform: Sequence[float]) -> float:
    """Scene pixel size / the model's training pixel size: the factor each window is resized by
    (2.0: a 0.2 m scene for a 0.1 m model, windows upsampled twice). 1.0 when either is unknown or they
    differ by at most TOLERANCE."""
    model = info.get("pixel_size_m")
    scene = pixel_size_m(crs, transform)
    if not model or scene is None:
        return 1.0
    scale = scene / float(model)
    return 1.0 if abs(scale - 1.0) <= TOLERANCE else scale


def scene_window(model_window: int, scale: float) -> int:
    """The window edge in scene pixels that covers `model_window` pixels at the training pixel size."""
    return max(1, math.floor(model_window / scale + 1e-9))


def resized_shape(height: int, width: int, scale: float, limit: int) -> tuple[int, int]:
    """(h, w) of a `height` x `width` scene window at the training pixel size, at most `limit` a side."""
    return (min(limit, max(1, round(height * scale))), min(limit, max(1, round(width * scale))))


def resize_images(images: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A batch (B, H, W, C) resized to `shape` (h, w): bilinear up, area-average down; dtype kept."""
    import cv2

    h, w = shape
    if images.shape[1:3] == (h, w):
        return images
    shrink = h < images.shape[1] or w < images.shape[2]
    method = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    work = images.astype(np.float32) if images.dtype.kind in "ui" else images
    out = np.empty((images.shape[0], h, w, images.shape[3]), work.dtype)
    for n in range(images.shape[0]):
        for k in range(0, images.shape[3], 4):  # OpenCV resizes at most 4 channels at a time reliably
            part = cv2.resize(np.ascontiguousarray(work[n, :, :, k:k + 4]), (w, h), interpolation=method)
            out[n, :, :, k:k + 4] = part.reshape(h, w, -1)
    if images.dtype.kind in "ui":
        limits = np.iinfo(images.dtype)
        out = np.clip(np.rint(out), limits.min, limits.max)
    return out.astype(images.dtype)


class Resampled:
    """Any Detector, fed windows resized by `scale` to the training pixel size; boxes come back in the
    window's own (scene) pixels. `scale` is read by scene inference to size its windows in scene pixels."""

    def __init__(self, detector: Any, scale: float) -> None:
        self.detector = detector
        self.info = detector.info
        self.scale = float(scale)

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        h, w = images.shape[1:3]
        rh, rw = resized_shape(h, w, self.scale, int(self.info["tile_size"]))
        out = {k: np.asarray(v) for k, v in self.detector.predict(resize_images(images, (rh, rw))).items()}
        boxes = out["boxes"].astype(np.float32).copy()
        boxes[..., [0, 2]] *= w / rw
        boxes[..., [1, 3]] *= h / rh
        out["boxes"] = np.minimum(boxes, np.array([w, h, w, h], np.float32))
        return out
