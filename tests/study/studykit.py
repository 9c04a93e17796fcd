"""Helpers shared by the study tests: a tiny config (tiny backbone, 64 px tiles) over synthetic scenes."""

from __future__ import annotations

import json
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


def boom(config: Any, tiles_dir: Path, model_dir: Path) -> dict[str, Any]:
    raise RuntimeError("boom: the trainer crashed")


def fake_train_run(config: Any, tiles_dir: Path, model_dir: Path) -> dict[str, Any]:
    """Stand-in for `runner.train_run` (bookkeeping tests, no TensorFlow): loss 2/step, norm 3; the `agc`
    run raises; the `value` run's loss climbs (1 + step: finite, but a blow-up)."""
    if config.train.clip.strategy == "agc":
        boom(config, tiles_dir, model_dir)
    steps = config.train.steps
    climbs = config.train.clip.strategy == "value"
    lines = [{"step": i, "loss": 1.0 + i if climbs else 2.0 / i, "grad_norm_before": 3.0, "grad_norm_after": 3.0}
             for i in range(1, steps + 1)]
    (Path(model_dir) / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return {"step": steps, "stop_reason": "steps", "skipped_steps": 0, "clip_fraction": 0.0,
            "final_loss": 2.0 / steps, "wall_s": 0.1, "val_ap50": 0.25, "val_s": 0.01, "device": "CPU"}


def write_config(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
