"""Helpers shared by the flow tests: a tiny config and a config writer."""

from __future__ import annotations

from pathlib import Path

import yaml

CLASSES = ["crown", "roof"]
SPLITS = ["train", "val", "test"]


def tiny_config(runs_dir: Path, scenes: list[dict[str, str]], name: str = "flowtest") -> dict:
    """A config small enough to train in seconds on a CPU (tiny backbone, 64 px tiles, a few steps)."""
    return {
        "name": name,
        "runs_dir": str(runs_dir),
        "classes": CLASSES,
        "tiling": {
            "scenes": scenes,
            "tile_size": 64,
            "overlap": 0,
            "negative_ratio": 1.0,
            "shard_size": 8,
            "workers": 1,
            "split": {"method": "scene"},
        },
        "data": {"batch_size": 2, "shuffle_buffer": 8, "augment": [{"name": "HorizontalFlip", "params": {"p": 0.5}}]},
        "model": {
            "backbone": "tiny",
            "fpn_channels": 16,
            "min_level": 3,  # P3-P5 only: each level adds ops to every traced graph (train, validation, export)
            "max_level": 5,
            "anchor_sizes": [16, 32, 64],
            "rpn_batch_per_image": 32,
            "rpn_pre_nms_top_n_train": 64,
            "rpn_pre_nms_top_n_test": 64,
            "rpn_post_nms_top_n_train": 32,
            "rpn_post_nms_top_n_test": 32,
            "roi_batch_per_image": 32,
            "head_dim": 32,
            "max_detections": 20,
        },
        "train": {
            "steps": 4,
            "log_every": 1,
            "checkpoint_every": 2,
            "jit_compile": False,
            "optimizer": {"name": "sgd", "learning_rate": 0.005},
            "schedule": {"warmup_steps": 1},
        },
        "evaluate": {"split": "test", "max_dets": 100, "examples": 1},
        "predict": {"batch_size": 2},
    }


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
