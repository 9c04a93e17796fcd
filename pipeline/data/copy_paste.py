"""Copy-paste of objects (Ghiasi et al. 2021, "Simple Copy-Paste"), for boxes without masks.

    bank = ObjectBank.from_shards(train_shards)            # the objects of the training tiles
    paste = CopyPaste(bank, p=0.5, max_objects=6)          # `data.augment: [{name: CopyPaste, ...}]`
    image, boxes, labels = paste(image, boxes, labels, rng)

Why: with one or two training scenes, a crown is always seen in the context of its own scene (its
neighbours, its ground, its shadows). Pasting crowns of the training tiles at random places of other
tiles — on bare ground, grass, beside other crowns, on negative tiles — with their own brightness jitter
teaches the detector the object, not its surroundings.

How, for box labels (there are no instance masks): each object is cut as its box, and blended into the
target through a feathered ellipse inscribed in the box (crowns are round; the box corners are the
source's ground and would teach a sharp rectangular edge). Placement is rejected (up to `_TRIES` times)
where the new box would cover more than `max_overlap` of an existing box or of another pasted one, so
every label stays visible. Pasted objects keep their size (the albumentations transforms that follow —
flips, scale jitter, colour — apply to them with the rest of the tile). Runs on the raw tile, before
normalisation, in the tiles' dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import SatdetError

log = logging.getLogger(__name__)

_TRIES = 10  # placements tried per object before giving it up
_FEATHER = 0.2  # width of the blended ring, as a fraction of the ellipse's radius


@dataclass(frozen=True)
class ObjectBank:
    """Object crops (H, W, C) in the tiles' dtype and their class labels."""

    crops: tuple[np.ndarray, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.crops)

    @classmethod
    def from_tiles(cls, tiles: Iterable[dict], *, min_size: int = 8, max_objects: int = 4000) -> ObjectBank:
        """Crops of every box of at least `min_size` px a side without nodata, up to `max_objects` (tile order)."""
        crops: list[np.ndarray] = []
        labels: list[int] = []
        for tile in tiles:
            image = tile["image"]
            h, w = image.shape[:2]
            for (x0, y0, x1, y1), label in zip(np.asarray(tile["boxes"]).reshape(-1, 4), tile["labels"]):
                c0, r0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
                c1, r1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
                crop = image[r0:r1, c0:c1]
                if c1 - c0 < min_size or r1 - r0 < min_size or (crop.dtype.kind == "f" and not np.isfinite(crop).all()):
                    continue  # too small, or touching nodata (NaN in float tiles)
                crops.append(np.array(crop))
                labels.append(int(label))
                if len(crops) >= max_objects:
                    return cls(tuple(crops), tuple(labels))
        return cls(tuple(crops), tuple(labels))

    @classmethod
    def from_shards(cls, files: Iterable[str | Path], *, max_tiles: int = 2000, **kwargs: int) -> ObjectBank:
        """The objects of the tiles in these TFRecord shards (the training split), read once in NumPy."""
        import tensorflow as tf

        from pipeline.data.records import decode_tile_numpy

        files = [str(f) for f in sorted(files)]
        records = tf.data.TFRecordDataset(files).take(max_tiles).as_numpy_iterator() if files else iter(())
        return cls.from_tiles((decode_tile_numpy(r) for r in records), **kwargs)


def ellipse_alpha(height: int, width: int) -> np.ndarray:
    """(H, W, 1) float32 blend weights: 1 inside the inscribed ellipse, fading to 0 over its outer ring."""
    ys = (np.arange(height, dtype=np.float32) + 0.5) / height * 2 - 1
    xs = (np.arange(width, dtype=np.float32) + 0.5) / width * 2 - 1
    radius = np.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2)
    return np.clip((1.0 - radius) / _FEATHER + 0.5, 0.0, 1.0)[:, :, None]


def _covered_fraction(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """For each of `others` (N, 4): the share of its area that `box` covers, and of `box` it covers."""
    if len(others) == 0:
        return np.zeros(0, np.float32)
    ix = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = ix * iy
    area_others = np.maximum((others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1]), 1e-6)
    area_box = max(float((box[2] - box[0]) * (box[3] - box[1])), 1e-6)
    return np.maximum(inter / area_others, inter / area_box)


class CopyPaste:
    """Paste 1..`max_objects` bank objects into a tile with probability `p` (see the module docstring)."""

    def __init__(self, bank: ObjectBank, *, p: float = 0.5, max_objects: int = 6, max_overlap: float = 0.2,
                 brightness_limit: float = 0.2) -> None:
        if not 0 <= p <= 1:
            raise SatdetError(f"CopyPaste: p must be in [0, 1], got {p}")
        if max_objects < 1:
            raise SatdetError(f"CopyPaste: max_objects must be at least 1, got {max_objects}")
        if not 0 <= max_overlap < 1:
            raise SatdetError(f"CopyPaste: max_overlap must be in [0, 1), got {max_overlap}")
        if not 0 <= brightness_limit < 1:
            raise SatdetError(f"CopyPaste: brightness_limit must be in [0, 1), got {brightness_limit}")
        self.bank, self.p, self.max_objects = bank, float(p), int(max_objects)
        self.max_overlap, self.brightness_limit = float(max_overlap), float(brightness_limit)

    def _object(self, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """A random bank object, randomly rotated by 90° steps and flipped."""
        i = int(rng.integers(len(self.bank)))
        crop = np.rot90(self.bank.crops[i], int(rng.integers(4)))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        return crop, self.bank.labels[i]

    def _blend(self, image: np.ndarray, crop: np.ndarray, x0: int, y0: int, rng: np.random.Generator) -> None:
        h, w = crop.shape[:2]
        gain = 1.0 + rng.uniform(-self.brightness_limit, self.brightness_limit)
        alpha = ellipse_alpha(h, w)
        target = image[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
        mixed = alpha * (crop.astype(np.float32) * gain) + (1.0 - alpha) * target
        if np.issubdtype(image.dtype, np.integer):
            info = np.iinfo(image.dtype)
            mixed = np.clip(np.rint(mixed), info.min, info.max)
        image[y0 : y0 + h, x0 : x0 + w] = mixed.astype(image.dtype)

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                 max_boxes: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The tile with pasted objects, its boxes with theirs appended, and the labels (inputs unchanged).

        `max_boxes`: the most boxes a tile may carry (the padded target size); pasting stops there.
        """
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        labels = np.asarray(labels).reshape(-1)
        room = self.max_objects if max_boxes is None else min(self.max_objects, max_boxes - len(boxes))
        if len(self.bank) == 0 or room < 1 or rng.random() >= self.p:
            return image, boxes, labels
        out = np.array(image)
        height, width = out.shape[:2]
        new_boxes, new_labels = [boxes], [labels]
        taken = boxes
        for _ in range(int(rng.integers(1, room + 1))):
            crop, label = self._object(rng)
            h, w = crop.shape[:2]
            if h > height or w > width:
                continue
            for _ in range(_TRIES):
                x0, y0 = int(rng.integers(width - w + 1)), int(rng.integers(height - h + 1))
                box = np.array([x0, y0, x0 + w, y0 + h], np.float32)
                if not np.any(_covered_fraction(box, taken) > self.max_overlap):
                    self._blend(out, crop, x0, y0, rng)
                    taken = np.concatenate([taken, box[None]])
                    new_boxes.append(box[None])
                    new_labels.append(np.array([label], labels.dtype))
                    break
        return out, np.concatenate(new_boxes), np.concatenate(new_labels)
