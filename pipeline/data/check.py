"""The dataset stage: check that a tiles folder makes a usable tf.data input and write tiles/dataset.json.

Checks stats.json, qa.json and the manifest, that every shard reads and decodes, that tiles have the
expected size and at most max_boxes boxes, that the manifest and the shards agree, that the splits
training needs are there, and that the augmentation config works on these tiles.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.data.explain import explain_data_error, shard_error
from pipeline.data.records import ERROR_TAG
from pipeline.data.stats import load_stats
from pipeline.data.tiles import (
    MANIFEST_FILE,
    SPLITS,
    check_box_counts,
    read_manifest,
    resolve_max_boxes,
    resolve_tile_size,
    scan_shard,
    shard_paths,
)
from pipeline.errors import SatdetError
from pipeline.files import atomic_write_json

log = logging.getLogger(__name__)

DATASET_FILE = "dataset.json"


def run_dataset_check(config: Any, tiles_dir: str | Path, *, scan_shards: bool = True) -> Path:
    """Validate the tiles for training and write tiles_dir/dataset.json.

    Checks stats.json, qa.json, the manifest, that every shard reads and decodes (scan_shards: each
    record once), that tiles have the expected size and at most max_boxes boxes, that the manifest and
    the shards agree, and that the augmentation config works on these tiles. A split that training
    needs but is empty is an error (train always; val when train.eval_every or early stopping use it).
    """
    from pipeline.data.augment import build_augmenter

    tiles_dir = Path(tiles_dir)
    stats = load_stats(tiles_dir)
    rows = read_manifest(tiles_dir)
    max_boxes = resolve_max_boxes(tiles_dir, config)
    tile_size = resolve_tile_size(stats, config)
    augmenter = build_augmenter(config, stats)  # validates the list; the banks of CopyPaste and Mosaic are read by training
    splits = {
        split: _check_split(tiles_dir, split, [r for r in rows if r["split"] == split], stats, tile_size,
                            max_boxes, scan_shards)
        for split in SPLITS
    }
    warnings = _check_split_sizes(config, tiles_dir, splits)
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


def _check_split(tiles_dir: Path, split: str, rows: list[dict[str, Any]], stats: dict[str, Any], tile_size: int,
                 max_boxes: int, scan_shards: bool) -> dict[str, Any]:
    """Check one split's manifest lines against its shards; its entry of dataset.json's `splits`."""
    check_box_counts(rows, max_boxes, tiles_dir)
    files = shard_paths(tiles_dir, split)
    listed = {Path(str(r["shard"])).name for r in rows if r.get("shard")}
    missing = sorted(listed - {f.name for f in files})
    if missing:
        raise SatdetError(f"{tiles_dir / missing[0]}: listed in {MANIFEST_FILE} but missing; re-run the tiling stage")
    if scan_shards:
        n_records = sum(_scan_checked(tiles_dir, split, path, stats, tile_size, max_boxes) for path in files)
        if n_records != len(rows):
            raise SatdetError(
                f"{tiles_dir}: {split} shards hold {n_records} tiles but {MANIFEST_FILE} lists {len(rows)}; "
                f"the tiles folder is incomplete — re-run the tiling stage"
            )
    return {
        "tiles": len(rows),
        "empty_tiles": sum(1 for r in rows if int(r.get("n_boxes", 0)) == 0),
        "boxes": sum(int(r.get("n_boxes", 0)) for r in rows),
        "shards": [f.name for f in files],
    }


def _scan_checked(tiles_dir: Path, split: str, path: Path, stats: dict[str, Any], tile_size: int,
                  max_boxes: int) -> int:
    """Decode every record of one shard and check each tile's size and box count; the number of tiles."""
    import tensorflow as tf

    try:
        facts = scan_shard(path, stats)
    except tf.errors.OpError as err:
        if ERROR_TAG in str(err):  # an in-graph check with its own message (tile id)
            raise explain_data_error(err, tiles_dir, split) from None
        raise shard_error(path, err) from None
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
    return len(facts)


def _check_split_sizes(config: Any, tiles_dir: Path, splits: dict[str, Any]) -> list[str]:
    """An empty split that training needs is an error; the warnings for the other empty ones."""
    if splits["train"]["tiles"] == 0:
        raise SatdetError(
            f"{tiles_dir}: the train split has no tiles; add labelled scenes or lower split.val_fraction/test_fraction"
        )
    warnings: list[str] = []
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
    return warnings
