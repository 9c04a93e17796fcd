"""Test doubles for scene inference: a 'detector' that finds bright squares in the pixels it is given."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import rasterio
from rasterio.transform import from_origin

ORIGIN = (440000.0, 3280000.0)  # UTM 17N, like the NEON OSBS scenes
PIXEL = 0.1


class BrightSquareDetector:
    """Reports each connected blob of pixels > 100 (band 1) as a box; score = mean brightness / 255.

    Objects cut by the window edge come out truncated, exactly like a real detector's clipped boxes.
    """

    def __init__(self, tile_size: int = 64, dtype: str = "uint8", bands: int = 3, max_det: int = 50) -> None:
        self.info = {"tile_size": tile_size, "dtype": dtype, "channels": bands, "bands": list(range(1, bands + 1)),
                     "classes": ["tree", "car"]}
        self.max_det = max_det
        self.batches: list[tuple[int, ...]] = []

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.batches.append(images.shape)
        b = len(images)
        boxes = np.zeros((b, self.max_det, 4), np.float32)
        scores = np.zeros((b, self.max_det), np.float32)
        classes = np.zeros((b, self.max_det), np.int32)
        num = np.zeros(b, np.int32)
        for i, img in enumerate(images):
            band = img[..., 0]
            n, _, stats, _ = cv2.connectedComponentsWithStats((band > 100).astype(np.uint8), connectivity=4)
            for k in range(1, min(n, self.max_det + 1)):
                x, y, w, h, _ = stats[k]
                j = num[i]
                boxes[i, j] = (x, y, x + w, y + h)
                scores[i, j] = band[y:y + h, x:x + w].mean() / 255.0
                classes[i, j] = 2 if img[y, x, 1] > 100 else 1  # green channel bright -> class 2
                num[i] += 1
        return {"boxes": boxes, "scores": scores, "classes": classes, "num_detections": num}


def write_scene(path: Path, width: int, height: int, squares: list[tuple[int, int, int, int]],
                value: int = 200, nodata: float | None = None, extra: list[tuple[int, int, int, int, int]] = (),
                class2: list[int] = ()) -> Path:
    """A 3-band uint8 GeoTIFF with bright squares (x0, y0, x1, y1); `extra` = (x0, y0, x1, y1, value) fills."""
    img = np.full((3, height, width), 20, np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(squares):
        img[0, y0:y1, x0:x1] = value
        if i in class2:
            img[1, y0:y1, x0:x1] = value
    for x0, y0, x1, y1, v in extra:
        img[:, y0:y1, x0:x1] = v
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                       crs="EPSG:32617", transform=from_origin(*ORIGIN, PIXEL, PIXEL), nodata=nodata) as ds:
        ds.write(img)
    return path


class SizedSquareDetector(BrightSquareDetector):
    """Finds bright squares only when they are 16-40 px a side in the pixels it is given: a model that
    learned objects at one size, as a real detector does."""

    def predict(self, images):
        out = super().predict(images)
        b = out["boxes"]
        side = np.minimum(b[..., 2] - b[..., 0], b[..., 3] - b[..., 1])
        keep = (side >= 16) & (side <= 40)
        for i in range(len(images)):
            k = keep[i, : out["num_detections"][i]]
            n = int(k.sum())
            for key in ("boxes", "scores", "classes"):
                valid = out[key][i, : out["num_detections"][i]][k]
                out[key][i] = 0
                out[key][i, :n] = valid
            out["num_detections"][i] = n
        return out


def write_scene_at(path: Path, size_px: int, pixel: float, squares: list[tuple[int, int, int, int]],
                   crs: str = "EPSG:32617") -> Path:
    """A square 3-band uint8 GeoTIFF of `pixel` m pixels with bright squares (band 1)."""
    img = np.full((3, size_px, size_px), 20, np.uint8)
    for x0, y0, x1, y1 in squares:
        img[0, y0:y1, x0:x1] = 200
    with rasterio.open(path, "w", driver="GTiff", width=size_px, height=size_px, count=3, dtype="uint8",
                       crs=crs, transform=from_origin(*ORIGIN, pixel, pixel)) as ds:
        ds.write(img)
    return path
