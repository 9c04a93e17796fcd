"""Mosaic of training tiles (pipeline/data/mosaic.py) and its place in the augmentation list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data.augment import build_augmenter
from pipeline.data.dataset import build_dataset
from pipeline.data.mosaic import Mosaic, TileBank
from pipeline.data.stats import load_stats
from pipeline.errors import SatdetError
from pipeline.geo.edges import EdgePolicy

from .conftest import TRAIN_COUNTS, make_config

SIZE = 60


def _tile(colour: int, box: tuple[float, float, float, float] | None, label: int = 1) -> dict:
    """A tile of one grey level with at most one box."""
    boxes = np.array([box] if box else np.zeros((0, 4)), np.float32).reshape(-1, 4)
    return {"image": np.full((SIZE, SIZE, 3), colour, np.uint8), "boxes": boxes,
            "labels": np.full(len(boxes), label, np.int64)}


def _bank() -> TileBank:
    return TileBank.from_tiles([_tile(10 * (i + 1), (20, 22, 32, 30), label=i + 1) for i in range(5)])


def test_mosaic_cuts_boxes_with_the_tiling_edge_policy() -> None:
    boxes = np.array([[10, 10, 20, 20], [25, 0, 35, 10], [28, 0, 38, 10], [0, 0, 30, 30]], np.float32)
    window = (0, 0, 30, 30)

    def cut(min_visibility: float) -> np.ndarray:
        return Mosaic(_bank(), min_visibility=min_visibility).edges.apply(boxes, window).index

    assert Mosaic(_bank(), min_visibility=0.3).edges == EdgePolicy(0.3)
    np.testing.assert_array_equal(cut(0.5), [0, 1, 3])  # 50% in view stays, 20% goes
    np.testing.assert_array_equal(cut(0.0), [0, 1, 2, 3])
    np.testing.assert_array_equal(cut(1.0), [0, 3])


def test_bank_reads_tiles_up_to_its_cap() -> None:
    tiles = [_tile(i, (1, 1, 5, 5)) for i in range(4)]
    assert len(TileBank.from_tiles(tiles)) == 4 and len(TileBank.from_tiles(tiles, max_tiles=2)) == 2
    one = tiles[0]["image"].nbytes
    assert len(TileBank.from_tiles(tiles, max_bytes=3 * one)) == 3  # a memory cap too
    assert len(TileBank.from_tiles(tiles, max_bytes=1)) == 1  # never empty when there are tiles


def test_mosaic_pieces_keep_their_scale_and_their_boxes() -> None:
    bank = _bank()
    mosaic = Mosaic(bank, p=1.0, min_visibility=0.5)
    own = _tile(0, (5, 5, 15, 13), label=9)
    rng = np.random.default_rng(4)
    for _ in range(30):
        image, boxes, labels = mosaic(own["image"], own["boxes"], own["labels"], rng)
        assert image.shape == own["image"].shape and image.dtype == np.uint8
        grey = image[:, :, 0]
        assert set(np.unique(grey)) <= {0, 10, 20, 30, 40, 50}  # every pixel from one of the tiles, unscaled
        assert 1 < len(np.unique(grey)) <= 4 or (grey == grey[0, 0]).all()
        for box, label in zip(boxes, labels):
            x0, y0, x1, y1 = np.round(box).astype(int)
            region = grey[y0:y1, x0:x1]
            source = 0 if label == 9 else 10 * label  # each box lies on the tile it came from
            assert (region == source).all(), (box, label, np.unique(region))
            full = (15 - 5, 13 - 5) if label == 9 else (32 - 20, 30 - 22)
            assert x1 - x0 <= full[0] and y1 - y0 <= full[1]  # never larger: no zoom
            assert (x1 - x0) * (y1 - y0) >= 0.5 * full[0] * full[1] - 1e-6  # min_visibility kept
    assert np.array_equal(own["image"], np.zeros_like(own["image"]))  # the input is not changed


def test_whole_boxes_move_without_resizing() -> None:
    mosaic = Mosaic(_bank(), p=1.0, min_visibility=1.0)
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(40):
        _, boxes, labels = mosaic(np.zeros((SIZE, SIZE, 3), np.uint8), np.zeros((0, 4)), np.zeros(0, np.int64), rng)
        sizes |= {(float(b[2] - b[0]), float(b[3] - b[1])) for b in boxes}
        assert (labels >= 1).all() and (labels <= 5).all()
    assert sizes == {(12.0, 8.0)}  # min_visibility 1: only whole boxes, at their size


def test_mosaic_leaves_the_tile_when_off_empty_or_too_full() -> None:
    own = _tile(0, (5, 5, 15, 13))
    rng = np.random.default_rng(1)
    for mosaic, max_boxes in ((Mosaic(_bank(), p=0.0), None), (Mosaic(TileBank((), (), ()), p=1.0), None)):
        image, boxes, _ = mosaic(own["image"], own["boxes"], own["labels"], rng, max_boxes)
        assert image is own["image"] and np.array_equal(boxes, own["boxes"])
    crowded = TileBank.from_tiles([{"image": np.full((SIZE, SIZE, 3), 7, np.uint8),
                                    "boxes": np.array([[x, y, x + 4, y + 4] for x in range(0, 56, 5)
                                                       for y in range(0, 56, 5)], np.float32),
                                    "labels": np.ones(144, np.int64)}])
    image, boxes, _ = Mosaic(crowded, p=1.0)(own["image"], own["boxes"], own["labels"], rng, max_boxes=10)
    assert image is own["image"] and len(boxes) == 1  # more than max_boxes: the tile as it was


def test_mosaic_uses_the_tile_again_for_bank_tiles_of_another_shape() -> None:
    odd = TileBank.from_tiles([{"image": np.full((30, 30, 3), 99, np.uint8), "boxes": np.zeros((0, 4)),
                                "labels": np.zeros(0)}])
    own = _tile(5, None)
    image, boxes, _ = Mosaic(odd, p=1.0)(own["image"], own["boxes"], own["labels"], np.random.default_rng(0))
    assert (image == 5).all() and len(boxes) == 0


@pytest.mark.parametrize(("params", "message"), [
    ({"p": -0.1}, "p must be in"),
    ({"min_visibility": 2}, "min_visibility must be in"),
    ({"centre_range": [0.0, 0.5]}, "centre_range must be"),
    ({"scale": 0.5}, "unknown params ['scale']; Mosaic accepts: p, min_visibility, centre_range"),
])
def test_bad_mosaic_params_name_the_entry(rgb_tiles: Path, params: dict, message: str) -> None:
    cfg = make_config(rgb_tiles, augment=[{"name": "Mosaic", "params": params}])
    with pytest.raises(SatdetError, match=r"data\.augment\[0\] \(Mosaic\)") as err:
        build_augmenter(cfg, load_stats(rgb_tiles), rgb_tiles)
    assert f"(Mosaic): {message}" in str(err.value)  # the reason right after the entry, said once


def test_mosaic_given_twice_is_an_error(rgb_tiles: Path) -> None:
    cfg = make_config(rgb_tiles, augment=[{"name": "Mosaic"}, {"name": "Mosaic"}])
    with pytest.raises(SatdetError, match=r"data\.augment\[1\] \(Mosaic\): given twice"):
        build_augmenter(cfg, load_stats(rgb_tiles), rgb_tiles)


def test_augmenter_fills_its_tile_bank_from_the_training_split(rgb_tiles: Path) -> None:
    cfg = make_config(rgb_tiles, augment=[{"name": "VerticalFlip", "params": {"p": 0.5}},
                                          {"name": "CopyPaste", "params": {"p": 0.0}},
                                          {"name": "Mosaic", "params": {"p": 1.0}}])
    augmenter = build_augmenter(cfg, load_stats(rgb_tiles), rgb_tiles)
    assert augmenter.names == ["Mosaic", "CopyPaste", "VerticalFlip"]  # ours first, mosaic before pasting
    mosaic = augmenter._own["Mosaic"]
    assert len(mosaic.bank) == len(TRAIN_COUNTS)  # the train split, every tile, empty ones too
    again = build_augmenter(cfg, load_stats(rgb_tiles), rgb_tiles)._own["Mosaic"].bank
    assert again is mosaic.bank  # read once for the same shards (training builds its pipeline twice)
    assert mosaic.min_visibility == cfg.tiling.min_visibility  # the tiling's rule unless given
    tile = mosaic.bank.images[0]
    none = (np.zeros((0, 4), np.float32), np.zeros(0, np.int32))
    first, again = augmenter(tile, *none, (2, 5)), augmenter(tile, *none, (2, 5))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], tile)


def test_training_batches_hold_mosaics(rgb_tiles: Path) -> None:
    cfg = make_config(rgb_tiles, augment=[{"name": "Mosaic", "params": {"p": 1.0}}])
    for images, targets in build_dataset(rgb_tiles, "train", cfg, True).take(3):
        assert images.shape == (4, 64, 64, 3)
        n = targets["num_boxes"].numpy()
        assert int(n.max()) <= targets["boxes"].shape[1]
        for boxes, k in zip(targets["boxes"].numpy(), n):
            assert ((boxes[:k, 2:] > boxes[:k, :2]).all() and (boxes[:k] >= 0).all()
                    and (boxes[:k] <= 64).all())
