"""Learning-rate schedules: linear warmup, then cosine, step or constant (config `train.schedule`), and the
fitting of a schedule's length to a wall-time budget (`train.time_budget_minutes`, docs/training.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from pipeline.config import ScheduleConfig
from pipeline.train.variables import state_variable


@keras.saving.register_keras_serializable(package="satdet")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step) = peak · warmup(step) · decay(step).

    Warmup rises linearly from ``warmup_factor`` to 1 over ``warmup_steps``. Decay over the whole run of
    ``total_steps``: ``cosine`` goes from 1 to ``final_factor`` (half cosine), ``step`` multiplies by
    ``gamma`` at each milestone (fractions of ``total_steps``), ``constant`` stays at 1. ``total_steps``
    may be an integer `tf.Variable` (`ScheduleLength.steps`): the schedule then reads it at each call, so
    changing it changes a traced train step's learning rate without retracing.
    """

    def __init__(
        self,
        peak: float,
        total_steps: int | tf.Variable,
        name: str = "cosine",
        warmup_steps: int = 0,
        warmup_factor: float = 0.001,
        milestones: tuple[float, ...] = (),
        gamma: float = 0.1,
        final_factor: float = 0.0,
    ):
        self.peak, self.name = float(peak), name
        self.total_steps = total_steps if isinstance(total_steps, tf.Variable) else int(total_steps)
        self.warmup_steps, self.warmup_factor = int(warmup_steps), float(warmup_factor)
        self.milestones, self.gamma, self.final_factor = (
            tuple(float(m) for m in milestones),
            float(gamma),
            float(final_factor),
        )

    def __call__(self, step: Any) -> tf.Tensor:
        step = tf.cast(step, tf.float32)
        if self.warmup_steps > 0:
            frac = tf.minimum(step / self.warmup_steps, 1.0)
            warm = self.warmup_factor + (1.0 - self.warmup_factor) * frac
        else:
            warm = tf.constant(1.0)
        if self.name == "cosine":
            t = tf.clip_by_value(step / self._length(), 0.0, 1.0)
            decay = self.final_factor + (1.0 - self.final_factor) * 0.5 * (1.0 + tf.cos(math.pi * t))
        elif self.name == "step":
            passed = tf.add_n(
                [tf.cast(step >= self._boundary(m), tf.float32) for m in self.milestones] or [0.0]
            )
            decay = tf.pow(self.gamma, passed)
        else:
            decay = tf.constant(1.0)
        return self.peak * warm * decay

    def _length(self) -> int | tf.Tensor:
        """max(total_steps, 1); a variable's value as float32 (the same number a Python int becomes)."""
        if isinstance(self.total_steps, int):
            return max(self.total_steps, 1)
        return tf.cast(tf.maximum(self.total_steps, 1), tf.float32)

    def _boundary(self, fraction: float) -> float | tf.Tensor:
        """fraction · total_steps, computed in float64 and rounded once to float32, as a Python float is."""
        if isinstance(self.total_steps, int):
            return fraction * self.total_steps
        return tf.cast(fraction * tf.cast(self.total_steps, tf.float64), tf.float32)

    def get_config(self) -> dict[str, Any]:
        return {
            "peak": self.peak,
            "total_steps": int(self.total_steps),  # a variable's current value
            "name": self.name,
            "warmup_steps": self.warmup_steps,
            "warmup_factor": self.warmup_factor,
            "milestones": list(self.milestones),
            "gamma": self.gamma,
            "final_factor": self.final_factor,
        }


def build_schedule(cfg: ScheduleConfig, peak: float, total_steps: int | tf.Variable) -> WarmupSchedule:
    """The schedule described by the `train.schedule` block for a run of `total_steps` (an int, or the
    variable of a `ScheduleLength` when the length is fitted to a time budget)."""
    return WarmupSchedule(
        peak=peak,
        total_steps=total_steps,
        name=cfg.name,
        warmup_steps=cfg.warmup_steps,
        warmup_factor=cfg.warmup_factor,
        milestones=tuple(cfg.step_milestones),
        gamma=cfg.step_gamma,
        final_factor=cfg.final_factor,
    )


# ====================================================================================== time budget
class ScheduleLength(tf.Module):
    """The schedule's length as checkpointable variables: ``steps``, which `WarmupSchedule` reads, and
    ``fitted``, true once ``steps`` was shortened to fit a time budget. Create it in the strategy's scope."""

    def __init__(self, steps: int):
        super().__init__(name="schedule_length")
        self.steps = state_variable(tf.constant(int(steps), tf.int64), "steps")
        self.fitted = state_variable(False, "fitted")

    def value(self) -> int:
        return int(self.steps.numpy())

    def settle(self, planned: int) -> int:
        """After a restore: a fitted length is kept (capped at `planned`, i.e. train.steps), an unfitted
        one follows `planned` (so a changed train.steps stretches the schedule, as without a budget)."""
        self.steps.assign(min(self.value(), planned) if bool(self.fitted.numpy()) else planned)
        return self.value()

    def shorten(self, steps: int) -> None:
        self.steps.assign(int(steps))
        self.fitted.assign(True)


def _multiples_between(lo: int, hi: int, every: int) -> int:
    """How many multiples of `every` lie strictly between `lo` and `hi` (0 when `every` is 0)."""
    return max((hi - 1) // every - lo // every, 0) if every else 0


@dataclass
class BudgetFit:
    """Fits a run's length to a wall-time budget from measured times (pure Python; the loop feeds it).

    The step time is measured on the steps after the first one of the process (graph tracing) and the
    `skip` warm-up steps that follow, with validation and checkpoint time left out; the latest validation
    and checkpoint durations are budgeted separately, for the periodic ones still to come and for the
    final ones. `safety` of the budget is kept free (export, estimate errors). A fit only ever shortens,
    by at least `tolerance` steps.
    """

    budget_s: float
    planned: int  # train.steps: the length is never above it
    start: int  # the step this process started from
    eval_every: int = 0  # periodic validation interval (0 = none)
    checkpoint_every: int = 0
    evaluates: bool = False  # a validation runs at the end (and every eval_every steps)
    skip: int = 5
    min_measured: int = 5
    safety: float = 0.05
    train_s: float = 0.0
    measured: int = 0
    eval_s: float = 0.0
    checkpoint_s: float = 0.0
    rate: float | None = None  # steps/s of the latest fit

    @property
    def tolerance(self) -> int:
        return max(1, self.planned // 200)

    def step_done(self, step: int, seconds: float) -> None:
        """Step `step` took `seconds` of wall time (validation and checkpoint time excluded)."""
        if step > self.start + 1 + self.skip:
            self.train_s += seconds
            self.measured += 1

    def overhead(self, kind: str, seconds: float) -> None:
        """A validation (`kind` 'eval') or checkpoint ('checkpoint') took `seconds`."""
        setattr(self, f"{kind}_s", float(seconds))

    def need_s(self, step: int, end: int) -> float:
        """Estimated seconds from `step` to the end of a run of `end` steps, final validation and checkpoint
        included."""
        eval_s = self.eval_s if self.evaluates else 0.0
        evals = _multiples_between(step, end, self.eval_every)
        checkpoints = _multiples_between(step, end, self.checkpoint_every)
        return (end - step) / self.rate + (evals + 1) * eval_s + (checkpoints + 1) * self.checkpoint_s

    def fit(self, step: int, elapsed_s: float, current: int) -> int | None:
        """The longest length in [step, current] that ends within the budget when it is shorter than
        `current` by at least `tolerance`, else None (also while too few steps are measured)."""
        if self.measured < self.min_measured or self.train_s <= 0:
            return None
        self.rate = self.measured / self.train_s
        left = self.budget_s * (1.0 - self.safety) - elapsed_s
        if self.need_s(step, current) <= left:
            return None
        lo, hi = step, current - 1  # need_s grows with the length: bisect for the longest that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.need_s(step, mid) <= left else (lo, mid - 1)
        return lo if current - lo >= self.tolerance else None
