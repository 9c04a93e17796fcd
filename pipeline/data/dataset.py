"""tf.data input pipeline: tile shards → (normalised images, padded boxes/labels) batches.

Order of operations (training):
  shard files (shuffled per epoch) → interleave → shuffle *serialised* records (small buffer memory)
  → repeat → enumerate (the global position seeds augmentation) → [skip for resume]
  → one parallel map: parse + decode → nodata (NaN in float tiles) := band mean → albumentations via
    tf.numpy_function → normalise → pad
    (with augmentation, normalisation runs inside the numpy_function: stats.numpy_normalizer, the
    same formula as stats.normalize, a cv2.LUT for uint8 instead of five elementwise TF ops;
    with data.normalize: scene each tile takes its own scene's numbers, stats.json `scenes`)
  → batch (drop_remainder, static shapes) → prefetch.
Validation/test: shards read one after another in sorted order, no shuffle, no repeat, no
augmentation, and the last batch keeps the remainder (it is smaller; nothing is padded with fake
images, so metrics never see a blank tile — the batch dimension is None in the element spec).

Determinism: file and record shuffles use fixed op seeds from `config.data.seed`, and each element's
augmentation seed is (data.seed, global position in the stream) — the position already encodes the epoch —
so a parallel map gives the same batches run after run (`Options.deterministic = True` keeps the order).

Errors from inside the graph (corrupt shards, oversized tiles) are turned into one-line SatdetErrors by
`pipeline.data.explain` (`explain_data_error` / `checked_iter`), which name the shard or the tile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.records import ERROR_TAG, parse_tile
from pipeline.data.stats import fill_nonfinite, load_stats, normalize, numpy_normalizer, scene_stats_of
from pipeline.data.tiles import (
    MANIFEST_FILE,
    SPLITS,
    check_box_counts,
    read_manifest,
    resolve_max_boxes,
    resolve_tile_size,
    shard_paths,
)
from pipeline.errors import SatdetError

_READ_BUFFER = 1 << 20  # bytes of read-ahead per TFRecord file


def build_dataset(
    tiles_dir: str | Path,
    split: str,
    config: Any,
    training: bool,
    *,
    batch_size: int | None = None,
    start_batch: int = 0,
    with_ids: bool = False,
) -> Any:
    """Batches of (images float32 [B,H,W,C] normalised, {"boxes" [B,M,4], "labels" [B,M] int32, "num_boxes" [B]}).

    training=True: shuffled, augmented, repeated forever, drop_remainder batches (fully static shapes).
    training=False: file order, not augmented, one pass, last batch smaller.
    batch_size: defaults to config.data.batch_size. start_batch: skip this many batches cheaply (on the
    serialised records, before decoding) so a resumed run continues the exact same stream.
    with_ids: add targets["tile_id"] ([B] string) for evaluation and previews.
    """
    import tensorflow as tf

    from pipeline.data.augment import build_augmenter

    tiles = _Tiles.read(Path(tiles_dir), split, config)
    batch = int(batch_size or config.data.batch_size)
    seed = int(config.data.seed)
    augmenter = build_augmenter(config, tiles.stats, tiles_dir) if training else None

    ds = _shuffled_records(tiles.files, config, seed) if training else _ordered_records(tiles.files)
    ds = ds.enumerate()
    if start_batch:
        ds = ds.skip(int(start_batch) * batch)
    ds = ds.map(_element_fn(tiles, augmenter, seed, with_ids), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    ds = ds.batch(batch, drop_remainder=training, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options())


@dataclass(frozen=True)
class _Tiles:
    """What the pipeline needs to know about a split of a tiles folder, checked before any graph runs."""

    stats: dict[str, Any]
    files: list[Path]
    scene_stats: dict[str, dict[str, Any]] | None  # data.normalize: scene: each scene's own numbers
    max_boxes: int
    tile_size: int
    channels: int
    dtype: str

    @classmethod
    def read(cls, tiles_dir: Path, split: str, config: Any) -> _Tiles:
        if split not in SPLITS:
            raise SatdetError(f"split must be one of {SPLITS}, got {split!r}")
        stats = load_stats(tiles_dir)
        files = shard_paths(tiles_dir, split)
        if not files:
            raise SatdetError(f"{tiles_dir}: no {split}-*.tfrecord shards; re-run the tiling stage or check the split")
        max_boxes = resolve_max_boxes(tiles_dir, config)
        rows = None
        if (tiles_dir / MANIFEST_FILE).is_file():  # catch oversized tiles here, by name, before any graph runs
            rows = [r for r in read_manifest(tiles_dir) if r["split"] == split]
            check_box_counts(rows, max_boxes, tiles_dir)
        return cls(stats, files, _scene_stats(tiles_dir, rows, stats, config), max_boxes,
                   resolve_tile_size(stats, config), int(stats["channels"]), str(stats["dtype"]))


def _scene_stats(tiles_dir: Path, rows: list[dict[str, Any]] | None, stats: dict[str, Any], config: Any
                 ) -> dict[str, dict[str, Any]] | None:
    """With data.normalize: scene, the numbers of every scene of the split's manifest `rows` (all scenes of
    stats.json without a manifest), checked here so a tile never meets a missing scene inside the graph;
    None with data.normalize: global."""
    if config.data.normalize != "scene":
        return None
    names = {r["scene"] for r in rows} if rows is not None else set(stats.get("scenes") or {})
    return {name: scene_stats_of(stats, name, str(tiles_dir / "stats.json")) for name in sorted(names)}


def _shuffled_records(files: list[Path], config: Any, seed: int) -> Any:
    """Training: shard order shuffled per epoch, shards interleaved, serialised records shuffled, forever."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices([str(f) for f in files])
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER),
        cycle_length=min(len(files), 8),
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return ds.shuffle(int(config.data.shuffle_buffer), seed=seed + 1, reshuffle_each_iteration=True).repeat()


def _ordered_records(files: list[Path]) -> Any:
    """Validation/test: a fixed, reproducible order (sorted shards, records in file order), one pass."""
    import tensorflow as tf

    return tf.data.TFRecordDataset([str(f) for f in files], buffer_size=_READ_BUFFER)


def _element_fn(tiles: _Tiles, augmenter: Any, seed: int, with_ids: bool) -> Callable[[Any, Any], tuple]:
    """The map function: (stream position, serialised tile) → (normalised image, padded targets)."""
    import tensorflow as tf

    normalizers = _normalizers(tiles)
    floating = np.dtype(tiles.dtype).kind == "f"  # only float tiles carry nodata as NaN
    fill = _scene_fill(tiles) if floating and tiles.scene_stats is not None else None
    augment_np = _augment_np(augmenter, normalizers, seed) if augmenter is not None else None

    def element(index: Any, serialized: Any) -> tuple[Any, dict[str, Any]]:
        tile = parse_tile(serialized, tiles.dtype, tiles.channels)
        image, boxes, labels = _checked(tile, tiles.tile_size, tiles.max_boxes)
        # the key of the tile's normaliser: its scene with data.normalize: scene, b"" (the pooled numbers) otherwise
        scene = tile["scene"] if tiles.scene_stats is not None else tf.constant(b"")
        if floating:  # nodata pixels of float tiles are NaN: the band mean, before augmenting
            image = fill_nonfinite(image, tiles.stats) if fill is None else fill(image, scene)
        if augment_np is not None:
            image, boxes, labels = tf.numpy_function(
                augment_np, [image, boxes, labels, index, scene], [tf.float32, tf.float32, tf.int32], stateful=False
            )
        elif tiles.scene_stats is not None:
            image = tf.numpy_function(lambda x, name: normalizers[name](x), [image, scene], tf.float32, stateful=False)
        else:
            image = normalize(image, tiles.stats)
        image = tf.ensure_shape(image, [tiles.tile_size, tiles.tile_size, tiles.channels])
        targets = _padded_targets(boxes, labels, tiles.max_boxes)
        if with_ids:
            targets["tile_id"] = tile["id"]
        return image, targets

    return element


def _normalizers(tiles: _Tiles) -> dict[bytes, Callable[[np.ndarray], np.ndarray]]:
    """NumPy normalisers by scene name (bytes, as a numpy_function gets a string tensor); one entry, b"", for
    the pooled statistics with data.normalize: global."""
    if tiles.scene_stats is None:
        return {b"": numpy_normalizer(tiles.stats)}
    return {name.encode(): numpy_normalizer(stats) for name, stats in tiles.scene_stats.items()}


def _scene_fill(tiles: _Tiles) -> Callable[[Any, Any], Any]:
    """TF: NaN/inf pixels of a float tile := its own scene's band mean (0 after its scene's normalisation)."""
    import tensorflow as tf

    names = sorted(tiles.scene_stats or {})
    means = tf.constant([tiles.scene_stats[n]["mean"] for n in names], tf.float32)
    index = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(names, list(range(len(names))),
                                                                          tf.string, tf.int32), -1)

    def fill(image: Any, scene: Any) -> Any:
        value = tf.cast(tf.gather(means, index.lookup(scene)), image.dtype)
        return tf.where(tf.math.is_finite(image), image, value)

    return fill


def _augment_np(augmenter: Any, normalizers: dict[bytes, Callable], seed: int) -> Callable[..., tuple]:
    """The numpy_function body: augment with seed (data.seed, stream position), then normalise (with the
    tile's scene's numbers under data.normalize: scene)."""

    def augment_np(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, index: np.int64, scene: bytes) -> tuple:
        # normalising here (cv2.LUT for uint8) is one pass instead of five TF elementwise ops
        image, boxes, labels = augmenter(image, boxes, labels, (seed, int(index)))
        return normalizers[scene](image), boxes, labels

    return augment_np


def _checked(tile: dict[str, Any], tile_size: int, max_boxes: int) -> tuple[Any, Any, Any]:
    """The tile's image, boxes and labels behind an assertion on its size and box count (names the tile)."""
    import tensorflow as tf

    image, boxes, labels = tile["image"], tile["boxes"], tile["labels"]
    shape = tf.shape(image)
    n_in = tf.shape(boxes)[0]
    ok = tf.reduce_all([tf.equal(shape[0], tile_size), tf.equal(shape[1], tile_size), n_in <= max_boxes])
    message = tf.strings.format(
        ERROR_TAG + "tile {} is {}x{} px with {} boxes; expected " + f"{tile_size}x{tile_size} px and at most "
        f"{max_boxes} boxes (data.max_boxes)",
        (tile["id"], shape[1], shape[0], n_in),
    )
    with tf.control_dependencies([tf.debugging.Assert(ok, [message])]):  # before pad/ensure_shape can fail
        return tf.identity(image), tf.identity(boxes), tf.identity(labels)


def _padded_targets(boxes: Any, labels: Any, max_boxes: int) -> dict[str, Any]:
    """Boxes and labels padded to `max_boxes` (static shapes), with the real count."""
    import tensorflow as tf

    boxes = tf.reshape(boxes, [-1, 4])
    labels = tf.reshape(labels, [-1])
    n = tf.shape(boxes)[0]
    return {
        "boxes": tf.ensure_shape(tf.pad(boxes, [[0, max_boxes - n], [0, 0]]), [max_boxes, 4]),
        "labels": tf.ensure_shape(tf.pad(labels, [[0, max_boxes - n]]), [max_boxes]),
        "num_boxes": n,
    }


def _options() -> Any:
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    # the numpy_function is a pure function of its inputs (seed included), so an iterator checkpoint
    # that ignores its (non-existent) state is still exact
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return options
