"""The dataset stage's check of a tiles folder (pipeline/data/check.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.data.check import run_dataset_check
from pipeline.errors import SatdetError

from .conftest import TRAIN_COUNTS, VAL_COUNTS, make_config

MAX_BOXES = max(TRAIN_COUNTS + VAL_COUNTS)


def _copy(tiles_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiles_dir, tmp_path / "run" / "tiles"))


def test_dataset_check_reports_the_splits(rgb_tiles: Path, tmp_path: Path) -> None:
    tiles_dir = _copy(rgb_tiles, tmp_path)
    report = json.loads(run_dataset_check(make_config(tiles_dir), tiles_dir).read_text())
    assert report["max_boxes"] == MAX_BOXES and report["max_boxes_source"] == "qa.json"
    assert (report["tile_size"], report["channels"], report["dtype"]) == (64, 3, "uint8")
    assert report["splits"]["train"] == {
        "tiles": 10, "empty_tiles": 2, "boxes": sum(TRAIN_COUNTS),
        "shards": [f"train-{i:05d}-of-00004.tfrecord" for i in range(4)],
    }
    assert report["splits"]["val"]["tiles"] == 5 and report["steps_per_epoch"] == 2
    assert report["augment"][0] == "HorizontalFlip"


def test_dataset_check_fails_on_an_empty_train_split(tmp_path: Path) -> None:
    from .fake_tiles import write_tiles_dir

    tiles_dir = write_tiles_dir(tmp_path / "run" / "tiles", {"train": [], "val": [1, 2]})
    with pytest.raises(SatdetError, match="the train split has no tiles"):
        run_dataset_check(make_config(tiles_dir), tiles_dir)


def test_dataset_check_needs_val_only_when_training_uses_it(tmp_path: Path) -> None:
    from .fake_tiles import write_tiles_dir

    tiles_dir = write_tiles_dir(tmp_path / "run" / "tiles", {"train": [1, 2, 0, 1]})
    cfg = make_config(tiles_dir)
    report = json.loads(run_dataset_check(cfg, tiles_dir).read_text())
    assert "val split is empty: no validation during training" in report["warnings"]
    cfg.train.eval_every = 50
    with pytest.raises(SatdetError, match="the val split has no tiles but train.eval_every"):
        run_dataset_check(cfg, tiles_dir)


def test_dataset_check_catches_a_manifest_that_disagrees_with_the_shards(rgb_tiles: Path, tmp_path: Path) -> None:
    tiles_dir = _copy(rgb_tiles, tmp_path)
    manifest = tiles_dir / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[1:]))
    with pytest.raises(SatdetError, match="train shards hold 10 tiles but manifest.jsonl lists 9"):
        run_dataset_check(make_config(tiles_dir), tiles_dir)
    (tiles_dir / "train-00001-of-00004.tfrecord").unlink()
    manifest.write_text("".join(lines))
    with pytest.raises(SatdetError, match="train-00001-of-00004.tfrecord: listed in manifest.jsonl but missing"):
        run_dataset_check(make_config(tiles_dir), tiles_dir)


def test_tiles_that_disagree_with_stats_are_named(rgb_tiles: Path, tmp_path: Path) -> None:
    tiles_dir = _copy(rgb_tiles, tmp_path)
    stats = json.loads((tiles_dir / "stats.json").read_text())
    (tiles_dir / "stats.json").write_text(json.dumps({**stats, "dtype": "uint16"}))
    with pytest.raises(SatdetError, match=r"tile 'train_000' has dtype 'uint8' with 3 bands but stats.json says uint16"):
        run_dataset_check(make_config(tiles_dir), tiles_dir)

