"""TFRecord schema round trips (pipeline/data/records.py)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from pipeline.data.records import RecordWriter, decode_tile_numpy, encode_tile, parse_tile
from pipeline.errors import SatdetError


def _round_trip(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, encoding: str = "raw") -> None:
    record = encode_tile(image, boxes, labels, "scene_a/7_3", "scene_a", encoding)
    parsed = parse_tile(tf.constant(record), image.dtype.name, image.shape[2])
    assert parsed["image"].dtype == tf.as_dtype(image.dtype)
    np.testing.assert_array_equal(parsed["image"].numpy(), image)
    np.testing.assert_array_equal(parsed["boxes"].numpy(), boxes.astype(np.float32).reshape(-1, 4))
    np.testing.assert_array_equal(parsed["labels"].numpy(), labels)
    assert parsed["id"].numpy() == b"scene_a/7_3" and parsed["scene"].numpy() == b"scene_a"
    decoded = decode_tile_numpy(record)
    assert decoded["image"].dtype == image.dtype
    np.testing.assert_array_equal(decoded["image"], image)
    np.testing.assert_array_equal(decoded["boxes"], boxes.astype(np.float32).reshape(-1, 4))
    np.testing.assert_array_equal(decoded["labels"], labels)
    assert decoded["id"] == "scene_a/7_3"


def _format(record: bytes) -> bytes:
    return tf.train.Example.FromString(record).features.feature["image/format"].bytes_list.value[0]


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_uint8_rgb_round_trips_in_both_encodings(encoding: str) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)  # non-square catches an H/W swap
    boxes = np.array([[0, 0, 4.5, 3], [10.25, 20, 39, 47.75]], np.float32)
    _round_trip(image, boxes, np.array([1, 2]), encoding)
    assert _format(encode_tile(image, boxes, [1, 2], "t", "s", encoding)) == encoding.encode()


def test_uint16_png_round_trips_and_odd_band_counts_stay_raw() -> None:
    rng = np.random.default_rng(4)
    image = rng.integers(0, 65536, (20, 12, 4)).astype(np.uint16)
    _round_trip(image, np.array([[1, 2, 3, 4]], np.float32), np.array([1]), "png")
    assert _format(encode_tile(image, np.zeros((0, 4)), [], "t", "s", "png")) == b"png"
    five = np.zeros((8, 8, 5), np.uint8)
    assert _format(encode_tile(five, np.zeros((0, 4)), [], "t", "s", "png")) == b"raw"


def test_record_writer_framing_is_read_by_tf_data_with_mixed_encodings(tmp_path) -> None:
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    path = tmp_path / "mixed.tfrecord"
    with RecordWriter(path) as writer:
        for i, (img, enc) in enumerate(zip(images, ["raw", "png", "raw"], strict=True)):
            writer.write(encode_tile(img, np.array([[1, 1, 5, 5]]), [1], f"t{i}", "s", enc))
    # TFRecordDataset checks the CRCs of every record: a framing bug fails here
    parsed = [parse_tile(r, "uint8", 3) for r in tf.data.TFRecordDataset(str(path))]
    assert len(parsed) == 3
    for img, p in zip(images, parsed, strict=True):
        np.testing.assert_array_equal(p["image"].numpy(), img)


def test_uint16_four_band_round_trips_as_raw_bytes() -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 65536, (32, 24, 4)).astype(np.uint16)
    image[0, 0] = [0, 1, 256, 65535]  # byte order matters for these
    _round_trip(image, np.array([[1, 2, 3, 4]], np.float32), np.array([3]))


@pytest.mark.parametrize(("dtype", "channels"), [("uint8", 1), ("uint8", 4), ("uint8", 5), ("float32", 2),
                                                 ("int16", 3)])
def test_other_dtypes_and_band_counts_round_trip(dtype: str, channels: int) -> None:
    rng = np.random.default_rng(3)
    image = (rng.normal(size=(16, 16, channels)) * 100).astype(dtype)
    _round_trip(image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))


def test_big_endian_input_is_stored_little_endian() -> None:
    image = np.arange(2 * 3 * 4, dtype=">u2").reshape(2, 3, 4)
    decoded = decode_tile_numpy(encode_tile(image, np.zeros((0, 4)), [], "t", "s"))
    np.testing.assert_array_equal(decoded["image"], image.astype(np.uint16))


def test_unsupported_dtype_is_a_user_error() -> None:
    with pytest.raises(SatdetError, match="tile t7: pixel dtype uint32"):
        encode_tile(np.zeros((4, 4, 3), np.uint32), np.zeros((0, 4)), [], "t7", "s")


def test_mismatched_boxes_and_labels_are_rejected() -> None:
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        encode_tile(np.zeros((4, 4, 3), np.uint8), np.zeros((2, 4)), [1], "t", "s")
    with pytest.raises(ValueError, match="1-based"):
        encode_tile(np.zeros((4, 4, 3), np.uint8), np.zeros((1, 4)), [0], "t", "s")


def test_parse_names_the_tile_when_dtype_disagrees_with_stats() -> None:
    record = encode_tile(np.zeros((8, 8, 3), np.uint8), np.zeros((0, 4)), [], "odd_tile", "s")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"odd_tile\W+ has dtype \W*uint8\W+ with 3 bands.*uint16"):
        parse_tile(tf.constant(record), "uint16", 3)
