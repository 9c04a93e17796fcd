"""The tf.data pipeline (pipeline/data/dataset.py) and its one-line data errors (pipeline/data/explain.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pipeline.data.check import run_dataset_check
from pipeline.data.dataset import build_dataset
from pipeline.data.explain import checked_iter
from pipeline.data.records import decode_tile_numpy
from pipeline.data.stats import load_stats, normalize_numpy
from pipeline.data.tiles import tile_count
from pipeline.errors import SatdetError

from .conftest import TRAIN_COUNTS, VAL_COUNTS, make_config

MAX_BOXES = max(TRAIN_COUNTS + VAL_COUNTS)


def _tiles(tiles_dir: Path, split: str) -> dict[str, dict]:
    out = {}
    for shard in sorted(tiles_dir.glob(f"{split}-*.tfrecord")):
        for record in tf.data.TFRecordDataset(str(shard)).as_numpy_iterator():
            tile = decode_tile_numpy(record)
            out[tile["id"]] = tile
    return out


def _copy(tiles_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiles_dir, tmp_path / "run" / "tiles"))


def _batches(ds: tf.data.Dataset, n: int) -> list:
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds.take(n)]


def test_training_batches_are_static_normalised_and_padded(rgb_tiles: Path) -> None:
    ds = build_dataset(rgb_tiles, "train", make_config(rgb_tiles), training=True)
    images_spec, targets_spec = ds.element_spec
    assert images_spec.shape == (4, 64, 64, 3) and images_spec.dtype == tf.float32
    assert targets_spec["boxes"].shape == (4, MAX_BOXES, 4) and targets_spec["labels"].dtype == tf.int32
    assert targets_spec["num_boxes"].shape == (4,)
    counts = []
    for images, t in _batches(ds, 6):  # 24 tiles: more than two epochs of 10, so repeat works
        assert np.isfinite(images).all() and abs(images.mean()) < 1.5
        for boxes, labels, n in zip(t["boxes"], t["labels"], t["num_boxes"]):
            counts.append(int(n))
            assert (labels[:n] >= 1).all() and (labels[n:] == 0).all()
            assert (boxes[n:] == 0).all()
            assert (boxes[:n, 2] > boxes[:n, 0]).all() and (boxes[:n, 3] > boxes[:n, 1]).all()
            assert (boxes[:n] >= -1e-3).all() and (boxes[:n] <= 64 + 1e-3).all()
    assert 0 in counts and max(counts) == max(TRAIN_COUNTS)  # empty tiles flow through; nothing lost


def test_validation_yields_every_tile_once_unaugmented_with_the_remainder(rgb_tiles: Path) -> None:
    stats = load_stats(rgb_tiles)
    tiles = _tiles(rgb_tiles, "val")
    ds = build_dataset(rgb_tiles, "val", make_config(rgb_tiles), training=False, with_ids=True)
    batches = _batches(ds, 10)
    assert [len(b[0]) for b in batches] == [4, 1]  # 5 val tiles, batch 4: the last batch is smaller
    seen = []
    for images, t in batches:
        for image, boxes, labels, n, tile_id in zip(images, t["boxes"], t["labels"], t["num_boxes"], t["tile_id"]):
            tile = tiles[tile_id.decode()]
            seen.append(tile["id"])
            np.testing.assert_allclose(image, normalize_numpy(tile["image"], stats), rtol=1e-5, atol=1e-5)
            assert n == len(tile["boxes"])
            np.testing.assert_array_equal(boxes[:n], tile["boxes"])
            np.testing.assert_array_equal(labels[:n], tile["labels"])
            assert (boxes[n:] == 0).all() and (labels[n:] == 0).all()
    assert sorted(seen) == sorted(tiles) and "val_001" in seen  # val_001 is the empty tile
    assert tile_count(rgb_tiles, "val") == len(VAL_COUNTS)


def test_same_seed_gives_the_same_batches(rgb_tiles: Path) -> None:
    first = _batches(build_dataset(rgb_tiles, "train", make_config(rgb_tiles, seed=5), training=True), 4)
    again = _batches(build_dataset(rgb_tiles, "train", make_config(rgb_tiles, seed=5), training=True), 4)
    other = _batches(build_dataset(rgb_tiles, "train", make_config(rgb_tiles, seed=6), training=True), 4)
    for a, b in zip(first, again):
        tf.nest.map_structure(np.testing.assert_array_equal, a, b)
    assert any(not np.array_equal(a[0], c[0]) for a, c in zip(first, other))


def test_start_batch_continues_the_same_stream(rgb_tiles: Path) -> None:
    cfg = make_config(rgb_tiles, seed=1)
    full = _batches(build_dataset(rgb_tiles, "train", cfg, training=True), 5)
    resumed = _batches(build_dataset(rgb_tiles, "train", cfg, training=True, start_batch=3), 2)
    for a, b in zip(full[3:], resumed):
        tf.nest.map_structure(np.testing.assert_array_equal, a, b)


def test_without_augmentation_training_images_are_the_normalised_tiles(rgb_tiles: Path) -> None:
    stats = load_stats(rgb_tiles)
    expected = {tid: normalize_numpy(t["image"], stats) for tid, t in _tiles(rgb_tiles, "train").items()}
    ds = build_dataset(rgb_tiles, "train", make_config(rgb_tiles, augment=[]), training=True, with_ids=True)
    for images, t in _batches(ds, 3):
        for image, tile_id in zip(images, t["tile_id"]):
            np.testing.assert_allclose(image, expected[tile_id.decode()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixture", ["rgb_tiles", "multiband_tiles"])
def test_augmented_training_images_are_the_normalised_augmented_tiles(fixture: str, request: pytest.FixtureRequest
                                                                      ) -> None:
    tiles_dir = request.getfixturevalue(fixture)
    stats = load_stats(tiles_dir)
    tiles = _tiles(tiles_dir, "train")
    flip = [{"name": "HorizontalFlip", "params": {"p": 1.0}}]
    ds = build_dataset(tiles_dir, "train", make_config(tiles_dir, augment=flip, batch_size=2), training=True,
                       with_ids=True)
    for images, t in _batches(ds, 2):
        for image, boxes, n, tile_id in zip(images, t["boxes"], t["num_boxes"], t["tile_id"]):
            tile = tiles[tile_id.decode()]
            np.testing.assert_allclose(image, normalize_numpy(tile["image"][:, ::-1], stats), rtol=1e-5, atol=1e-5)
            flipped = tile["boxes"][:, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [64, 0, 64, 0]
            np.testing.assert_allclose(boxes[:n], flipped, atol=1e-3)


def test_multiband_uint16_tiles_train_with_default_augmentations(multiband_tiles: Path) -> None:
    cfg = make_config(multiband_tiles, batch_size=2)
    images, t = _batches(build_dataset(multiband_tiles, "train", cfg, training=True), 3)[-1]
    assert images.shape == (2, 64, 64, 4) and np.isfinite(images).all()
    assert t["boxes"].shape == (2, 3, 4)


def _corrupt(path: Path, truncate: bool) -> None:
    data = path.read_bytes()
    if truncate:
        path.write_bytes(data[: len(data) // 2])
    else:
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :])


@pytest.mark.parametrize("truncate", [False, True], ids=["bit_flips", "truncated"])
def test_corrupted_shard_is_named(rgb_tiles: Path, tmp_path: Path, truncate: bool) -> None:
    tiles_dir = _copy(rgb_tiles, tmp_path)
    bad = tiles_dir / "train-00002-of-00004.tfrecord"
    _corrupt(bad, truncate)
    cfg = make_config(tiles_dir)
    with pytest.raises(SatdetError) as info:
        for _ in checked_iter(build_dataset(tiles_dir, "train", cfg, training=True).take(20), tiles_dir, "train"):
            pass
    assert str(bad) in str(info.value) and "corrupt" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SatdetError, match="train-00002-of-00004.tfrecord: corrupt"):
        run_dataset_check(cfg, tiles_dir)


def test_too_many_boxes_names_the_tile(rgb_tiles: Path, tmp_path: Path) -> None:
    cfg = make_config(rgb_tiles, max_boxes=3)
    with pytest.raises(SatdetError, match=r"tile 'train_002' has 5 boxes, more than max_boxes=3"):
        build_dataset(rgb_tiles, "train", cfg, training=True)
    # without the manifest to warn us, the in-graph check still names the tile
    tiles_dir = _copy(rgb_tiles, tmp_path)
    (tiles_dir / "manifest.jsonl").unlink()
    ds = build_dataset(tiles_dir, "train", make_config(tiles_dir, max_boxes=3, augment=[]), training=False)
    with pytest.raises(SatdetError, match=r"tile 'train_002' is 64x64 px with 5 boxes; expected .* at most 3 boxes"):
        list(checked_iter(ds, tiles_dir, "train"))


def test_missing_tiles_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SatdetError, match="stats.json: not found; run the tiling stage"):
        build_dataset(tmp_path, "train", make_config(tmp_path / "tiles"), training=True)


def test_errors_raised_inside_augmentation_keep_their_message(rgb_tiles: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.data import augment

    def broken(self, image, boxes, labels, seed):
        raise SatdetError("data.augment changed the tile size to 10x10 (tiles are 64)")

    ds = build_dataset(rgb_tiles, "train", make_config(rgb_tiles), training=True)
    monkeypatch.setattr(augment.Augmenter, "__call__", broken)
    with pytest.raises(SatdetError, match=r"^data.augment changed the tile size to 10x10 \(tiles are 64\)$"):
        next(checked_iter(ds, rgb_tiles, "train"))
