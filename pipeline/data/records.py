"""The TFRecord schema of one tile, in one place: `encode_tile` (used by tiling) and `parse_tile` (tf.data).

Features:
  image/encoded   raw little-endian bytes (H, W, C) row-major (default), or PNG (uint8/uint16 with 1, 3 or 4
                  bands, when tiling.encoding is "png")
  image/format    b"raw" or b"png" — decoders look at it per record, so a folder may mix both
  image/height, image/width, image/channels   int64
  image/dtype     numpy dtype name of the source pixels (b"uint8", b"uint16", b"float32", ...)
  boxes           float32 x0, y0, x1, y1 in tile pixels (pixel edges at integers), flattened
  labels          int64, 1-based class ids (0 is background)
  tile/id, tile/scene   bytes

Writing needs no TensorFlow: `encode_tile` writes the tf.train.Example protobuf wire format directly and
`RecordWriter` frames records as TFRecord (length, masked CRC-32C of the length, data, masked CRC-32C of
the data). Importing TensorFlow is slow, and the tiling stage and its worker processes never pay for
it. Reading (`parse_tile`, `decode_tile_numpy`) uses TensorFlow.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal, Self

import google_crc32c
import numpy as np

from pipeline.errors import SatdetError

Encoding = Literal["raw", "png"]
ENCODINGS = ("raw", "png")
PNG_DTYPES = {"uint8", "uint16"}
PNG_CHANNELS = {1, 3, 4}
# prefix of in-graph assertion messages, so pipeline.data.explain can turn them into one-line SatdetErrors
ERROR_TAG = "SATDET: "
# dtypes tf.io.decode_raw can read back (it has no uint32/uint64)
RAW_DTYPES = ("uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64")


def png_capable(dtype: str, channels: int) -> bool:
    """Whether PNG can hold tiles of this dtype/band count (else they are stored raw whatever the setting)."""
    return dtype in PNG_DTYPES and channels in PNG_CHANNELS


def uses_png(dtype: str, channels: int, encoding: str = "raw") -> bool:
    """Whether a tile of this dtype/band count is stored as PNG under `encoding`."""
    return encoding == "png" and png_capable(dtype, channels)


# ------------------------------------------------------------------------------- protobuf wire format
# tf.train.Example { Features features = 1 }; Features { map<string, Feature> feature = 1 };
# Feature { oneof: BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3 };
# each list is `repeated <type> value = 1` (numbers packed). Length-delimited fields are tag, length, payload.
_SMALL_VARINTS = [bytes((i,)) for i in range(0x80)]


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _SMALL_VARINTS[n]
    n &= (1 << 64) - 1  # negative int64 as two's complement, like protobuf
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@functools.lru_cache(maxsize=4096)
def _field(number: int, payload_len: int) -> bytes:
    """Tag and length of a length-delimited field (cached: the same few lengths recur from tile to tile)."""
    return _varint(number << 3 | 2) + _varint(payload_len)


def _bytes_feature(value: bytes) -> list[bytes]:
    inner = [_field(1, len(value)), value]  # BytesList.value
    n = sum(map(len, inner))
    return [_field(1, n), *inner]  # Feature.bytes_list


def _float_feature(values: np.ndarray) -> list[bytes]:
    data = np.ascontiguousarray(values, dtype="<f4").tobytes()
    inner = [_field(1, len(data)), data] if data else []
    return [_field(2, sum(map(len, inner))), *inner]


def _int64_feature(values: Sequence[int] | np.ndarray) -> list[bytes]:
    arr = np.asarray(values, np.int64).reshape(-1)
    if len(arr) and 0 <= arr.min() and arr.max() < 0x80:
        data = arr.astype(np.uint8).tobytes()  # one byte per varint: the usual case (class ids)
    else:
        data = b"".join(_varint(int(v)) for v in arr.tolist())
    inner = [_field(1, len(data)), data] if data else []
    return [_field(3, sum(map(len, inner))), *inner]


def _entry(key: str, feature: list[bytes]) -> list[bytes]:
    """One Features.feature map entry {key, value} as chunks."""
    k = key.encode()
    n = sum(map(len, feature))
    head = _field(1, len(k)) + k + _field(2, n)
    return [_field(1, len(head) + n) + head, *feature]


@functools.lru_cache(maxsize=512)
def _const_entry(key: str, value: bytes | int) -> bytes:
    """A whole map entry whose value repeats from tile to tile (format, sizes, dtype, scene), built once."""
    feature = _int64_feature([value]) if isinstance(value, int) else _bytes_feature(value)
    return b"".join(_entry(key, feature))


def _example(image_entry: list[bytes], small: list[bytes]) -> list[bytes]:
    """A serialised tf.train.Example as [head, image bytes, tail] (joined, they are the record): the image
    entry's chunks end with the big image; the other entries are joined into the tail, so a writer makes
    three calls per record and the image is never copied again."""
    tail = b"".join(small)
    *head, image = image_entry
    n = sum(map(len, head)) + len(image) + len(tail)
    return [_field(1, n) + b"".join(head), image, tail]  # Example.features


# ------------------------------------------------------------------------------- encoding
def _png(image: np.ndarray) -> bytes:
    import cv2

    channels = image.shape[2]
    if channels == 3:
        image = image[:, :, ::-1]  # cv2 writes BGR
    elif channels == 4:
        image = image[:, :, [2, 1, 0, 3]]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def encode_tile_chunks(
    image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, tile_id: str, scene: str,
    encoding: Encoding = "raw",
) -> list[bytes]:
    """`encode_tile` as a list of byte chunks (no copy of the image into one big string)."""
    image = np.asarray(image)
    if image.ndim != 3 or 0 in image.shape:
        raise ValueError(f"tile {tile_id}: image must be (H, W, C), got shape {image.shape}")
    if encoding not in ENCODINGS:
        raise ValueError(f"tile {tile_id}: encoding must be one of {ENCODINGS}, got {encoding!r}")
    h, w, c = image.shape
    dtype = image.dtype.name
    if dtype not in RAW_DTYPES:
        raise SatdetError(
            f"tile {tile_id}: pixel dtype {dtype} cannot be stored in a TFRecord tile; "
            f"convert the imagery to one of {', '.join(RAW_DTYPES)}"
        )
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int64).reshape(-1)
    if len(boxes) != len(labels):
        raise ValueError(f"tile {tile_id}: {len(boxes)} boxes but {len(labels)} labels")
    if not np.isfinite(boxes).all():
        raise ValueError(f"tile {tile_id}: boxes contain NaN or inf")
    if (labels < 1).any():
        raise ValueError(f"tile {tile_id}: labels must be 1-based class ids (0 is background), got {labels.min()}")
    if uses_png(dtype, c, encoding):
        encoded, fmt = _png(image), b"png"
    else:  # tobytes copies a strided view into C order once; byte-swap only for big-endian input
        encoded, fmt = image.astype(image.dtype.newbyteorder("<"), copy=False).tobytes(), b"raw"
    return _example(_entry("image/encoded", _bytes_feature(encoded)), [
        _const_entry("image/format", fmt),
        _const_entry("image/height", h),
        _const_entry("image/width", w),
        _const_entry("image/channels", c),
        _const_entry("image/dtype", dtype.encode()),
        *_entry("boxes", _float_feature(boxes)),
        *_entry("labels", _int64_feature(labels)),
        *_entry("tile/id", _bytes_feature(tile_id.encode())),
        _const_entry("tile/scene", scene.encode()),
    ])


def encode_tile(
    image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, tile_id: str, scene: str,
    encoding: Encoding = "raw",
) -> bytes:
    """Serialise one tile (a tf.train.Example). `image` is (H, W, C) of any numeric dtype; boxes (N, 4) xyxy;
    labels (N,). encoding "raw" (default) stores little-endian bytes; "png" stores uint8/uint16 tiles with
    1/3/4 bands as PNG (level 1) and everything else raw."""
    return b"".join(encode_tile_chunks(image, boxes, labels, tile_id, scene, encoding))


# ------------------------------------------------------------------------------- TFRecord framing
def _masked_crc(chunks: Sequence[bytes]) -> bytes:
    crc = 0
    for chunk in chunks:
        crc = google_crc32c.extend(crc, chunk)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


class RecordWriter:
    """Append records to a TFRecord file (uncompressed), readable by tf.data.TFRecordDataset."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh: BinaryIO = open(self.path, "wb")  # noqa: SIM115 (closed by close / the context manager)

    def write(self, record: bytes | Sequence[bytes]) -> None:
        """Write one record, given whole or as chunks (e.g. from `encode_tile_chunks`)."""
        chunks = [record] if isinstance(record, bytes) else list(record)
        length = struct.pack("<Q", sum(map(len, chunks)))
        self._fh.write(length + _masked_crc([length]))
        for chunk in chunks:
            self._fh.write(chunk)
        self._fh.write(_masked_crc(chunks))

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------- reading
def feature_spec() -> dict[str, Any]:
    """The parsing spec for `tf.io.parse_single_example`."""
    import tensorflow as tf

    return {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/format": tf.io.FixedLenFeature([], tf.string),
        "image/height": tf.io.FixedLenFeature([], tf.int64),
        "image/width": tf.io.FixedLenFeature([], tf.int64),
        "image/channels": tf.io.FixedLenFeature([], tf.int64),
        "image/dtype": tf.io.FixedLenFeature([], tf.string),
        "boxes": tf.io.VarLenFeature(tf.float32),
        "labels": tf.io.VarLenFeature(tf.int64),
        "tile/id": tf.io.FixedLenFeature([], tf.string),
        "tile/scene": tf.io.FixedLenFeature([], tf.string),
    }


def parse_tile(serialized: Any, dtype: str, channels: int) -> dict[str, Any]:
    """Parse one serialised tile into tensors: image (H, W, C) of `dtype`, boxes (N, 4), labels (N,), id, scene.

    `dtype` and `channels` come from stats.json (every tile of a tiling run shares them) and give the
    image a static dtype and channel count. The decoder is picked per record from `image/format` (raw or
    PNG), so shards written with either `tiling.encoding` read the same. A tile whose own dtype, band count
    or format does not fit fails an assertion that names the tile id (not an opaque reshape error).
    """
    import tensorflow as tf

    ex = tf.io.parse_single_example(serialized, feature_spec())
    h = tf.cast(ex["image/height"], tf.int32)
    w = tf.cast(ex["image/width"], tf.int32)
    fmt = ex["image/format"]
    is_png = tf.equal(fmt, b"png")
    known = tf.logical_or(tf.equal(fmt, b"raw"), is_png) if png_capable(dtype, channels) else tf.equal(fmt, b"raw")
    ok = tf.reduce_all([
        tf.equal(ex["image/dtype"], dtype), tf.equal(ex["image/channels"], tf.constant(channels, tf.int64)), known,
    ])
    message = tf.strings.format(
        ERROR_TAG + "tile {} has dtype {} with {} bands but stats.json says " + f"{dtype} with {channels} bands"
        + " (tile format {}; readable here: " + ("raw, png)" if png_capable(dtype, channels) else "raw)"),
        (ex["tile/id"], ex["image/dtype"], ex["image/channels"], fmt),
    )
    check = tf.debugging.Assert(ok, [message])
    with tf.control_dependencies([check]):
        encoded = tf.identity(ex["image/encoded"])
    tf_dtype = tf.dtypes.as_dtype(np.dtype(dtype))

    def raw() -> Any:
        image = tf.io.decode_raw(encoded, tf_dtype, little_endian=True)
        return tf.reshape(image, tf.stack([h, w, channels]))

    if png_capable(dtype, channels):
        image = tf.cond(is_png, lambda: tf.io.decode_png(encoded, channels=channels, dtype=tf_dtype), raw)
    else:
        image = raw()
    image.set_shape([None, None, channels])
    boxes = tf.reshape(tf.sparse.to_dense(ex["boxes"]), [-1, 4])
    labels = tf.cast(tf.sparse.to_dense(ex["labels"]), tf.int32)
    return {"image": image, "boxes": boxes, "labels": labels, "id": ex["tile/id"], "scene": ex["tile/scene"]}


def decode_tile_numpy(serialized: bytes) -> dict[str, Any]:
    """Decode one serialised tile in NumPy (for tests, previews and tools)."""
    import cv2
    import tensorflow as tf

    ex = tf.train.Example.FromString(serialized)
    f = ex.features.feature
    h, w, c = (f[k].int64_list.value[0] for k in ("image/height", "image/width", "image/channels"))
    dtype = f["image/dtype"].bytes_list.value[0].decode()
    data = f["image/encoded"].bytes_list.value[0]
    if f["image/format"].bytes_list.value[0] == b"png":
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ValueError(f"tile {f['tile/id'].bytes_list.value[0].decode()}: PNG data is corrupt")
        img = img.reshape(h, w, -1)
        if c == 3:
            img = img[:, :, ::-1]
        elif c == 4:
            img = img[:, :, [2, 1, 0, 3]]
    else:
        img = np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).reshape(h, w, c)
    return {
        "image": np.ascontiguousarray(img, dtype=dtype),
        "boxes": np.asarray(f["boxes"].float_list.value, np.float32).reshape(-1, 4),
        "labels": np.asarray(f["labels"].int64_list.value, np.int64),
        "id": f["tile/id"].bytes_list.value[0].decode(),
        "scene": f["tile/scene"].bytes_list.value[0].decode(),
    }
