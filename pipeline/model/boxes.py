"""Box geometry in TensorFlow: IoU, the Faster R-CNN box coder, clipping, padded NMS.

Boxes are float32 ``x0, y0, x1, y1`` in pixels with pixel edges at integers (width = x1 - x0, as in
torchvision). TF ops that want ``y0, x0, y1, x1`` get it only here. All functions are shape-static and
XLA-compatible; box math always runs in float32, whatever the model's compute dtype.
"""

from __future__ import annotations

import math

import tensorflow as tf

# torchvision's clamp on dw/dh before exp(): a box can grow at most 1000/16 times in one decode.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def xyxy_to_yxyx(boxes: tf.Tensor) -> tf.Tensor:
    """Swap to TF's ``y0, x0, y1, x1`` order (its own inverse)."""
    x0, y0, x1, y1 = tf.unstack(boxes, axis=-1)
    return tf.stack([y0, x0, y1, x1], axis=-1)


yxyx_to_xyxy = xyxy_to_yxyx


def area(boxes: tf.Tensor) -> tf.Tensor:
    """Area of xyxy boxes (0 for degenerate ones)."""
    return tf.maximum(boxes[..., 2] - boxes[..., 0], 0.0) * tf.maximum(boxes[..., 3] - boxes[..., 1], 0.0)


def pairwise_iou(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """IoU of every box in ``a`` [..., N, 4] with every box in ``b`` [..., M, 4] -> [..., N, M].

    Leading (batch) dimensions must match. Pairs with zero union (two empty boxes) get IoU 0.
    """
    a = tf.cast(a, tf.float32)
    b = tf.cast(b, tf.float32)
    ax0, ay0, ax1, ay1 = (a[..., :, None, i] for i in range(4))
    bx0, by0, bx1, by1 = (b[..., None, :, i] for i in range(4))
    iw = tf.maximum(tf.minimum(ax1, bx1) - tf.maximum(ax0, bx0), 0.0)
    ih = tf.maximum(tf.minimum(ay1, by1) - tf.maximum(ay0, by0), 0.0)
    inter = iw * ih
    union = area(a)[..., :, None] + area(b)[..., None, :] - inter
    return tf.math.divide_no_nan(inter, union)


def _overlap(a: tf.Tensor, b: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """float32 ``a``, ``b`` and the element-wise intersection and union areas of matching boxes [..., 4]."""
    a = tf.cast(a, tf.float32)
    b = tf.cast(b, tf.float32)
    iw = tf.maximum(tf.minimum(a[..., 2], b[..., 2]) - tf.maximum(a[..., 0], b[..., 0]), 0.0)
    ih = tf.maximum(tf.minimum(a[..., 3], b[..., 3]) - tf.maximum(a[..., 1], b[..., 1]), 0.0)
    inter = iw * ih
    return a, b, inter, area(a) + area(b) - inter


def matched_iou(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Element-wise IoU of matching boxes ``a``, ``b`` [..., 4] (0 for empty boxes)."""
    _a, _b, inter, union = _overlap(a, b)
    return tf.math.divide_no_nan(inter, union)


def generalized_iou(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Element-wise GIoU of matching boxes ``a``, ``b`` [..., 4] (Rezatofighi et al. 2019): IoU minus the
    fraction of the smallest enclosing box that neither covers. In [-1, 1]; differentiable in ``a``."""
    a, b, inter, union = _overlap(a, b)
    hull = (tf.maximum(a[..., 2], b[..., 2]) - tf.minimum(a[..., 0], b[..., 0])) * (
        tf.maximum(a[..., 3], b[..., 3]) - tf.minimum(a[..., 1], b[..., 1]))
    return tf.math.divide_no_nan(inter, union) - tf.math.divide_no_nan(hull - union, hull)


def clip_boxes(boxes: tf.Tensor, height: float | tf.Tensor, width: float | tf.Tensor) -> tf.Tensor:
    """Clip xyxy boxes to the image ``[0, width] x [0, height]``."""
    x0, y0, x1, y1 = tf.unstack(boxes, axis=-1)
    w = tf.cast(width, boxes.dtype)
    h = tf.cast(height, boxes.dtype)
    return tf.stack(
        [tf.clip_by_value(x0, 0.0, w), tf.clip_by_value(y0, 0.0, h), tf.clip_by_value(x1, 0.0, w), tf.clip_by_value(y1, 0.0, h)],
        axis=-1,
    )


class BoxCoder:
    """Encodes boxes as deltas ``(dx, dy, dw, dh)`` relative to reference boxes, and back.

    Args:
        weights: multipliers of (dx, dy, dw, dh) — (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head,
            which scales the regression targets to unit-ish variance.
        scale_clamp: upper bound on dw, dh before ``exp`` so a bad prediction cannot overflow.
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = DEFAULT_SCALE_CLAMP) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def encode(self, reference: tf.Tensor, boxes: tf.Tensor) -> tf.Tensor:
        """Deltas that turn ``reference`` into ``boxes`` (same shapes [..., 4])."""
        wx, wy, ww, wh = self.weights
        rw = reference[..., 2] - reference[..., 0]
        rh = reference[..., 3] - reference[..., 1]
        rx = reference[..., 0] + 0.5 * rw
        ry = reference[..., 1] + 0.5 * rh
        # Degenerate (padding) boxes would give log(0); their targets are masked out by the caller anyway.
        rw = tf.maximum(rw, 1e-6)
        rh = tf.maximum(rh, 1e-6)
        bw = tf.maximum(boxes[..., 2] - boxes[..., 0], 1e-6)
        bh = tf.maximum(boxes[..., 3] - boxes[..., 1], 1e-6)
        bx = boxes[..., 0] + 0.5 * (boxes[..., 2] - boxes[..., 0])
        by = boxes[..., 1] + 0.5 * (boxes[..., 3] - boxes[..., 1])
        return tf.stack(
            [wx * (bx - rx) / rw, wy * (by - ry) / rh, ww * tf.math.log(bw / rw), wh * tf.math.log(bh / rh)], axis=-1
        )

    def decode(self, reference: tf.Tensor, deltas: tf.Tensor) -> tf.Tensor:
        """Boxes obtained by applying ``deltas`` [..., 4] to ``reference`` [..., 4] (broadcasting)."""
        deltas = tf.cast(deltas, tf.float32)
        wx, wy, ww, wh = self.weights
        rw = reference[..., 2] - reference[..., 0]
        rh = reference[..., 3] - reference[..., 1]
        rx = reference[..., 0] + 0.5 * rw
        ry = reference[..., 1] + 0.5 * rh
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = tf.minimum(deltas[..., 2] / ww, self.scale_clamp)
        dh = tf.minimum(deltas[..., 3] / wh, self.scale_clamp)
        cx = dx * rw + rx
        cy = dy * rh + ry
        w = tf.exp(dw) * rw
        h = tf.exp(dh) * rh
        return tf.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def batched_nms(
    boxes: tf.Tensor,
    scores: tf.Tensor,
    groups: tf.Tensor | None,
    max_output: int,
    iou_threshold: float,
    score_threshold: float = float("-inf"),
    impl: str = "padded",
) -> tuple[tf.Tensor, tf.Tensor]:
    """NMS per image and per group (class or FPN level), static output size.

    Args:
        boxes: [B, N, 4] xyxy float32.
        scores: [B, N] float32; entries below ``score_threshold`` are never kept.
        groups: [B, N] int group ids, or None. Boxes of different groups never suppress each other: each
            group is shifted to its own region of the plane (offset ``group * (max_coord + 1)``).
        max_output: number of kept boxes per image (output is padded to this).
        impl: 'padded' — ``tf.image.non_max_suppression_padded``, batched pure TF ops meant for XLA
            (GPU/TPU); 'greedy' — the C++ ``tf.image.non_max_suppression`` kernel per image in a map_fn,
            the natural CPU path. Both keep the same boxes in the same order (tested; see kernels.py).

    Returns:
        ``(indices [B, max_output] int32 into N, sorted by score; valid [B] int32)``. Padding indices are 0.
    """
    boxes = tf.cast(boxes, tf.float32)
    scores = tf.cast(scores, tf.float32)
    if groups is not None:
        extent = tf.reduce_max(tf.abs(boxes)) + 1.0
        boxes = boxes + (tf.cast(groups, tf.float32) * extent)[..., None]
    n = boxes.shape[1]
    max_output = min(int(max_output), int(n))
    if impl == "greedy":
        return _greedy_nms(boxes, scores, max_output, iou_threshold, score_threshold)
    if impl != "padded":
        raise ValueError(f"unknown NMS implementation {impl!r}; use 'padded' or 'greedy'")
    return _padded_nms(boxes, scores, max_output, iou_threshold, score_threshold)


def _greedy_nms(boxes: tf.Tensor, scores: tf.Tensor, max_output: int, iou_threshold: float,
                score_threshold: float) -> tuple[tf.Tensor, tf.Tensor]:
    """`batched_nms` with the C++ kernel, one image at a time."""
    def one(args: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        b, s = args
        keep = tf.image.non_max_suppression(b, s, max_output, iou_threshold, score_threshold)
        count = tf.shape(keep)[0]
        return tf.pad(keep, [[0, max_output - count]]), count

    indices, valid = tf.map_fn(
        one, (boxes, scores), parallel_iterations=None if tf.executing_eagerly() else 8,
        fn_output_signature=(tf.TensorSpec([max_output], tf.int32), tf.TensorSpec([], tf.int32)),
    )
    return indices, valid


def _padded_nms(boxes: tf.Tensor, scores: tf.Tensor, max_output: int, iou_threshold: float,
                score_threshold: float) -> tuple[tf.Tensor, tf.Tensor]:
    """`batched_nms` with non_max_suppression_padded: batched, pure TF ops (compiles with XLA), and it
    sorts by score itself."""
    indices, valid = tf.image.non_max_suppression_padded(
        xyxy_to_yxyx(boxes),
        scores,
        max_output_size=max_output,
        iou_threshold=iou_threshold,
        score_threshold=score_threshold,
        pad_to_max_output_size=True,
        canonicalized_coordinates=True,
    )
    mask = tf.range(max_output)[None, :] < valid[:, None]
    return tf.where(mask, indices, 0), tf.cast(valid, tf.int32)
