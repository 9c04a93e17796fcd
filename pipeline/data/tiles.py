"""The tiles folder as the data stage reads it: shards, manifest.jsonl, qa.json, each shard's tile facts.

The folder is written by the tiling stage (docs/tiling.md, "Output"); every reader of it in pipeline/data
goes through these functions, so a missing or malformed file is the same one-line SatdetError everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.data.records import parse_tile
from pipeline.errors import SatdetError

SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.jsonl"
QA_FILE = "qa.json"


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


def resolve_tile_size(stats: dict[str, Any], config: Any) -> int:
    """The tiles' size in pixels: stats.json's tile_size, else `tiling.tile_size`."""
    return int(stats.get("tile_size") or config.tiling.tile_size)


def check_box_counts(rows: Iterable[dict[str, Any]], max_boxes: int, tiles_dir: Path) -> None:
    """A manifest tile with more than `max_boxes` boxes is a SatdetError naming it (before any graph runs)."""
    for row in rows:
        n = int(row.get("n_boxes", 0))
        if n > max_boxes:
            raise SatdetError(
                f"{tiles_dir / MANIFEST_FILE}: tile {row['id']!r} has {n} boxes, more than max_boxes={max_boxes}; "
                f"set data.max_boxes >= {n} (or leave it unset to use qa.json's maximum)"
            )


def scan_shard(path: Path, stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Read, parse and decode every record of one shard; return per-tile facts (id, height, width, n_boxes).

    Raises TensorFlow's errors (a corrupt record, a tile that disagrees with stats.json)."""
    import tensorflow as tf

    dtype, channels = str(stats["dtype"]), int(stats["channels"])

    def facts(serialized: Any) -> dict[str, Any]:
        tile = parse_tile(serialized, dtype, channels)
        shape = tf.shape(tile["image"])
        return {"id": tile["id"], "height": shape[0], "width": shape[1], "n_boxes": tf.shape(tile["boxes"])[0]}

    ds = tf.data.TFRecordDataset(str(path)).map(facts, num_parallel_calls=tf.data.AUTOTUNE)
    return [{k: (v.decode() if isinstance(v, bytes) else int(v)) for k, v in row.items()}
            for row in ds.as_numpy_iterator()]
