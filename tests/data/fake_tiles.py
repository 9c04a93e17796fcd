"""Writes a fake tiles folder (shards, manifest.jsonl, stats.json, qa.json) with records.encode_tile.

Independent of the tiling stage's code on purpose: these files follow the on-disk contract only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.records import encode_tile


def make_tile(rng: np.random.Generator, size: int, channels: int, dtype: str, n_boxes: int) -> dict[str, Any]:
    """A noisy tile with `n_boxes` painted rectangles (each its own label 1..n, brighter than the background)."""
    top = 255 if dtype == "uint8" else 4000
    image = rng.integers(0, top // 4, (size, size, channels)).astype(dtype)
    boxes = []
    for _ in range(n_boxes):
        w, h = rng.integers(6, size // 3, 2)
        x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
        image[y0 : y0 + h, x0 : x0 + w] = rng.integers(top // 2, top, channels).astype(dtype)
        boxes.append([x0, y0, x0 + w, y0 + h])
    labels = np.arange(1, n_boxes + 1) if n_boxes else np.zeros(0, np.int64)
    return {"image": image, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "labels": labels}


def write_tiles_dir(
    root: Path,
    counts: dict[str, list[int]],
    *,
    dtype: str = "uint8",
    channels: int = 3,
    tile_size: int = 64,
    shard_size: int = 3,
    seed: int = 0,
) -> Path:
    """counts: split -> boxes per tile, e.g. {"train": [2, 0, 5], "val": [1]}. Returns the tiles folder."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    manifest, train_pixels, max_boxes = [], [], 0
    for split, box_counts in counts.items():
        tiles = [make_tile(rng, tile_size, channels, dtype, n) for n in box_counts]
        n_shards = max(1, -(-len(tiles) // shard_size))
        for s in range(n_shards):
            shard = f"{split}-{s:05d}-of-{n_shards:05d}.tfrecord"
            import tensorflow as tf

            with tf.io.TFRecordWriter(str(root / shard)) as writer:
                for i in range(s * shard_size, min(len(tiles), (s + 1) * shard_size)):
                    t = tiles[i]
                    tile_id = f"{split}_{i:03d}"
                    writer.write(encode_tile(t["image"], t["boxes"], t["labels"], tile_id, "scene0"))
                    manifest.append({
                        "id": tile_id, "scene": "scene0", "split": split,
                        "window": [i * tile_size, 0, tile_size, tile_size],
                        "transform": [0.1, 0, 500000 + i * tile_size * 0.1, 0, -0.1, 3000000],
                        "crs": "EPSG:32617", "n_boxes": len(t["boxes"]), "nodata_fraction": 0.0, "shard": shard,
                    })
                    max_boxes = max(max_boxes, len(t["boxes"]))
                    if split == "train":
                        train_pixels.append(t["image"].reshape(-1, channels))
    pixels = np.concatenate(train_pixels).astype(np.float64) if train_pixels else np.zeros((1, channels))
    low, high = np.percentile(pixels, 1, axis=0), np.percentile(pixels, 99, axis=0)
    clipped = np.clip(pixels, low, high)
    stats = {
        "dtype": dtype, "bands": list(range(1, channels + 1)), "channels": channels, "nodata": None,
        "tile_size": tile_size, "percentiles": [1, 99], "low": low.tolist(), "high": high.tolist(),
        "mean": clipped.mean(0).tolist(), "std": clipped.std(0).tolist(),
    }
    (root / "stats.json").write_text(json.dumps(stats))
    n_tiles = {s: len(counts.get(s, [])) for s in ("train", "val", "test")}
    qa = {
        "boxes": {"kept": sum(sum(c) for c in counts.values()), "clipped": 0, "dropped": 0},
        "tiles": {**n_tiles, "empty_kept": sum(c.count(0) for c in counts.values()), "empty_dropped": 0,
                  "nodata_skipped": 0, "straddling_dropped": 0},
        "class_counts": {"tree": sum(sum(c) for c in counts.values())},
        "max_boxes_per_tile": max_boxes, "invalid_geometries": 0, "labels_outside_raster": 0,
    }
    (root / "qa.json").write_text(json.dumps(qa))
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))
    return root
