"""Training telemetry: TensorBoard scalars (tf.summary) and `train_log.jsonl`, the same numbers in both.

One JSON object per logged step, e.g. ``{"step": 20, "loss": 1.93, "rpn_objectness": 0.61, ..., "lr": 0.004,
"grad_norm_before": 12.3, "grad_norm_after": 10.0, "clipped": true, "clip_threshold": 10.0,
"clip_fraction": 0.45, "clip_fraction_total": 0.52, "skipped_steps": 0, "images_per_s": 14.2, ...}``.
On resume the log is cut back to the restored step, so a resumed run's log reads like an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import tensorflow as tf

from pipeline.files import atomic_write_text
from pipeline.model.losses import IOU_LOSS_NAME, LOSS_NAMES

LOG_NAME = "train_log.jsonl"


def _jsonable(value: Any) -> Any:
    """JSON has no NaN/inf: a non-finite number (a NaN loss, an inactive threshold) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_log(model_dir: Path) -> list[dict[str, Any]]:
    """All records of `model_dir/train_log.jsonl` (empty list if absent)."""
    path = Path(model_dir) / LOG_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Telemetry:
    """Writes scalars to `model_dir/tensorboard/` and `model_dir/train_log.jsonl`."""

    def __init__(self, model_dir: Path, start_step: int = 0):
        self.model_dir = Path(model_dir)
        self.path = self.model_dir / LOG_NAME
        # Keep only records up to the step we resume from (a killed run may have logged further).
        kept = (
            [r for r in read_log(self.model_dir) if int(r.get("step", 0)) <= start_step] if start_step else []
        )
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        self._writer = tf.summary.create_file_writer(str(self.model_dir / "tensorboard"))

    def log(self, step: int, scalars: dict[str, Any]) -> dict[str, Any]:
        """Record `scalars` for `step` in both sinks; returns the JSON record."""
        record = {"step": int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
        with self._writer.as_default(step=int(step)):
            for key, value in scalars.items():
                if isinstance(value, (bool, int, float)):
                    tf.summary.scalar(_tb_name(key), float(value))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # one complete line per logged step, readable while training runs
        return record

    def flush(self) -> None:
        self._writer.flush()
        self._file.flush()

    def close(self) -> None:
        self._writer.close()
        self._file.close()


def _tb_name(key: str) -> str:
    """Group scalars in TensorBoard: losses/, clip/, perf/, train/."""
    if key in ("loss", *LOSS_NAMES, IOU_LOSS_NAME, "regularization"):
        return f"losses/{key}"
    if key.startswith(("grad_norm", "clip")) or key in {"clipped", "skipped_steps"}:
        return f"clip/{key}"
    if key in {"images_per_s", "steps_per_s"}:
        return f"perf/{key}"
    return f"train/{key}"
