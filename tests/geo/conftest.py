"""Shared helpers for the geo tests: tiny synthetic scenes and configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Config, config_from_dict

REPO = Path(__file__).resolve().parents[2]
NEON = REPO / "data" / "neon-trees"
CLASSES = ["crown", "roof", "vehicle"]


def make_config(tmp_path: Path, scenes: list[dict[str, Any]], classes: list[str] | None = None,
                **tiling: Any) -> Config:
    """A config with tiny tiles, one worker (in-process: fast) and the given scenes."""
    split = tiling.pop("split", {"method": "scene", "val_fraction": 0.0, "test_fraction": 0.0})
    data = {
        "name": "t", "runs_dir": str(tmp_path / "runs"), "classes": classes or CLASSES,
        "tiling": {"scenes": [{k: str(v) if v is not None else None for k, v in s.items()} for s in scenes],
                   "tile_size": 64, "overlap": 16, "workers": 1, "negative_ratio": 1.0, "split": split,
                   **tiling},
    }
    return config_from_dict(data)


@pytest.fixture
def scene(tmp_path: Path):
    """A 160×128 uint8 RGB UTM scene with 6 objects and EPSG:4326 labels."""
    from pipeline.geo.synth import make_scene

    return make_scene(tmp_path / "scenes", "s0", 160, 128, seed=3, n_objects=6)
