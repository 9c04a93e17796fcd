"""tf.data input pipeline: tile shards → (normalised images, padded boxes/labels) batches.

Order of operations (training):
  shard files (shuffled per epoch) → interleave → shuffle *serialised* records (small buffer memory)
  → repeat → enumerate (the global position seeds augmentation) → [skip for resume]
  → one parallel map: parse + decode → nodata (NaN in float tiles) := band mean → albumentations via
    tf.numpy_function → normalise → pad
    (with augmentation, normalisation runs inside the numpy_function: stats.numpy_normalizer, the
    same formula as stats.normalize, a cv2.LUT for uint8 — five times cheaper than the TF ops)
  → batch (drop_remainder, static shapes) → prefetch.
Validation/test: shards read one after another in sorted order, no shuffle, no repeat, no
augmentation, and the last batch keeps the remainder (it is smaller; nothing is padded with fake
images, so metrics never see a blank tile — the batch dimension is None in the element spec).

Determinism: file and record shuffles use fixed op seeds from `config.data.seed`, and each element's
augmentation seed is (data.seed, global position in the stream) — the position already encodes the epoch —
so a parallel map gives the same batches run after run (`Options.deterministic = True` keeps the order).

Errors from inside the graph (corrupt shards, oversized tiles) are turned into one-line SatdetErrors by
`explain_data_error` / `checked_iter`, which name the shard or the tile.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.records import ERROR_TAG, parse_tile
from pipeline.data.stats import fill_nonfinite, load_stats, normalize, numpy_normalizer
from pipeline.errors import SatdetError
from pipeline.files import atomic_write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.jsonl"
QA_FILE = "qa.json"
DATASET_FILE = "dataset.json"


# --------------------------------------------------------------------------------------------- files
def shard_paths(tiles_dir: str | Path, split: str) -> list[Path]:
    """The split's TFRecord shards (`{split}-00000-of-000NN.tfrecord`), sorted."""
    return sorted(Path(tiles_dir).glob(f"{split}-*-of-*.tfrecord"))


def read_manifest(tiles_dir: str | Path) -> list[dict[str, Any]]:
    """All lines of tiles_dir/manifest.jsonl (one dict per tile)."""
    path = Path(tiles_dir) / MANIFEST_FILE
    if not path.is_file():
        raise SatdetError(f"{path}: not found; run the tiling stage first (satdet tile CONFIG)")
    rows = []
    with path.open() as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise SatdetError(f"{path}:{n}: not valid JSON; re-run the tiling stage") from None
            if not isinstance(row, dict) or "id" not in row or "split" not in row:
                raise SatdetError(f"{path}:{n}: a tile line needs at least 'id' and 'split'; re-run the tiling stage")
            rows.append(row)
    return rows


def tile_count(tiles_dir: str | Path, split: str) -> int:
    """Number of tiles of `split` according to manifest.jsonl."""
    return sum(1 for row in read_manifest(tiles_dir) if row["split"] == split)


def load_qa(tiles_dir: str | Path) -> dict[str, Any]:
    """tiles_dir/qa.json as a dict."""
    path = Path(tiles_dir) / QA_FILE
    if not path.is_file():
        raise SatdetError(f"{path}: not found; run the tiling stage first (satdet tile CONFIG)")
    try:
        qa = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SatdetError(f"{path}: not valid JSON ({err.__class__.__name__}); re-run the tiling stage") from None
    if not isinstance(qa, dict):
        raise SatdetError(f"{path}: top level must be an object; re-run the tiling stage")
    return qa


def resolve_max_boxes(tiles_dir: str | Path, config: Any) -> int:
    """`data.max_boxes` if set, else qa.json's max_boxes_per_tile (at least 1)."""
    if config.data.max_boxes is not None:
        return int(config.data.max_boxes)
    qa = load_qa(tiles_dir)
    value = qa.get("max_boxes_per_tile")
    if not isinstance(value, int) or value < 0:
        raise SatdetError(
            f"{Path(tiles_dir) / QA_FILE}: max_boxes_per_tile missing or not a count; set data.max_boxes "
            f"or re-run the tiling stage"
        )
    return max(1, value)


def _tile_size(stats: dict[str, Any], config: Any) -> int:
    return int(stats.get("tile_size") or config.tiling.tile_size)


def _check_box_counts(rows: Iterable[dict[str, Any]], max_boxes: int, tiles_dir: Path) -> None:
    for row in rows:
        n = int(row.get("n_boxes", 0))
        if n > max_boxes:
            raise SatdetError(
                f"{tiles_dir / MANIFEST_FILE}: tile {row['id']!r} has {n} boxes, more than max_boxes={max_boxes}; "
                f"set data.max_boxes >= {n} (or leave it unset to use qa.json's maximum)"
            )


# --------------------------------------------------------------------------------------------- dataset
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

    tiles_dir = Path(tiles_dir)
    if split not in SPLITS:
        raise SatdetError(f"split must be one of {SPLITS}, got {split!r}")
    stats = load_stats(tiles_dir)
    files = shard_paths(tiles_dir, split)
    if not files:
        raise SatdetError(f"{tiles_dir}: no {split}-*.tfrecord shards; re-run the tiling stage or check the split")
    max_boxes = resolve_max_boxes(tiles_dir, config)
    manifest = tiles_dir / MANIFEST_FILE
    if manifest.is_file():  # catch oversized tiles here, by name, before any graph runs
        _check_box_counts((r for r in read_manifest(tiles_dir) if r["split"] == split), max_boxes, tiles_dir)
    tile_size = _tile_size(stats, config)
    channels, dtype = int(stats["channels"]), str(stats["dtype"])
    batch = int(batch_size or config.data.batch_size)
    seed = int(config.data.seed)
    augmenter = build_augmenter(config, stats) if training else None

    if training:
        ds = tf.data.Dataset.from_tensor_slices([str(f) for f in files])
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        ds = ds.interleave(
            lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 20),
            cycle_length=min(len(files), 8),
            block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        ds = ds.shuffle(int(config.data.shuffle_buffer), seed=seed + 1, reshuffle_each_iteration=True).repeat()
    else:  # a fixed, reproducible order (sorted shards, records in file order); with_ids names each tile
        ds = tf.data.TFRecordDataset([str(f) for f in files], buffer_size=1 << 20)
    ds = ds.enumerate()
    if start_batch:
        ds = ds.skip(int(start_batch) * batch)

    fast_normalize = numpy_normalizer(stats)

    def augment_np(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, index: np.int64) -> tuple:
        # normalising here (cv2.LUT for uint8) is one pass instead of five TF elementwise ops
        image, boxes, labels = augmenter(image, boxes, labels, (seed, int(index)))
        return fast_normalize(image), boxes, labels

    def element(index: Any, serialized: Any) -> tuple[Any, dict[str, Any]]:
        tile = parse_tile(serialized, dtype, channels)
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
            image, boxes, labels = tf.identity(image), tf.identity(boxes), tf.identity(labels)
        if np.dtype(dtype).kind == "f":  # nodata pixels of float tiles are NaN: the band mean, before augmenting
            image = fill_nonfinite(image, stats)
        if augmenter is not None:
            image, boxes, labels = tf.numpy_function(
                augment_np, [image, boxes, labels, index], [tf.float32, tf.float32, tf.int32], stateful=False
            )
        else:
            image = normalize(image, stats)
        image = tf.ensure_shape(image, [tile_size, tile_size, channels])
        boxes = tf.reshape(boxes, [-1, 4])
        labels = tf.reshape(labels, [-1])
        n = tf.shape(boxes)[0]
        targets = {
            "boxes": tf.ensure_shape(tf.pad(boxes, [[0, max_boxes - n], [0, 0]]), [max_boxes, 4]),
            "labels": tf.ensure_shape(tf.pad(labels, [[0, max_boxes - n]]), [max_boxes]),
            "num_boxes": n,
        }
        if with_ids:
            targets["tile_id"] = tile["id"]
        return image, targets

    ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch, drop_remainder=training, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    # the numpy_function is a pure function of its inputs (seed included), so an iterator checkpoint
    # that ignores its (non-existent) state is still exact
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return ds.with_options(options)


# --------------------------------------------------------------------------------------------- errors
def _scan_shard(path: Path, stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Read, parse and decode every record of one shard; return per-tile facts. Raises tf errors."""
    import tensorflow as tf

    dtype, channels = str(stats["dtype"]), int(stats["channels"])

    def facts(serialized: Any) -> dict[str, Any]:
        tile = parse_tile(serialized, dtype, channels)
        shape = tf.shape(tile["image"])
        return {"id": tile["id"], "height": shape[0], "width": shape[1], "n_boxes": tf.shape(tile["boxes"])[0]}

    ds = tf.data.TFRecordDataset(str(path)).map(facts, num_parallel_calls=tf.data.AUTOTUNE)
    return [{k: (v.decode() if isinstance(v, bytes) else int(v)) for k, v in row.items()}
            for row in ds.as_numpy_iterator()]


def _first_line(err: BaseException) -> str:
    text = getattr(err, "message", None) or str(err)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    return text.strip().splitlines()[0] if text.strip() else err.__class__.__name__


def _shard_error(path: Path, err: BaseException) -> SatdetError:
    return SatdetError(
        f"{path}: corrupt or unreadable TFRecord shard ({_first_line(err)}); delete the tiles folder and "
        f"re-run the tiling stage"
    )


def explain_data_error(err: BaseException, tiles_dir: str | Path, split: str) -> SatdetError:
    """Turn an error raised while iterating a `build_dataset` dataset into a one-line SatdetError.

    In-graph checks carry their own message (tile id included); a corrupt record does not say which
    file it came from, so the split's shards are scanned one by one to name the culprit.
    """
    import tensorflow as tf

    text = (getattr(err, "message", None) or str(err)).replace('\\"', '"').replace('"', "'")
    # the tagged message runs to the end of its line, closed by "]" (graph mode) or a quote (eager mode)
    tagged = re.search(re.escape(ERROR_TAG) + r"([^\n]*)", text)
    if tagged:
        detail = re.split(r"\]\s*\[(?:Op:|\[)", tagged.group(1))[0].strip().rstrip("]'").strip()
        return SatdetError(f"{tiles_dir}: {detail}")
    raised = re.search(r"SatdetError: (.*)", text)  # raised inside the numpy_function (augmentation)
    if raised:
        return SatdetError(raised.group(1).strip())
    try:
        stats = load_stats(tiles_dir)
    except SatdetError as stats_err:
        return stats_err
    for path in shard_paths(tiles_dir, split):
        try:
            _scan_shard(path, stats)
        except tf.errors.OpError as shard_err:
            return _shard_error(path, shard_err)
    return SatdetError(f"{tiles_dir} ({split} split): reading tiles failed: {_first_line(err)}")


def checked_iter(dataset: Iterable[Any], tiles_dir: str | Path, split: str) -> Iterator[Any]:
    """Iterate `dataset`, re-raising TensorFlow data errors as SatdetErrors that name the shard or tile."""
    import tensorflow as tf

    iterator = iter(dataset)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as err:
            raise explain_data_error(err, tiles_dir, split) from None
        yield item


# --------------------------------------------------------------------------------------------- check stage
def run_dataset_check(config: Any, tiles_dir: str | Path, *, scan_shards: bool = True) -> Path:
    """Validate the tiles for training and write tiles_dir/dataset.json.

    Checks stats.json, qa.json, the manifest, that every shard reads and decodes (scan_shards: each
    record once), that tiles have the expected size and at most max_boxes boxes, that the manifest and
    the shards agree, and that the augmentation config works on these tiles. A split that training
    needs but is empty is an error (train always; val when train.eval_every or early stopping use it).
    """
    import tensorflow as tf

    from pipeline.data.augment import build_augmenter

    tiles_dir = Path(tiles_dir)
    stats = load_stats(tiles_dir)
    rows = read_manifest(tiles_dir)
    max_boxes = resolve_max_boxes(tiles_dir, config)
    tile_size = _tile_size(stats, config)
    augmenter = build_augmenter(config, stats)
    warnings: list[str] = []
    splits: dict[str, Any] = {}
    for split in SPLITS:
        split_rows = [r for r in rows if r["split"] == split]
        _check_box_counts(split_rows, max_boxes, tiles_dir)
        files = shard_paths(tiles_dir, split)
        listed = {Path(str(r["shard"])).name for r in split_rows if r.get("shard")}
        missing = sorted(listed - {f.name for f in files})
        if missing:
            raise SatdetError(f"{tiles_dir / missing[0]}: listed in {MANIFEST_FILE} but missing; re-run the tiling stage")
        n_records = 0
        if scan_shards:
            for path in files:
                try:
                    facts = _scan_shard(path, stats)
                except tf.errors.OpError as err:
                    if ERROR_TAG in str(err):  # an in-graph check with its own message (tile id)
                        raise explain_data_error(err, tiles_dir, split) from None
                    raise _shard_error(path, err) from None
                for f in facts:
                    if (f["height"], f["width"]) != (tile_size, tile_size):
                        raise SatdetError(
                            f"{path}: tile {f['id']!r} is {f['width']}x{f['height']} px, expected {tile_size}x{tile_size} "
                            f"(stats.json tile_size); re-run the tiling stage"
                        )
                    if f["n_boxes"] > max_boxes:
                        raise SatdetError(
                            f"{path}: tile {f['id']!r} has {f['n_boxes']} boxes, more than max_boxes={max_boxes}; "
                            f"set data.max_boxes >= {f['n_boxes']}"
                        )
                n_records += len(facts)
            if n_records != len(split_rows):
                raise SatdetError(
                    f"{tiles_dir}: {split} shards hold {n_records} tiles but {MANIFEST_FILE} lists {len(split_rows)}; "
                    f"the tiles folder is incomplete — re-run the tiling stage"
                )
        splits[split] = {
            "tiles": len(split_rows),
            "empty_tiles": sum(1 for r in split_rows if int(r.get("n_boxes", 0)) == 0),
            "boxes": sum(int(r.get("n_boxes", 0)) for r in split_rows),
            "shards": [f.name for f in files],
        }
    if splits["train"]["tiles"] == 0:
        raise SatdetError(
            f"{tiles_dir}: the train split has no tiles; add labelled scenes or lower split.val_fraction/test_fraction"
        )
    needs_val = config.train.eval_every > 0 or config.train.early_stopping_patience > 0
    if splits["val"]["tiles"] == 0:
        if needs_val:
            raise SatdetError(
                f"{tiles_dir}: the val split has no tiles but train.eval_every/early_stopping_patience need it; "
                f"raise tiling.split.val_fraction or turn those off"
            )
        warnings.append("val split is empty: no validation during training")
    if splits[config.evaluate.split]["tiles"] == 0:
        warnings.append(f"{config.evaluate.split} split (evaluate.split) is empty: evaluation will have nothing to score")
    for w in warnings:
        log.warning("%s", w)
    batch = int(config.data.batch_size)
    report = {
        "tile_size": tile_size,
        "channels": int(stats["channels"]),
        "dtype": str(stats["dtype"]),
        "max_boxes": max_boxes,
        "max_boxes_source": "data.max_boxes" if config.data.max_boxes is not None else "qa.json",
        "batch_size": batch,
        "steps_per_epoch": splits["train"]["tiles"] // batch,
        "augment": augmenter.names if augmenter else [],
        "shards_scanned": scan_shards,
        "splits": splits,
        "warnings": warnings,
    }
    return atomic_write_json(tiles_dir / DATASET_FILE, report)
