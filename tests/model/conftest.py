"""Shared tiny detector configs and synthetic tiles for the model tests."""

import numpy as np
import pytest

from pipeline.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """A detector small enough for CPU tests: tiny backbone, P2-P5, narrow heads, few samples."""
    base = {
        "backbone": "tiny", "fpn_channels": 32, "head_dim": 128, "min_level": 2, "max_level": 5,
        "anchor_sizes": [16, 32, 64, 128], "rpn_batch_per_image": 128, "roi_batch_per_image": 64,
        "rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 150, "rpn_pre_nms_top_n_test": 300,
        "rpn_post_nms_top_n_test": 100, "max_detections": 50,
    }
    base.update(overrides)
    return ModelConfig(**base)


def synthetic_tiles(n: int = 4, size: int = 128, seed: int = 0, max_boxes: int = 6):
    """Dark noisy tiles with bright squares (class 1) and circles (class 2) of 16-40 px; padded targets."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.0, 0.1, (n, size, size, 3)).astype(np.float32)
    boxes = np.zeros((n, max_boxes, 4), np.float32)
    labels = np.zeros((n, max_boxes), np.int32)
    counts = np.zeros(n, np.int32)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    for i in range(n):
        placed = []
        for _ in range(50):
            if len(placed) == rng.integers(3, max_boxes + 1):
                break
            side = rng.uniform(16, 40)
            x0, y0 = rng.uniform(0, size - side, 2)
            box = np.array([x0, y0, x0 + side, y0 + side])
            if any(min(box[2], p[2]) > max(box[0], p[0]) - 4 and min(box[3], p[3]) > max(box[1], p[1]) - 4
                   for p, _ in placed):
                continue  # keep objects apart
            cls = int(rng.integers(1, 3))
            if cls == 1:
                mask = (xx >= box[0]) & (xx < box[2]) & (yy >= box[1]) & (yy < box[3])
            else:
                r = side / 2
                mask = (xx - box[0] - r) ** 2 + (yy - box[1] - r) ** 2 <= r * r
            images[i][mask] += np.array([2.0, 1.5, 1.0] if cls == 1 else [1.0, 1.5, 2.0], np.float32)
            placed.append((box, cls))
        for j, (box, cls) in enumerate(placed):
            boxes[i, j], labels[i, j] = box, cls
        counts[i] = len(placed)
    return images, {"boxes": boxes, "labels": labels, "num_boxes": counts}


@pytest.fixture
def tiles():
    return synthetic_tiles()


@pytest.fixture
def make_config():
    """The tiny_config factory (fixtures rather than imports: tests/ is not a package)."""
    return tiny_config
