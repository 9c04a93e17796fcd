"""Mosaic of four training tiles at their own scale (after YOLOv4's mosaic, without the down-scaling).

    bank = TileBank.from_shards(train_shards)               # the training tiles, read once
    mosaic = Mosaic(bank, p=0.5)                             # `data.augment: [{name: Mosaic, ...}]`
    image, boxes, labels = mosaic(image, boxes, labels, rng)

Why: one or two training scenes give few contexts; a mosaic shows each crown beside parts of other
tiles (other ground, other light, other neighbours) and cuts crowns at random places, four contexts
per sample.

How, for fixed-size tiles on a static-shape training step: a random centre splits the tile into four
rectangles (each 25-75% of the side); the tile itself fills a random one, three random bank tiles the
others. Each rectangle is cut from a random place of its source at the source's own scale — objects
keep their size in pixels, which is what ground-sampled imagery needs (YOLO's mosaic halves every
object). A box cut by a rectangle's edge survives when at least `min_visibility` of it stays in view,
clipped to the rectangle (the tiling's edge policy, pipeline.geo.edges). Runs on the raw tile, before CopyPaste and
the albumentations transforms, in the tiles' dtype.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import SatdetError
from pipeline.geo.edges import EdgePolicy


@dataclass(frozen=True)
class TileBank:
    """Whole tiles (H, W, C), their boxes (N, 4) xyxy and labels (N,), in the tiles' dtype."""

    images: tuple[np.ndarray, ...]
    boxes: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_tiles(cls, tiles: Iterable[dict], *, max_tiles: int = 1000, max_bytes: int = 512 << 20) -> TileBank:
        """The first tiles (tile order), at most `max_tiles` of them and `max_bytes` of pixels."""
        images, boxes, labels = [], [], []
        size = 0
        for tile in tiles:
            size += np.asarray(tile["image"]).nbytes
            if len(images) >= max_tiles or (images and size > max_bytes):
                break
            images.append(np.asarray(tile["image"]))
            boxes.append(np.asarray(tile["boxes"], np.float32).reshape(-1, 4))
            labels.append(np.asarray(tile["labels"]).reshape(-1))
        return cls(tuple(images), tuple(boxes), tuple(labels))

    @classmethod
    def from_shards(cls, files: Iterable[str | Path], *, max_tiles: int = 1000, max_bytes: int = 512 << 20) -> TileBank:
        """The tiles of these TFRecord shards (the training split), read once in NumPy."""
        import tensorflow as tf

        from pipeline.data.records import decode_tile_numpy

        files = [str(f) for f in sorted(files)]
        records = tf.data.TFRecordDataset(files).take(max_tiles).as_numpy_iterator() if files else iter(())
        return cls.from_tiles((decode_tile_numpy(r) for r in records), max_tiles=max_tiles, max_bytes=max_bytes)


class Mosaic:
    """With probability `p`, fill the tile with four rectangles from it and three bank tiles (module docstring)."""

    def __init__(self, bank: TileBank, *, p: float = 0.5, min_visibility: float = 0.5,
                 centre_range: tuple[float, float] = (0.25, 0.75)) -> None:
        if not 0 <= p <= 1:
            raise SatdetError(f"Mosaic: p must be in [0, 1], got {p}")
        if not 0 <= min_visibility <= 1:
            raise SatdetError(f"Mosaic: min_visibility must be in [0, 1], got {min_visibility}")
        lo, hi = (float(v) for v in centre_range)
        if not 0 < lo <= hi < 1:
            raise SatdetError(f"Mosaic: centre_range must be two fractions 0 < low <= high < 1, got {centre_range}")
        self.bank, self.p, self.min_visibility, self.centre_range = bank, float(p), float(min_visibility), (lo, hi)
        self.edges = EdgePolicy(self.min_visibility)

    def _sources(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator
                 ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Four (image, boxes, labels): the tile in a random slot, random bank tiles of its shape elsewhere."""
        own = int(rng.integers(4))
        out = []
        for slot in range(4):
            if slot == own:
                out.append((image, boxes, labels))
                continue
            i = int(rng.integers(len(self.bank)))
            if self.bank.images[i].shape != image.shape or self.bank.images[i].dtype != image.dtype:
                out.append((image, boxes, labels))  # a bank tile that does not fit: use the tile again
            else:
                out.append((self.bank.images[i], self.bank.boxes[i], self.bank.labels[i]))
        return out

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                 max_boxes: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The mosaic, its boxes and labels (inputs unchanged); the tile as is when the mosaic would carry
        more than `max_boxes` boxes (the padded target size) or the bank is empty."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        labels = np.asarray(labels).reshape(-1)
        if len(self.bank) == 0 or rng.random() >= self.p:
            return image, boxes, labels
        height, width = image.shape[:2]
        lo, hi = self.centre_range
        cx, cy = round(rng.uniform(lo, hi) * width), round(rng.uniform(lo, hi) * height)
        slots = [(0, 0, cx, cy), (cx, 0, width, cy), (0, cy, cx, height), (cx, cy, width, height)]
        out = np.empty_like(image)
        new_boxes, new_labels = [], []
        for (x0, y0, x1, y1), (src, src_boxes, src_labels) in zip(slots, self._sources(image, boxes, labels, rng)):
            w, h = x1 - x0, y1 - y0
            if w == 0 or h == 0:
                continue
            sx, sy = int(rng.integers(width - w + 1)), int(rng.integers(height - h + 1))
            out[y0:y1, x0:x1] = src[sy : sy + h, sx : sx + w]
            moved = np.asarray(src_boxes, np.float32).reshape(-1, 4) + np.array([x0 - sx, y0 - sy] * 2, np.float32)
            kept = self.edges.apply(moved, (x0, y0, x1, y1))
            new_boxes.append(kept.boxes.astype(np.float32))
            new_labels.append(np.asarray(src_labels).reshape(-1)[kept.index].astype(labels.dtype))
        out_boxes, out_labels = np.concatenate(new_boxes), np.concatenate(new_labels)
        if max_boxes is not None and len(out_boxes) > max_boxes:
            return image, boxes, labels
        return out, out_boxes, out_labels
