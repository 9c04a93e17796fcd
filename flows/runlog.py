"""What a flow run shows in the Prefect UI besides its own log lines: the `pipeline.*` loggers (tiling,
dataset check, training, evaluation) and the trainer's progress (step, loss, img/s, clip fraction, ETA),
read from `model/train_log.jsonl` while training runs.

pipeline/ never imports Prefect: it logs to the standard `logging` loggers `pipeline.*` and writes its
telemetry to files, and this module forwards both to the run's Prefect logger.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PIPELINE_LOGGER = "pipeline"


def run_logger() -> Any:
    """The current Prefect run's logger, or a plain `flows` logger outside a run (a task's .fn called
    directly, e.g. in tests)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("flows")


# ------------------------------------------------------------------------------------------------ pipeline.*
class _RunHandler(logging.Handler):
    """Sends `pipeline.*` records to the Prefect API as logs of one flow run, from any thread of the
    process (tiling threads, TensorFlow callbacks), not only from the ones that carry the run context."""

    def __init__(self, flow_run_id: Any) -> None:
        from prefect.logging.handlers import APILogHandler

        super().__init__(logging.INFO)
        self._api = APILogHandler()
        self.flow_run_id = flow_run_id

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(record, "flow_run_id", None):
            record.flow_run_id = self.flow_run_id
        self._api.emit(record)


def _already_routed(target: logging.Logger) -> bool:
    """True when PREFECT_LOGGING_EXTRA_LOGGERS already attached Prefect's API handler to `pipeline`."""
    from prefect.logging.handlers import APILogHandler

    return any(isinstance(h, (APILogHandler, _RunHandler)) for h in target.handlers)


@contextlib.contextmanager
def pipeline_logs_to_run(flow_run_id: Any = None) -> Iterator[None]:
    """While the block runs, INFO and above from `pipeline.*` also go to this flow run's logs in Prefect."""
    if flow_run_id is None:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        flow_run_id = ctx.flow_run.id if ctx and ctx.flow_run else None
    target = logging.getLogger(PIPELINE_LOGGER)
    old_level = target.level
    if target.getEffectiveLevel() > logging.INFO:
        target.setLevel(logging.INFO)
    handler = None
    if flow_run_id is not None and not _already_routed(target):
        handler = _RunHandler(flow_run_id)
        target.addHandler(handler)
    try:
        yield
    finally:
        if handler is not None:
            target.removeHandler(handler)
        target.setLevel(old_level)


# ------------------------------------------------------------------------------------------------ training
def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(record: dict[str, Any], total_steps: int) -> str:
    """One line per telemetry record: step/total, loss, img/s, clip fraction (this window and overall), LR, ETA."""
    step = int(record.get("step", 0))
    if "val_ap50" in record and "loss" not in record:  # a validation record, not a training step
        return f"validation at step {step}: AP50 {record['val_ap50']:.3f}"
    total = int(record.get("schedule_steps") or total_steps or 0)
    parts = [f"train step {step}/{total}" if total else f"train step {step}"]
    loss = record.get("loss")
    parts.append(f"loss {loss:.4f}" if isinstance(loss, (int, float)) and math.isfinite(loss) else "loss nan")
    if isinstance(record.get("images_per_s"), (int, float)):
        parts.append(f"{record['images_per_s']:.1f} img/s")
    if isinstance(record.get("clip_fraction"), (int, float)):
        overall = record.get("clip_fraction_total")
        parts.append(f"clip {record['clip_fraction']:.0%}"
                     + (f" ({overall:.0%} overall)" if isinstance(overall, (int, float)) else ""))
    if isinstance(record.get("lr"), (int, float)):
        parts.append(f"lr {record['lr']:.3g}")
    if record.get("skipped_steps"):
        parts.append(f"skipped {record['skipped_steps']}")
    rate = record.get("steps_per_s")
    if total and isinstance(rate, (int, float)) and rate > 0 and step < total:
        parts.append(f"ETA {_duration((total - step) / rate)}")
    return "  ".join(parts)


class _LogTail:
    """Reads the complete lines appended to a JSONL file since the last call. The trainer replaces the
    file when it starts (a new inode), so a file that was there before training is ignored."""

    HISTORY = 50  # a resumed run rewrites its earlier records at once: show only the last of them

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stale = self._inode()
        self.inode: int | None = None
        self.offset = 0

    def _inode(self) -> int | None:
        try:
            return os.stat(self.path).st_ino
        except OSError:
            return None

    def read(self) -> list[dict[str, Any]]:
        try:
            st = os.stat(self.path)
        except OSError:
            return []
        if st.st_ino == self.stale:
            return []
        first = st.st_ino != self.inode
        if first or st.st_size < self.offset:
            self.inode, self.offset = st.st_ino, 0
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except OSError:
            return []
        end = chunk.rfind(b"\n") + 1  # only complete lines; a partial last line is read next time
        self.offset += end
        records = []
        for line in chunk[:end].splitlines():
            with contextlib.suppress(ValueError):
                if line.strip():
                    records.append(json.loads(line))
        if first and len(records) > self.HISTORY:
            records = records[-1:]
        return records


@contextlib.contextmanager
def follow_training(model_dir: Path, total_steps: int, logger: Any,
                    on_step: Callable[[int], None] | None = None, every_s: float = 2.0) -> Iterator[None]:
    """While training runs, log each new `train_log.jsonl` record (one per `train.log_every` steps) to
    `logger` and report its step to `on_step`; the records left at the end are logged too."""
    tail = _LogTail(Path(model_dir) / "train_log.jsonl")
    stop = threading.Event()

    def drain() -> None:
        records = tail.read()
        for record in records:
            with contextlib.suppress(Exception):  # cosmetic: never fail training over a log line
                logger.info(progress_line(record, total_steps))
        if records and on_step is not None:
            with contextlib.suppress(Exception):
                on_step(int(records[-1].get("step", 0)))

    def follow() -> None:
        while not stop.wait(every_s):
            drain()

    # Copy the context so the thread talks to the same Prefect API (ephemeral server or test harness).
    thread = threading.Thread(target=contextvars.copy_context().run, args=(follow,), daemon=True,
                              name="satdet-train-progress")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
        drain()
