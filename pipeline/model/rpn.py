"""Region Proposal Network: the head (convolutions), anchor matching, balanced sampling, proposal
decoding with padded NMS, and the RPN loss — all static-shape, batched over images.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from pipeline.model.boxes import BoxCoder, batched_nms, clip_boxes, pairwise_iou
from pipeline.model.losses import binary_cross_entropy, masked_sum, smooth_l1
from pipeline.model.padding import pad_rows


class RPNHead(keras.layers.Layer):
    """Shared 3x3 conv + ReLU, then 1x1 convs for objectness (A per location) and box deltas (4A).

    Applied to every FPN level with the same weights; returns float32 ``logits [B, N]`` and
    ``deltas [B, N, 4]`` with N = sum over levels of h * w * A, in (level, row, column, anchor) order.
    """

    def __init__(self, channels: int, num_anchors: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.channels = channels
        self.num_anchors = num_anchors
        init = keras.initializers.RandomNormal(stddev=0.01)  # torchvision's RPN head init
        self.conv = keras.layers.Conv2D(channels, 3, padding="same", activation="relu", kernel_initializer=init,
                                        dtype=self.dtype_policy, name="conv")
        self.cls = keras.layers.Conv2D(num_anchors, 1, kernel_initializer=init, dtype=self.dtype_policy, name="cls")
        self.box = keras.layers.Conv2D(4 * num_anchors, 1, kernel_initializer=init, dtype=self.dtype_policy,
                                       name="box")

    def call(self, features: list[tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        logits, deltas = [], []
        for f in features:
            t = self.conv(f)
            b = f.shape[0] if f.shape[0] is not None else tf.shape(f)[0]
            logits.append(tf.reshape(tf.cast(self.cls(t), tf.float32), [b, -1]))
            deltas.append(tf.reshape(tf.cast(self.box(t), tf.float32), [b, -1, 4]))
        return tf.concat(logits, axis=1), tf.concat(deltas, axis=1)

    def get_config(self) -> dict:
        return {**super().get_config(), "channels": self.channels, "num_anchors": self.num_anchors}


def gt_valid_mask(num_boxes: tf.Tensor, max_boxes: int) -> tf.Tensor:
    """[B, M] bool: which padded ground-truth slots hold a real box."""
    return tf.range(max_boxes)[None, :] < tf.cast(num_boxes, tf.int32)[:, None]


def masked_iou(boxes: tf.Tensor, gt_boxes: tf.Tensor, gt_valid: tf.Tensor) -> tf.Tensor:
    """IoU [B, N, M] of boxes ([N, 4] shared or [B, N, 4]) with GT [B, M, 4]; padding GT columns are -1."""
    if len(boxes.shape) == 2:
        boxes = boxes[None]
    iou = pairwise_iou(boxes, gt_boxes)
    return tf.where(gt_valid[:, None, :], iou, -1.0)


def match_anchors(
    iou: tf.Tensor, fg_iou: float, bg_iou: float, allow_low_quality: bool = True
) -> tuple[tf.Tensor, tf.Tensor]:
    """Label anchors from their IoU [B, N, M] with the (masked) GT.

    Returns ``labels [B, N]`` (1 positive, 0 negative, -1 ignored: between the thresholds) and the index of
    the best GT ``[B, N]``. With ``allow_low_quality`` an anchor that is the best match of some GT box is
    positive even below ``fg_iou`` — otherwise small or oddly shaped objects would get no anchor at all.
    """
    best = tf.reduce_max(iou, axis=2)
    best_gt = tf.argmax(iou, axis=2, output_type=tf.int32)
    # best < 0 means the image has no GT at all: every anchor is background.
    labels = tf.where(best >= fg_iou, 1, tf.where(best < bg_iou, 0, -1))
    if allow_low_quality:
        per_gt_best = tf.reduce_max(iou, axis=1, keepdims=True)  # [B, 1, M]
        # Only real GT with some overlap; ties (several anchors with the same best IoU) all count, as in torchvision.
        is_best = (iou >= per_gt_best) & (per_gt_best > 0.0)
        labels = tf.where(tf.reduce_any(is_best, axis=2), 1, labels)
    return labels, best_gt


def sample_balanced(
    labels: tf.Tensor, num_samples: int, positive_fraction: float, seed: keras.random.SeedGenerator | int | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Pick at most ``num_samples`` per image, at most ``positive_fraction`` of them positive (label 1); the
    rest negative (label 0). Uniformly at random via top-k over masked random scores (static shapes).

    Returns boolean masks ``(positive [B, N], negative [B, N])``.
    """
    n = labels.shape[1]
    # Stateless draws from a keras SeedGenerator: XLA-friendly, and the RNG state is a model variable.
    u = keras.random.uniform(tf.shape(labels), dtype="float32", seed=seed)
    num_pos_max = int(num_samples * positive_fraction)
    num_pos = tf.minimum(tf.reduce_sum(tf.cast(labels == 1, tf.int32), axis=1), num_pos_max)
    num_neg = tf.minimum(tf.reduce_sum(tf.cast(labels == 0, tf.int32), axis=1), num_samples - num_pos)
    positive = _take_first(tf.where(labels == 1, u, -1.0), num_pos, max(min(num_pos_max, n), 1))
    negative = _take_first(tf.where(labels == 0, u, -1.0), num_neg, min(num_samples, n))
    return positive, negative


def _take_first(keys: tf.Tensor, count: tf.Tensor, k: int) -> tf.Tensor:
    """Mask [B, N] of the ``count[b]`` largest keys of each row (scattered top-k indices: exact counts)."""
    idx = tf.math.top_k(keys, k=k).indices  # [B, k]
    keep = tf.range(k)[None, :] < count[:, None]
    rows = tf.broadcast_to(tf.range(tf.shape(keys)[0])[:, None], tf.shape(idx))
    hits = tf.scatter_nd(tf.stack([rows, idx], axis=-1), tf.cast(keep, tf.int32), tf.shape(keys))
    return hits > 0


def rpn_loss(
    logits: tf.Tensor,
    deltas: tf.Tensor,
    anchors: tf.Tensor,
    gt_boxes: tf.Tensor,
    matched_gt: tf.Tensor,
    positive: tf.Tensor,
    negative: tf.Tensor,
    coder: BoxCoder,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Objectness BCE (mean over sampled anchors) and box smooth-L1 (sum over positives / sampled), as torchvision."""
    sampled = positive | negative
    count = tf.maximum(tf.reduce_sum(tf.cast(sampled, tf.float32)), 1.0)
    objectness = masked_sum(binary_cross_entropy(logits, tf.cast(positive, tf.float32)), sampled) / count
    matched = tf.gather(gt_boxes, matched_gt, batch_dims=1)  # [B, N, 4]
    targets = coder.encode(tf.broadcast_to(anchors[None], tf.shape(matched)), matched)
    box = masked_sum(smooth_l1(deltas - tf.stop_gradient(targets)), positive) / count
    return objectness, box


def propose(
    logits: tf.Tensor,
    deltas: tf.Tensor,
    level_anchors: list[tf.Tensor],
    image_size: tuple[int, int],
    coder: BoxCoder,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_iou: float,
    min_size: float = 1e-3,
    nms_impl: str = "padded",
    with_scores: bool = False,
) -> tuple[tf.Tensor, ...]:
    """Proposals per image: top-k objectness per level, decode, clip, NMS per level, keep the best overall.

    Returns ``boxes [B, post_nms_top_n, 4]`` sorted by objectness and ``valid [B, post_nms_top_n]`` bool;
    ``with_scores`` adds their objectness probabilities ``[B, post_nms_top_n]`` (0 on padding rows).
    Gradients do not flow into proposals (Faster R-CNN treats them as fixed inputs to the second stage).
    """
    logits = tf.stop_gradient(logits)
    deltas = tf.stop_gradient(deltas)
    height, width = image_size
    boxes_l, scores_l, levels_l = [], [], []
    start = 0
    for level, anchors in enumerate(level_anchors):
        n = anchors.shape[0]
        k = min(pre_nms_top_n, n)
        scores, idx = tf.math.top_k(logits[:, start:start + n], k=k)
        d = tf.gather(deltas[:, start:start + n], idx, batch_dims=1)
        boxes = clip_boxes(coder.decode(tf.gather(anchors, idx), d), height, width)
        boxes_l.append(boxes)
        scores_l.append(scores)
        levels_l.append(tf.fill(tf.shape(scores), level))
        start += n
    boxes = tf.concat(boxes_l, axis=1)
    scores = tf.concat(scores_l, axis=1)
    big_enough = ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)
    scores = tf.where(big_enough, scores, -1e9)
    keep, num = batched_nms(boxes, scores, tf.concat(levels_l, axis=1), post_nms_top_n, nms_iou,
                            score_threshold=-1e8, impl=nms_impl)
    out = pad_rows(tf.gather(boxes, keep, batch_dims=1), post_nms_top_n)
    valid = pad_rows(tf.range(keep.shape[1])[None, :] < num[:, None], post_nms_top_n)
    out = tf.where(valid[..., None], out, 0.0)
    if not with_scores:
        return out, valid
    probs = pad_rows(tf.sigmoid(tf.gather(scores, keep, batch_dims=1)), post_nms_top_n)
    return out, valid, tf.where(valid, probs, 0.0)
