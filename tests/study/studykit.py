"""Helpers shared by the study tests: a tiny config (tiny backbone, 64 px tiles) over synthetic scenes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CLASSES = ["crown", "roof"]


def tiny_config(runs_dir: Path, scenes: list[dict[str, str]], name: str = "study") -> dict[str, Any]:
    """A config that trains in about a second per few steps on a 2-core CPU."""
    return {
        "name": name,
        "runs_dir": str(runs_dir),
        "classes": CLASSES,
        "tiling": {"scenes": scenes, "tile_size": 64, "overlap": 0, "negative_ratio": 1.0, "shard_size": 8,
                   "workers": 1, "split": {"method": "scene"}},
        "data": {"batch_size": 2, "shuffle_buffer": 8, "augment": []},
        "model": {"backbone": "tiny", "fpn_channels": 16, "anchor_sizes": [8, 16, 32, 64, 128],
                  "rpn_batch_per_image": 32, "rpn_pre_nms_top_n_train": 64, "rpn_pre_nms_top_n_test": 64,
                  "rpn_post_nms_top_n_train": 32, "rpn_post_nms_top_n_test": 32, "roi_batch_per_image": 32,
                  "head_dim": 32, "max_detections": 20},
        "train": {"steps": 6, "jit_compile": False, "optimizer": {"name": "sgd", "learning_rate": 0.005},
                  "schedule": {"warmup_steps": 2}},
        "evaluate": {"max_dets": 100},
    }
