"""Run-state variables: the counters and statistics that the train step, the clippers, the schedule length
and the run keep beside the model, and that checkpoints save with it."""

from __future__ import annotations

from typing import Any

import tensorflow as tf


def state_variable(initial: Any, name: str) -> tf.Variable:
    """A non-trainable variable holding run state. Its value is the same on every replica (computed from
    all-reduced values, or written outside the replicated step), so under MirroredStrategy the first
    replica's write is the right aggregation."""
    return tf.Variable(
        initial, name=name, trainable=False, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA
    )
