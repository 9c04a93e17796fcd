"""Copy-paste of objects (pipeline/data/copy_paste.py) and its place in the augmentation list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data.augment import build_augmenter
from pipeline.data.copy_paste import CopyPaste, ObjectBank, ellipse_alpha
from pipeline.data.dataset import build_dataset
from pipeline.data.stats import load_stats
from pipeline.errors import SatdetError

from .conftest import TRAIN_COUNTS, make_config

RED = np.array([200, 10, 10], np.uint8)


def _bank(size: int = 12, colour: np.ndarray = RED, label: int = 2) -> ObjectBank:
    return ObjectBank((np.tile(colour, (size, size, 1)),), (label,))


def _covered(box: np.ndarray, other: np.ndarray) -> float:
    ix = max(0.0, min(box[2], other[2]) - max(box[0], other[0]))
    iy = max(0.0, min(box[3], other[3]) - max(box[1], other[1]))
    return ix * iy / ((other[2] - other[0]) * (other[3] - other[1]))


def test_ellipse_alpha_is_opaque_at_the_centre_and_clear_in_the_corners() -> None:
    alpha = ellipse_alpha(20, 30)
    assert alpha.shape == (20, 30, 1)
    assert alpha[10, 15, 0] == 1.0 and alpha[0, 0, 0] == 0.0 and alpha[19, 29, 0] == 0.0
    assert 0.2 < alpha[10, 0, 0] < 0.8  # the edge of the ellipse is half blended
    np.testing.assert_allclose(alpha, alpha[::-1, ::-1], atol=1e-5)


def test_bank_holds_the_box_crops_above_the_minimum_size() -> None:
    image = np.arange(40 * 40 * 3, dtype=np.int64).reshape(40, 40, 3).astype(np.uint16)
    tile = {"image": image, "boxes": np.array([[2, 3, 14, 20], [30, 30, 35, 34], [20.4, 1.6, 39.9, 10]]),
            "labels": np.array([1, 1, 3])}
    bank = ObjectBank.from_tiles([tile], min_size=8)
    assert len(bank) == 2 and bank.labels == (1, 3)
    np.testing.assert_array_equal(bank.crops[0], image[3:20, 2:14])
    np.testing.assert_array_equal(bank.crops[1], image[1:10, 20:40])  # outward-rounded edges
    assert len(ObjectBank.from_tiles([tile, tile], min_size=8, max_objects=3)) == 3
    floats = dict(tile, image=image.astype(np.float32))
    floats["image"][5, 5, 0] = np.nan  # nodata inside the first box
    assert ObjectBank.from_tiles([floats], min_size=8).labels == (3,)


def test_pasted_objects_are_drawn_and_labelled_without_hiding_existing_ones() -> None:
    paste = CopyPaste(_bank(), p=1.0, max_objects=6, max_overlap=0.2, brightness_limit=0.0)
    image = np.full((64, 64, 3), 90, np.uint8)
    boxes = np.array([[5, 5, 25, 25], [40, 30, 60, 50]], np.float32)
    labels = np.array([1, 1], np.int32)
    counts = []
    for seed in range(10):
        out, new_boxes, new_labels = paste(image, boxes, labels, np.random.default_rng(seed))
        assert image.max() == 90  # the input is not modified
        np.testing.assert_array_equal(new_boxes[:2], boxes)
        pasted = new_boxes[2:]
        counts.append(len(pasted))
        assert new_labels.dtype == labels.dtype and new_labels[2:].tolist() == [2] * len(pasted)
        for i, (x0, y0, x1, y1) in enumerate(pasted.astype(int)):
            assert (x1 - x0, y1 - y0) == (12, 12)
            np.testing.assert_array_equal(out[y0 + 6, x0 + 6], RED)  # the object's centre, unblended
            for other in np.concatenate([boxes, np.delete(pasted, i, axis=0)]):
                assert _covered(pasted[i], other) <= 0.2 + 1e-6
        untouched = np.ones((64, 64), bool)
        for x0, y0, x1, y1 in pasted.astype(int):
            untouched[y0:y1, x0:x1] = False
        assert (out[untouched] == 90).all()  # nothing changes outside the pasted boxes
    assert min(counts) >= 1 and max(counts) > 1


def test_no_paste_when_p_is_zero_the_bank_is_empty_or_the_tile_is_full() -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    boxes = np.array([[0, 0, 4, 4]], np.float32)
    labels = np.array([1])
    for paste, max_boxes in ((CopyPaste(_bank(), p=0.0), None), (CopyPaste(ObjectBank((), ()), p=1.0), None),
                             (CopyPaste(_bank(), p=1.0), 1)):
        out, out_boxes, _ = paste(image, boxes, labels, np.random.default_rng(0), max_boxes)
        assert out is image and len(out_boxes) == 1
    _, out_boxes, _ = CopyPaste(_bank(4), p=1.0, max_objects=6)(image, boxes, labels, np.random.default_rng(1), 3)
    assert 2 <= len(out_boxes) <= 3


def test_brightness_jitter_scales_the_object_and_clips_to_the_dtype() -> None:
    bright = np.array([250, 250, 250], np.uint16)
    paste = CopyPaste(_bank(colour=bright), p=1.0, max_objects=1, brightness_limit=0.5)
    seen = set()
    for seed in range(6):
        out, boxes, _ = paste(np.zeros((40, 40, 3), np.uint16), np.zeros((0, 4)), np.zeros(0, np.int32),
                              np.random.default_rng(seed))
        x0, y0 = boxes[0, :2].astype(int)
        centre = int(out[y0 + 6, x0 + 6, 0])
        assert 125 <= centre <= 375 and out.dtype == np.uint16
        seen.add(centre)
    assert len(seen) > 1


@pytest.mark.parametrize(("params", "message"), [
    ({"p": 1.5}, "p must be in"),
    ({"max_objects": 0}, "max_objects must be at least 1"),
    ({"max_overlap": 1.0}, "max_overlap must be in"),
    ({"colour": 3}, "unknown params ['colour']; CopyPaste accepts: p, max_objects"),
])
def test_bad_copy_paste_params_name_the_entry(rgb_tiles: Path, params: dict, message: str) -> None:
    cfg = make_config(rgb_tiles, augment=[{"name": "CopyPaste", "params": params}])
    with pytest.raises(SatdetError, match=r"data\.augment\[0\] \(CopyPaste\)") as err:
        build_augmenter(cfg, load_stats(rgb_tiles), rgb_tiles)
    assert f"(CopyPaste): {message}" in str(err.value)


def test_copy_paste_given_twice_is_an_error(rgb_tiles: Path) -> None:
    cfg = make_config(rgb_tiles, augment=[{"name": "CopyPaste"}, {"name": "CopyPaste"}])
    with pytest.raises(SatdetError, match="given twice"):
        build_augmenter(cfg, load_stats(rgb_tiles), rgb_tiles)


def test_augmenter_fills_its_bank_from_the_training_tiles_and_is_deterministic(rgb_tiles: Path) -> None:
    cfg = make_config(rgb_tiles, augment=[{"name": "HorizontalFlip", "params": {"p": 0.5}},
                                          {"name": "CopyPaste", "params": {"p": 1.0, "max_objects": 3}}])
    augmenter = build_augmenter(cfg, load_stats(rgb_tiles), rgb_tiles)
    assert augmenter.names == ["CopyPaste", "HorizontalFlip"]  # our transform runs first
    bank = augmenter._own["CopyPaste"].bank
    assert 0 < len(bank) <= sum(TRAIN_COUNTS)  # train split only, boxes of at least 8 px
    image = np.zeros((64, 64, 3), np.uint8)
    none = (np.zeros((0, 4), np.float32), np.zeros(0, np.int32))
    first = augmenter(image, *none, (3, 7))
    again = augmenter(image, *none, (3, 7))
    other = augmenter(image, *none, (3, 8))
    assert len(first[1]) >= 1 and first[0].any()
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_training_batches_carry_the_pasted_boxes(rgb_tiles: Path) -> None:
    plain = make_config(rgb_tiles, augment=[])
    pasted = make_config(rgb_tiles, augment=[{"name": "CopyPaste", "params": {"p": 1.0, "max_objects": 2}}])
    n_plain = [int(t["num_boxes"].numpy().sum()) for _, t in build_dataset(rgb_tiles, "train", plain, True).take(5)]
    n_pasted = [int(t["num_boxes"].numpy().sum()) for _, t in build_dataset(rgb_tiles, "train", pasted, True).take(5)]
    assert sum(n_pasted) > sum(n_plain)
    for images, targets in build_dataset(rgb_tiles, "train", pasted, True).take(3):
        assert images.shape == (4, 64, 64, 3) and int(targets["num_boxes"].numpy().max()) <= targets["boxes"].shape[1]

