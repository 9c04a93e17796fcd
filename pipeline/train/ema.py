"""Weight averaging: an exponential moving average (EMA) of the model's weights, validated and exported
instead of the last weights (`train.ema_decay`).

Every float variable of the model is averaged — the trainable weights and the BatchNorm moving statistics,
as timm's ModelEmaV2 does — so the averaged weights are scored with statistics that match them. The decay
ramps up as `min(decay, (1 + n) / (10 + n))` after `n` updates (TensorFlow's
`ExponentialMovingAverage(num_updates=...)`), so early averages are not dominated by the random
initialisation. The averages and the update count are checkpointed beside the model: a resumed run
continues the same average.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import keras
import numpy as np
import tensorflow as tf

from pipeline.train.variables import state_variable


class AverageState(tf.Module):
    """What a checkpoint saves of the average: one variable per averaged model variable, and the count."""

    def __init__(self, sources: list[keras.Variable]):
        super().__init__(name="weight_average")
        self.averages = [
            state_variable(tf.convert_to_tensor(v), f"average_{i}") for i, v in enumerate(sources)
        ]
        self.updates = state_variable(tf.constant(0, tf.int64), "updates")


class WeightAverage:
    """The EMA of `model`'s float variables. `update()` after each optimizer step; `applied()` for a block
    in which the model holds the averages; `copy_to_model()` to keep them."""

    def __init__(self, model: keras.Model, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self._sources = [v for v in model.variables if "float" in str(v.dtype)]
        self.state = AverageState(self._sources)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = float(self.state.updates.numpy())
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @tf.function
    def update(self) -> None:
        """Move every average towards its variable's current value."""
        n = tf.cast(self.state.updates, tf.float32)
        decay = tf.minimum(tf.constant(self.decay, tf.float32), (1.0 + n) / (10.0 + n))
        for average, source in zip(self.state.averages, self._sources):
            value = tf.cast(tf.convert_to_tensor(source), average.dtype)
            average.assign(decay * average + (1.0 - decay) * value)
        self.state.updates.assign_add(1)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; its own come back after (even on error)."""
        own = [np.array(v.numpy()) for v in self._sources]
        self.copy_to_model()
        try:
            yield
        finally:
            for source, value in zip(self._sources, own):
                source.assign(value)

    def copy_to_model(self) -> None:
        """Overwrite the model's variables with their averages."""
        for source, average in zip(self._sources, self.state.averages):
            source.assign(tf.cast(average, source.dtype))
