"""Helpers shared by the flow tests: a tiny config, a config writer, and stand-ins for the training and
evaluation stages (their own tests live in tests/train and tests/evaluate)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
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


def count_calls(monkeypatch: pytest.MonkeyPatch, module, name: str, calls: Counter, impl=None) -> None:
    """Replace module.name by a wrapper that counts calls (and runs `impl` or the original)."""
    target = impl or getattr(module, name)

    def wrapper(*args, **kwargs):
        calls[name] += 1
        return target(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def fake_training(config, tiles_dir, model_dir, resume=False):
    """Stand-in for run_training: the files the flow and the evaluation stage look at."""
    model_dir = Path(model_dir)
    (model_dir / "export").mkdir(parents=True, exist_ok=True)
    (model_dir / "export" / "model_info.json").write_text(json.dumps({"classes": list(config.classes)}))
    (model_dir / "train_log.jsonl").write_text(json.dumps({"step": config.train.steps, "loss": 1.0}) + "\n")
    (model_dir / "train_summary.json").write_text(json.dumps({"steps": config.train.steps}))
    return model_dir


def fake_evaluation(config, model_dir, tiles_dir, out_dir):
    """Stand-in for run_evaluation: a metrics.json in the documented shape."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_class = {c: {"AP": 0.25, "AP50": 0.5, "AP75": 0.2, "n_gt": 3, "n_det": 4} for c in config.classes}
    level = {"AP": 0.25, "AP50": 0.5, "AP75": 0.2, "per_class": per_class}
    (out_dir / "metrics.json").write_text(json.dumps({"scene": level, "tile": level}))
    return out_dir
