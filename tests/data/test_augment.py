"""Augmentations built from config (pipeline/data/augment.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline.config import AugmentSpec, Config
from pipeline.data.augment import Augmenter, build_augmenter, valid_names
from pipeline.errors import SatdetError

SIZE = 96
RGB_STATS = {"dtype": "uint8", "channels": 3, "tile_size": SIZE, "low": [0, 0, 0], "high": [255, 255, 255],
             "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
COLOURS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 4: (255, 255, 0)}
BOXES = np.array([[4, 6, 30, 20], [50, 8, 90, 40], [10, 50, 26, 90], [60, 60, 80, 70]], np.float32)


def _config(*specs: tuple[str, dict]) -> Config:
    cfg = Config.model_validate({"tiling": {"tile_size": SIZE, "overlap": 0, "min_visibility": 0.5}})
    cfg.data.augment = [AugmentSpec(name=n, params=p) for n, p in specs]
    return cfg


def _painted() -> np.ndarray:
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    for (x0, y0, x1, y1), label in zip(BOXES.astype(int), COLOURS):
        image[y0:y1, x0:x1] = COLOURS[label]
    return image


def _colour_mask(image: np.ndarray, label: int) -> np.ndarray:
    return (np.abs(image.astype(int) - COLOURS[label]).max(axis=2) < 60)


@pytest.mark.parametrize(
    "specs",
    [
        [("HorizontalFlip", {"p": 0.5}), ("VerticalFlip", {"p": 0.5}), ("RandomRotate90", {"p": 0.5})],
        [("Transpose", {"p": 0.5}), ("ScaleJitter", {"scale_limit": 0.3, "p": 1.0})],
        [("RandomSizedBBoxSafeCrop", {"erosion_rate": 0.3, "p": 1.0}), ("HorizontalFlip", {"p": 0.5})],
    ],
    ids=["flips_rot90", "transpose_scale_jitter", "bbox_safe_crop"],
)
def test_augmented_boxes_still_enclose_their_objects(specs: list) -> None:
    augmenter = build_augmenter(_config(*specs), RGB_STATS)
    image = _painted()
    geometric_only = all(name in {"HorizontalFlip", "VerticalFlip", "RandomRotate90"} for name, _ in specs)
    for seed in range(8):
        out, boxes, labels = augmenter(image, BOXES, np.array(list(COLOURS)), (7, seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert len(boxes) >= 1
        if geometric_only:
            assert sorted(labels.tolist()) == [1, 2, 3, 4]
        for (x0, y0, x1, y1), label in zip(boxes, labels):
            mask = _colour_mask(out, int(label))
            inner = mask[int(np.ceil(y0)) : int(y1), int(np.ceil(x0)) : int(x1)]
            assert inner.size > 0 and inner.mean() > 0.8, f"seed {seed}: box {label} no longer on its object"
            # the object does not stick out of its box (1 px slack for interpolation)
            outside = mask.copy()
            outside[max(0, int(y0) - 1) : int(np.ceil(y1)) + 1, max(0, int(x0) - 1) : int(np.ceil(x1)) + 1] = False
            assert outside.sum() <= 0.05 * mask.sum(), f"seed {seed}: box {label} misses part of its object"


def test_same_seed_gives_same_result_and_seeds_differ() -> None:
    augmenter = build_augmenter(_config(("HorizontalFlip", {"p": 0.5}), ("RandomRotate90", {"p": 0.5}),
                                        ("RandomBrightnessContrast", {"p": 0.5})), RGB_STATS)
    image, labels = _painted(), np.arange(1, 5)
    first = augmenter(image, BOXES, labels, (3, 11))
    again = augmenter(image, BOXES, labels, (3, 11))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    others = [augmenter(image, BOXES, labels, (3, s))[0] for s in range(12, 20)]
    assert any(not np.array_equal(first[0], o) for o in others)


def test_empty_tile_passes_through() -> None:
    augmenter = build_augmenter(_config(("HorizontalFlip", {"p": 1.0})), RGB_STATS)
    out, boxes, labels = augmenter(_painted(), np.zeros((0, 4), np.float32), np.zeros(0, np.int32), (0, 0))
    assert boxes.shape == (0, 4) and labels.shape == (0,)
    np.testing.assert_array_equal(out, _painted()[:, ::-1])


def test_uint16_tiles_are_augmented_on_the_raw_scale() -> None:
    stats = {"dtype": "uint16", "channels": 4, "tile_size": 32, "low": [100, 0, 0, 10], "high": [3000, 5000, 4000, 20],
             "mean": [0.0] * 4, "std": [1.0] * 4}
    cfg = _config(("HorizontalFlip", {"p": 1.0}))
    cfg.tiling.tile_size = 32
    augmenter = build_augmenter(cfg, stats)
    image = np.random.default_rng(0).integers(0, 6000, (32, 32, 4)).astype(np.uint16)
    out, boxes, _ = augmenter(image, np.array([[0, 0, 8, 16]], np.float32), np.array([1]), (0, 0))
    assert out.dtype == np.float32
    expected = np.clip(image[:, ::-1].astype(np.float32), stats["low"], stats["high"])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(boxes, [[24, 0, 32, 16]], atol=1e-3)


def test_hue_saturation_is_skipped_for_non_rgb_tiles(caplog: pytest.LogCaptureFixture) -> None:
    stats = {**RGB_STATS, "dtype": "uint16", "channels": 4, "low": [0] * 4, "high": [1000] * 4,
             "mean": [0.0] * 4, "std": [1.0] * 4}
    with caplog.at_level(logging.WARNING, logger="pipeline.data.augment"):
        augmenter = build_augmenter(_config(("HorizontalFlip", {}), ("HueSaturationValue", {"p": 1.0})), stats)
    assert augmenter.names == ["HorizontalFlip"]
    assert "HueSaturationValue skipped" in caplog.text and "4 bands" in caplog.text
    assert build_augmenter(_config(("HueSaturationValue", {"p": 1.0})), RGB_STATS).names == ["HueSaturationValue"]


def test_default_augmentations_run_on_rgb() -> None:
    cfg = Config.model_validate({"tiling": {"tile_size": SIZE, "overlap": 0}})
    augmenter = build_augmenter(cfg, RGB_STATS)
    assert augmenter.names == ["HorizontalFlip", "VerticalFlip", "RandomRotate90", "RandomBrightnessContrast",
                               "HueSaturationValue"]
    out, boxes, labels = augmenter(_painted(), BOXES, np.arange(1, 5), (0, 1))
    assert out.shape == (SIZE, SIZE, 3) and boxes.shape == (4, 4) and labels.dtype == np.int32


def test_empty_augment_list_means_no_augmenter() -> None:
    assert build_augmenter(_config(), RGB_STATS) is None


def test_unknown_name_lists_valid_names_and_suggests_one() -> None:
    with pytest.raises(SatdetError) as info:
        build_augmenter(_config(("HorizontalFlip", {}), ("VerticlFlip", {})), RGB_STATS)
    msg = str(info.value)
    assert msg.startswith("data.augment[1] (VerticlFlip): unknown augmentation; did you mean 'VerticalFlip'?")
    assert "RandomSizedBBoxSafeCrop" in msg and "ScaleJitter" in msg and "\n" not in msg
    assert "Lambda" not in valid_names() and "HorizontalFlip" in valid_names()


def test_bad_params_are_reported_with_the_entry() -> None:
    with pytest.raises(SatdetError, match=r"data.augment\[0\] \(HorizontalFlip\): unknown params \['prob'\]"):
        build_augmenter(_config(("HorizontalFlip", {"prob": 0.5})), RGB_STATS)
    with pytest.raises(SatdetError, match=r"data.augment\[0\] \(RandomBrightnessContrast\): invalid params"):
        build_augmenter(_config(("RandomBrightnessContrast", {"p": 2})), RGB_STATS)


def test_size_changing_augmentation_is_rejected_up_front() -> None:
    with pytest.raises(SatdetError, match="changed the tile size to 40x40"):
        build_augmenter(_config(("RandomCrop", {"height": 40, "width": 40})), RGB_STATS)


def test_augmenter_is_usable_directly() -> None:
    augmenter = Augmenter([("VerticalFlip", {"p": 1.0})], stats=RGB_STATS, tile_size=SIZE, min_visibility=0.5)
    _, boxes, _ = augmenter(_painted(), BOXES[:1], np.array([1]), (0,))
    np.testing.assert_allclose(boxes, [[4, SIZE - 20, 30, SIZE - 6]], atol=1e-3)
