"""A scene's TFRecord parts and the manifest lines that name them.

`ShardWriter` appends records to per-split parts (``train-00000.tfrecord`` ...) on a background thread —
without TensorFlow; each manifest line names its part in its "shard" field, which the merges
(pipeline.geo.blocks, pipeline.geo.finalize) rename through `manifest_record` and `manifest_line`.
"""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.data.records import RecordWriter
from pipeline.errors import SatdetError
from pipeline.geo.plan import SPLITS


class ShardWriter:
    """Per-split TFRecord parts of one scene, each at most `shard_size` records.

    Records are written (framed, CRC'd, copied into the page cache) on a background thread, in order,
    while the caller cuts the next tiles: file writes release the GIL. At most `max_pending` records wait
    in memory; a write error is raised by a later `write` (once the queue is trimmed) or by `close`.
    """

    def __init__(self, folder: Path, shard_size: int, max_pending: int = 32) -> None:
        self.folder, self.shard_size, self.max_pending = folder, shard_size, max(2, max_pending)
        self.writers: dict[str, RecordWriter] = {}
        self.counts: dict[str, int] = {}
        self.parts: dict[str, list[str]] = {s: [] for s in SPLITS}
        self._thread = ThreadPoolExecutor(1)
        self._pending: list[Future[None]] = []

    def write(self, split: str, record: list[bytes]) -> str:
        """Queue one record of `split`; returns the name of the part it goes to."""
        n = self.counts.get(split, 0)
        if n % self.shard_size == 0:
            if split in self.writers:
                self._pending.append(self._thread.submit(self.writers[split].close))
            name = f"{split}-{len(self.parts[split]):05d}.tfrecord"
            self.parts[split].append(name)
            self.writers[split] = RecordWriter(self.folder / name)
        self._pending.append(self._thread.submit(self.writers[split].write, record))
        self.counts[split] = n + 1
        if len(self._pending) > self.max_pending:
            done, self._pending = self._pending[:-self.max_pending // 2], self._pending[-self.max_pending // 2:]
            for fut in done:
                fut.result()
        return self.parts[split][-1]

    def close(self) -> None:
        """Wait for the queued writes and close every file; the first write error is raised."""
        try:
            for fut in self._pending:
                fut.result()
        finally:
            self._thread.shutdown(wait=True)
            with contextlib.ExitStack() as files:  # every file is closed even if one close fails
                for w in self.writers.values():
                    files.callback(w.close)


def manifest_line(record: dict[str, Any], shard: str) -> str:
    """One manifest.jsonl line (without its newline): the tile's record, then the part holding it."""
    return json.dumps({**record, "shard": shard})


def manifest_record(line: str, source: Path) -> dict[str, Any]:
    """A manifest line parsed (`manifest_line` with another shard writes it back as it was); a SatdetError
    naming `source` unless the line is a record with its shard."""
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict) or "shard" not in record:
        raise SatdetError(f"{source}: a line lacks its shard; tile the scene again")
    return record
