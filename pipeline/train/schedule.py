"""Learning-rate schedules: linear warmup, then cosine, step or constant (config `train.schedule`)."""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf

from pipeline.config import ScheduleConfig


@keras.saving.register_keras_serializable(package="satdet")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step) = peak · warmup(step) · decay(step).

    Warmup rises linearly from ``warmup_factor`` to 1 over ``warmup_steps``. Decay over the whole run of
    ``total_steps``: ``cosine`` goes from 1 to ``final_factor`` (half cosine), ``step`` multiplies by
    ``gamma`` at each milestone (fractions of ``total_steps``), ``constant`` stays at 1.
    """

    def __init__(
        self,
        peak: float,
        total_steps: int,
        name: str = "cosine",
        warmup_steps: int = 0,
        warmup_factor: float = 0.001,
        milestones: tuple[float, ...] = (),
        gamma: float = 0.1,
        final_factor: float = 0.0,
    ):
        self.peak, self.total_steps, self.name = float(peak), int(total_steps), name
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
            t = tf.clip_by_value(step / max(self.total_steps, 1), 0.0, 1.0)
            decay = self.final_factor + (1.0 - self.final_factor) * 0.5 * (1.0 + tf.cos(math.pi * t))
        elif self.name == "step":
            passed = tf.add_n(
                [tf.cast(step >= m * self.total_steps, tf.float32) for m in self.milestones] or [0.0]
            )
            decay = tf.pow(self.gamma, passed)
        else:
            decay = tf.constant(1.0)
        return self.peak * warm * decay

    def get_config(self) -> dict[str, Any]:
        return {
            "peak": self.peak,
            "total_steps": self.total_steps,
            "name": self.name,
            "warmup_steps": self.warmup_steps,
            "warmup_factor": self.warmup_factor,
            "milestones": list(self.milestones),
            "gamma": self.gamma,
            "final_factor": self.final_factor,
        }


def build_schedule(cfg: ScheduleConfig, peak: float, total_steps: int) -> WarmupSchedule:
    """The schedule described by the `train.schedule` block for a run of `total_steps`."""
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
