"""TensorFlow data errors as one-line SatdetErrors that name the shard or the tile.

In-graph checks (records.parse_tile, dataset.build_dataset) tag their messages with records.ERROR_TAG and
name the tile; a corrupt record does not say which file it came from, so the split's shards are scanned
one by one to name the culprit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pipeline.data.records import ERROR_TAG
from pipeline.data.stats import load_stats
from pipeline.data.tiles import scan_shard, shard_paths
from pipeline.errors import SatdetError


def _first_line(err: BaseException) -> str:
    text = getattr(err, "message", None) or str(err)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    return text.strip().splitlines()[0] if text.strip() else err.__class__.__name__


def shard_error(path: Path, err: BaseException) -> SatdetError:
    """The one-line error for a shard TensorFlow cannot read or decode."""
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
            scan_shard(path, stats)
        except tf.errors.OpError as shard_err:
            return shard_error(path, shard_err)
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
