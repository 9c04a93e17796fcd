"""The TFRecord schema of one tile, in one place: `encode_tile` (used by tiling) and `parse_tile` (tf.data).

Features:
  image/encoded   PNG for uint8 images with 1, 3 or 4 bands; raw little-endian bytes (H, W, C) otherwise
  image/format    b"png" or b"raw"
  image/height, image/width, image/channels   int64
  image/dtype     numpy dtype name of the source pixels (b"uint8", b"uint16", b"float32", ...)
  boxes           float32 x0, y0, x1, y1 in tile pixels (pixel edges at integers), flattened
  labels          int64, 1-based class ids (0 is background)
  tile/id, tile/scene   bytes
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import SatdetError

PNG_DTYPES = {"uint8"}
PNG_CHANNELS = {1, 3, 4}
# prefix of in-graph assertion messages, so pipeline.data.dataset can turn them into one-line SatdetErrors
ERROR_TAG = "SATDET: "
# dtypes tf.io.decode_raw can read back (it has no uint32/uint64)
RAW_DTYPES = ("uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64")


def uses_png(dtype: str, channels: int) -> bool:
    """Whether tiles of this dtype/band count are stored as PNG (else raw little-endian bytes)."""
    return dtype in PNG_DTYPES and channels in PNG_CHANNELS


def _bytes(v: bytes) -> Any:
    import tensorflow as tf

    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))


def _int64(values: Any) -> Any:
    import tensorflow as tf

    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in np.ravel(values)]))


def _float(values: Any) -> Any:
    import tensorflow as tf

    return tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(values).astype(np.float32).tolist()))


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


def encode_tile(
    image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, tile_id: str, scene: str
) -> bytes:
    """Serialise one tile. `image` is (H, W, C) of any numeric dtype; boxes (N, 4) xyxy; labels (N,)."""
    import tensorflow as tf

    image = np.asarray(image)
    if image.ndim != 3 or 0 in image.shape:
        raise ValueError(f"tile {tile_id}: image must be (H, W, C), got shape {image.shape}")
    h, w, c = image.shape
    dtype = image.dtype.name
    if dtype not in RAW_DTYPES:
        raise SatdetError(
            f"tile {tile_id}: pixel dtype {dtype} cannot be stored in a TFRecord tile; "
            f"convert the imagery to one of {', '.join(RAW_DTYPES)}"
        )
    if uses_png(dtype, c):
        encoded, fmt = _png(image), b"png"
    else:
        encoded, fmt = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder("<")).tobytes(), b"raw"
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int64).reshape(-1)
    if len(boxes) != len(labels):
        raise ValueError(f"tile {tile_id}: {len(boxes)} boxes but {len(labels)} labels")
    if not np.isfinite(boxes).all():
        raise ValueError(f"tile {tile_id}: boxes contain NaN or inf")
    if (labels < 1).any():
        raise ValueError(f"tile {tile_id}: labels must be 1-based class ids (0 is background), got {labels.min()}")
    feature = {
        "image/encoded": _bytes(encoded),
        "image/format": _bytes(fmt),
        "image/height": _int64([h]),
        "image/width": _int64([w]),
        "image/channels": _int64([c]),
        "image/dtype": _bytes(dtype.encode()),
        "boxes": _float(boxes),
        "labels": _int64(labels),
        "tile/id": _bytes(tile_id.encode()),
        "tile/scene": _bytes(scene.encode()),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


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

    `dtype` and `channels` come from stats.json (every tile of a tiling run shares them), so the decode
    branch is chosen in Python and the image gets a static channel count. A tile whose own dtype or
    band count differs fails an assertion that names the tile id (not an opaque reshape error).
    """
    import tensorflow as tf

    ex = tf.io.parse_single_example(serialized, feature_spec())
    h = tf.cast(ex["image/height"], tf.int32)
    w = tf.cast(ex["image/width"], tf.int32)
    same_kind = tf.logical_and(
        tf.equal(ex["image/dtype"], dtype), tf.equal(ex["image/channels"], tf.constant(channels, tf.int64))
    )
    message = tf.strings.format(
        ERROR_TAG + "tile {} has dtype {} with {} bands but stats.json says " + f"{dtype} with {channels} bands",
        (ex["tile/id"], ex["image/dtype"], ex["image/channels"]),
    )
    check = tf.debugging.Assert(same_kind, [message])
    with tf.control_dependencies([check]):
        encoded = tf.identity(ex["image/encoded"])
    if uses_png(dtype, channels):
        image = tf.io.decode_png(encoded, channels=channels, dtype=tf.uint8)
    else:
        image = tf.io.decode_raw(encoded, tf.dtypes.as_dtype(np.dtype(dtype)), little_endian=True)
        image = tf.reshape(image, tf.stack([h, w, channels]))
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
        img = np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).reshape(h, w, c).astype(dtype)
    return {
        "image": np.ascontiguousarray(img),
        "boxes": np.asarray(f["boxes"].float_list.value, np.float32).reshape(-1, 4),
        "labels": np.asarray(f["labels"].int64_list.value, np.int64),
        "id": f["tile/id"].bytes_list.value[0].decode(),
        "scene": f["tile/scene"].bytes_list.value[0].decode(),
    }
