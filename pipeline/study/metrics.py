"""Per-run numbers read from the trainer's telemetry (`train_log.jsonl`, one record per step in a study).

The *target loss* rule (documented in docs/clipping.md): every run with the same seed starts from the same
weights and sees the same batches, so the loss before any update is shared by all its strategies and
learning rates. The reference initial loss of a seed is the median over its runs of the mean loss of the
first `window` steps; the target is `fraction` × that reference (or an absolute `target_loss`). A run
reaches the target at the first step where the mean of its last `window` losses (all finite) is at or
below it. Steps are optimizer steps, counted from 1.

A run that stays finite but ends well *above* its seed's reference initial loss (final loss = mean of the
last `final_window` steps > UNSTABLE_FACTOR × reference) blew up without producing a NaN: it is reported as
'unstable' — what the non-finite test ('diverged') does not catch. The factor keeps a run that merely has
not learned yet (final ≈ initial, batch noise either way) out of that class.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Series:
    """Per-step telemetry of one run (NaN where the value was null or absent)."""

    steps: np.ndarray
    loss: np.ndarray
    norm_before: np.ndarray
    norm_after: np.ndarray


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a train_log.jsonl (empty when missing; a torn last line is ignored). Read here rather
    than through pipeline.train.telemetry so reporting never imports TensorFlow."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def series(records: list[dict[str, Any]]) -> Series:
    """Training-step records only (validation lines carry no loss), in step order."""
    rows = sorted((r for r in records if "loss" in r or "grad_norm_before" in r), key=lambda r: int(r["step"]))

    def col(key: str) -> np.ndarray:
        return np.array([math.nan if r.get(key) is None else float(r[key]) for r in rows], dtype=float)

    return Series(
        steps=np.array([int(r["step"]) for r in rows], dtype=int),
        loss=col("loss"),
        norm_before=col("grad_norm_before"),
        norm_after=col("grad_norm_after"),
    )


def initial_loss(s: Series, window: int) -> float:
    """Mean loss of the first `window` steps (NaN when any of them is non-finite or the log is empty)."""
    head = s.loss[:window]
    return float(head.mean()) if len(head) and np.isfinite(head).all() else math.nan


def reference_loss(initial_losses: list[float]) -> float:
    """A seed's reference initial loss: the median of its runs' initial losses (finite ones)."""
    finite = [x for x in initial_losses if math.isfinite(x)]
    return float(np.median(finite)) if finite else math.nan


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` values at each index (NaN until `window` values exist or if one is NaN)."""
    out = np.full(len(values), math.nan)
    for i in range(window - 1, len(values)):
        out[i] = values[i - window + 1 : i + 1].mean()  # a NaN in the window keeps it NaN
    return out


def steps_to_target(s: Series, target: float, window: int) -> int | None:
    """First step whose trailing `window`-step mean loss is <= target; None if never (or no target)."""
    if not math.isfinite(target):
        return None
    smooth = trailing_mean(s.loss, window)
    hits = np.flatnonzero(np.isfinite(smooth) & (smooth <= target))
    return int(s.steps[hits[0]]) if len(hits) else None


def peak_loss(s: Series, window: int) -> float:
    """Highest finite trailing `window`-step mean loss (a transient blow-up that later recovered shows here)."""
    smooth = trailing_mean(s.loss, window)
    smooth = smooth[np.isfinite(smooth)]
    return float(smooth.max()) if len(smooth) else math.nan


def final_loss(s: Series, window: int) -> tuple[float, float]:
    """(mean, standard error) of the loss over the last `window` steps; NaN when one is non-finite.

    The standard error measures batch-to-batch noise only, not run-to-run variation (that needs seeds)."""
    tail = s.loss[-window:]
    if not len(tail) or not np.isfinite(tail).all():
        return math.nan, math.nan
    sem = float(tail.std(ddof=1) / math.sqrt(len(tail))) if len(tail) > 1 else math.nan
    return float(tail.mean()), sem


UNSTABLE_FACTOR = 1.5


def blew_up(final: float, reference: float) -> bool:
    """A finite final loss above UNSTABLE_FACTOR × the reference initial loss (the 'unstable' rule)."""
    return math.isfinite(final) and math.isfinite(reference) and final > UNSTABLE_FACTOR * reference


def first_nonfinite_step(s: Series) -> int | None:
    """First step with a non-finite loss or gradient norm (the trainer skipped its update)."""
    bad = np.flatnonzero(~np.isfinite(s.loss) | ~np.isfinite(s.norm_before))
    return int(s.steps[bad[0]]) if len(bad) else None


def norm_percentiles(s: Series, qs: tuple[float, ...], skip_fraction: float = 0.0) -> list[float]:
    """Percentiles of the finite pre-clipping global norms, after dropping the first `skip_fraction` steps."""
    start = int(len(s.norm_before) * skip_fraction)
    norms = s.norm_before[start:]
    norms = norms[np.isfinite(norms)]
    return [float(np.percentile(norms, q)) for q in qs] if len(norms) else [math.nan] * len(qs)
