"""Padding to a static size: NMS and sampling keep at most the candidates there are, which on a tiny image
is fewer than the fixed count the next stage's static shapes expect."""

from __future__ import annotations

import tensorflow as tf


def pad_rows(x: tf.Tensor, rows: int) -> tf.Tensor:
    """Zero-pad axis 1 of `x` [B, N, ...] at the end to `rows` (static); `x` itself when N >= rows.

    The padding rows are zero: 0 boxes and scores, class 0, and False in a validity mask."""
    pad = rows - x.shape[1]
    if pad <= 0:
        return x
    return tf.pad(x, [[0, 0], [0, pad]] + [[0, 0]] * (len(x.shape) - 2))
