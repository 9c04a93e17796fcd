"""Loss terms of both stages (float32), as in torchvision: cross-entropy + smooth-L1 with beta = 1/9.

smooth_l1(x; beta) = 0.5 x^2 / beta if |x| < beta else |x| - 0.5 beta.  Note that
``keras.losses.Huber(delta=d)`` equals ``d * smooth_l1(beta=d)`` — so we write the formula out.
"""

from __future__ import annotations

import tensorflow as tf

SMOOTH_L1_BETA = 1.0 / 9.0
# The detector's loss terms, in the order FasterRCNN.compute_losses returns them.
LOSS_NAMES = ("rpn_objectness", "rpn_box", "roi_class", "roi_box")
IOU_LOSS_NAME = "roi_iou"  # a fifth term, with model.iou_score only


def smooth_l1(diff: tf.Tensor, beta: float = SMOOTH_L1_BETA) -> tf.Tensor:
    """Element-wise smooth-L1 of ``diff`` (prediction - target)."""
    absd = tf.abs(tf.cast(diff, tf.float32))
    return tf.where(absd < beta, 0.5 * tf.square(absd) / beta, absd - 0.5 * beta)


def binary_cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Element-wise sigmoid cross-entropy from logits."""
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(labels, tf.float32), logits=tf.cast(logits, tf.float32))


def softmax_cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Element-wise softmax cross-entropy from logits [..., K+1] and integer labels [...] (0 = background)."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32))


def masked_sum(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Sum of ``values`` where ``mask`` (broadcast to values' shape) is true."""
    mask = tf.cast(mask, tf.float32)
    while len(mask.shape) < len(values.shape):
        mask = mask[..., None]
    return tf.reduce_sum(values * mask)
