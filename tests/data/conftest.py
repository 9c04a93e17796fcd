"""Fixtures for the input-pipeline tests: small fake tiles folders and a matching config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipeline.config import Config

from .fake_tiles import write_tiles_dir

# boxes per tile; zeros are empty (negative) tiles
TRAIN_COUNTS = [3, 0, 5, 1, 2, 0, 4, 2, 1, 3]
VAL_COUNTS = [2, 0, 6, 1, 1]
TEST_COUNTS = [1, 2]


@pytest.fixture(scope="session")
def rgb_tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """uint8 RGB 64 px tiles: 10 train (2 empty), 5 val (1 empty), 2 test; 3 tiles per shard."""
    root = tmp_path_factory.mktemp("rgb") / "tiles"
    return write_tiles_dir(root, {"train": TRAIN_COUNTS, "val": VAL_COUNTS, "test": TEST_COUNTS})


@pytest.fixture(scope="session")
def multiband_tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """uint16 4-band 64 px tiles."""
    root = tmp_path_factory.mktemp("u16") / "tiles"
    return write_tiles_dir(root, {"train": [2, 0, 3, 1], "val": [1, 2]}, dtype="uint16", channels=4)


def make_config(tiles_dir: Path, **data: object) -> Config:
    """A config whose run dir holds `tiles_dir` (runs_dir/name/tiles), 64 px tiles, batch 4."""
    run_dir = tiles_dir.parent
    cfg = {
        "name": run_dir.name, "runs_dir": str(run_dir.parent),
        "tiling": {"tile_size": 64, "overlap": 8},
        "data": {"batch_size": 4, "shuffle_buffer": 8, **data},
    }
    return Config.model_validate(cfg)
