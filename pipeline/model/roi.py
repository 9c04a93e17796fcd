"""Second stage: ROI sampling (GT appended), multi-level ROIAlign, the box head and its loss.

ROIAlign follows torchvision's ``roi_align(aligned=True, sampling_ratio=2)``: a box is scaled to the level
(``x * scale - 0.5``: pixel centres sit at integer feature coordinates), cut into ``size x size`` bins,
each bin averages ``2 x 2`` bilinear samples at the sub-bin centres, and samples in [-1, 0] or [h-1, h]
read the edge value. All levels are pooled in ONE op: each level is edge-padded by one pixel and they are
laid side by side on a canvas, so a box's samples map to canvas coordinates of its own level.

``shifts`` moves each level's samples by where its cells are really centred: Keras' stride-2 convolutions
pad one pixel more after than before, so a MobileNetV3 level-l cell sees the image centred 0.5·(2^l − 1) px
right of and below the nominal ``(i + ½)·2^l`` (ResNet-50's the same amount left/above; see
``backbone.feature_centre_shift``). Without it the pooled grid of a box sits that far off the box (3.5 px
on P3: a tenth of a 40 px crown) and the box head has to learn a correction that depends on the box size.

Two implementations of the same sampling: ``crop_and_resize`` (a fused TF kernel, fast on CPU; its sample
grid is made to coincide with ROIAlign's by choosing the crop box from the first and last sample) and
``gather`` (gather_nd + bilinear weights; compiles with XLA, where crop_and_resize has no kernel).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import tensorflow as tf

from pipeline.model.boxes import BoxCoder, generalized_iou, matched_iou
from pipeline.model.losses import binary_cross_entropy, masked_sum, smooth_l1, softmax_cross_entropy
from pipeline.model.padding import pad_rows
from pipeline.model.rpn import gt_valid_mask, masked_iou, sample_balanced

CANONICAL_SCALE = 224.0
CANONICAL_LEVEL = 4
# mmdetection's weight of the GIoU box loss in Faster R-CNN (its smooth-L1 / L1 weight is 1).
GIOU_LOSS_WEIGHT = 10.0


def assign_levels(boxes: tf.Tensor, min_level: int, max_level: int) -> tf.Tensor:
    """FPN level of each box: floor(4 + log2(sqrt(area) / 224)) clamped to [min_level, max_level] (int32)."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    size = tf.sqrt(tf.maximum(w * h, 1e-12))
    level = tf.floor(CANONICAL_LEVEL + tf.math.log(size / CANONICAL_SCALE) / math.log(2.0) + 1e-6)
    return tf.cast(tf.clip_by_value(level, min_level, max_level), tf.int32)


def sample_rois(
    proposals: tf.Tensor,
    proposal_valid: tf.Tensor,
    gt_boxes: tf.Tensor,
    gt_labels: tf.Tensor,
    num_boxes: tf.Tensor,
    num_samples: int,
    positive_fraction: float,
    fg_iou: float,
    seed: keras.random.SeedGenerator | int | None = None,
) -> dict[str, tf.Tensor]:
    """Sample ``num_samples`` ROIs per image from proposals plus the GT boxes themselves.

    A candidate is foreground (label = its best GT's class) at IoU >= ``fg_iou``, else background (0).
    Appending the GT guarantees positives early in training when proposals are still random.

    Returns a dict of ``boxes [B, S, 4]``, ``labels [B, S]`` int32, ``matched [B, S, 4]`` (the GT box of each
    ROI, for regression targets), ``valid [B, S]`` bool (fewer than S candidates leaves padding).
    """
    gt_valid = gt_valid_mask(num_boxes, gt_boxes.shape[1])
    candidates = tf.concat([proposals, gt_boxes], axis=1)
    cand_valid = tf.concat([proposal_valid, gt_valid], axis=1)
    iou = masked_iou(candidates, gt_boxes, gt_valid)
    best = tf.reduce_max(iou, axis=2)
    best_gt = tf.argmax(iou, axis=2, output_type=tf.int32)
    labels = tf.where(best >= fg_iou, 1, 0)
    labels = tf.where(cand_valid, labels, -1)
    positive, negative = sample_balanced(labels, num_samples, positive_fraction, seed)
    # Order: positives first, then negatives, then unused candidates; top-k of the key gives static indices.
    key = tf.cast(positive, tf.float32) * 2.0 + tf.cast(negative, tf.float32)
    n = candidates.shape[1]
    top, idx = tf.math.top_k(key, k=min(num_samples, n))
    valid = top >= 1.0
    class_ids = tf.gather(tf.cast(gt_labels, tf.int32), best_gt, batch_dims=1)
    roi_labels = tf.where(tf.gather(positive, idx, batch_dims=1), tf.gather(class_ids, idx, batch_dims=1), 0)
    matched = tf.gather(tf.gather(gt_boxes, best_gt, batch_dims=1), idx, batch_dims=1)
    out = {"boxes": tf.gather(candidates, idx, batch_dims=1), "labels": roi_labels, "matched": matched, "valid": valid}
    return {k: pad_rows(v, num_samples) for k, v in out.items()}  # padding ROIs are invalid


def _canvas(features: list[tf.Tensor]) -> tuple[tf.Tensor, list[int]]:
    """Lay levels side by side, each edge-padded by 1 px plus a zero column; return canvas and x offsets."""
    height = max(f.shape[1] for f in features) + 2
    parts, offsets, x = [], [], 0
    for f in features:
        f = tf.pad(f, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")  # edge values, like ROIAlign's clamp
        f = tf.pad(f, [[0, 0], [0, height - f.shape[1]], [0, 1], [0, 0]])
        parts.append(f)
        offsets.append(x)
        x += f.shape[2]
    return tf.concat(parts, axis=2), offsets


def _sample_grid(
    boxes: tf.Tensor, levels: tf.Tensor, min_level: int, offsets: list[int], output_size: int, sampling_ratio: int,
    shifts: Sequence[float] | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Canvas coordinates of the first sample (y, x) and the sample spacing (dy, dx) of each box [K]."""
    scale = tf.pow(2.0, -tf.cast(levels, tf.float32))
    offset = tf.gather(tf.constant(offsets, tf.float32), levels - min_level)
    shift = 0.0 if shifts is None else tf.gather(tf.constant(shifts, tf.float32), levels - min_level)
    x0 = (boxes[:, 0] - shift) * scale - 0.5
    y0 = (boxes[:, 1] - shift) * scale - 0.5
    step_x = (boxes[:, 2] - boxes[:, 0]) * scale / (output_size * sampling_ratio)
    step_y = (boxes[:, 3] - boxes[:, 1]) * scale / (output_size * sampling_ratio)
    # +1: the edge padding row/column in front of every level.
    return y0 + 0.5 * step_y + 1.0, x0 + 0.5 * step_x + 1.0 + offset, step_y, step_x


def roi_align(
    features: list[tf.Tensor],
    boxes: tf.Tensor,
    min_level: int,
    output_size: int = 7,
    sampling_ratio: int = 2,
    impl: str = "crop_and_resize",
    shifts: Sequence[float] | None = None,
) -> tf.Tensor:
    """Multi-level ROIAlign of ``boxes [B, R, 4]`` (xyxy image px) over FPN ``features`` (levels from
    ``min_level``, finest first) -> ``[B, R, output_size, output_size, C]`` float32. ``shifts``: per level,
    the pixels by which its cells are centred right of / below the nominal centre (|shift| < half a cell);
    the samples move with them.

    Boxes must lie inside the image (proposals and GT are clipped), so samples stay within one pixel of
    their level — exactly the range the edge padding reproduces.
    """
    b, r = boxes.shape[0] if boxes.shape[0] is not None else tf.shape(boxes)[0], boxes.shape[1]
    max_level = min_level + len(features) - 1
    flat = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    levels = assign_levels(flat, min_level, max_level)
    canvas, offsets = _canvas([tf.cast(f, tf.float32) for f in features])
    image_index = tf.repeat(tf.range(b), r)
    n = output_size * sampling_ratio
    y, x, dy, dx = _sample_grid(flat, levels, min_level, offsets, output_size, sampling_ratio, shifts)
    if impl == "crop_and_resize":
        hc, wc = canvas.shape[1] - 1, canvas.shape[2] - 1
        crop = tf.stack([y / hc, x / wc, (y + (n - 1) * dy) / hc, (x + (n - 1) * dx) / wc], axis=1)
        samples = tf.image.crop_and_resize(canvas, crop, image_index, [n, n], method="bilinear")
    elif impl == "gather":
        samples = _bilinear_gather(canvas, image_index, y, x, dy, dx, n)
    else:
        raise ValueError(f"unknown ROIAlign implementation {impl!r}")
    pooled = tf.nn.avg_pool2d(samples, sampling_ratio, sampling_ratio, "VALID")
    return tf.reshape(pooled, [b, r, output_size, output_size, canvas.shape[-1]])


def _bilinear_gather(
    canvas: tf.Tensor, image_index: tf.Tensor, y: tf.Tensor, x: tf.Tensor, dy: tf.Tensor, dx: tf.Tensor, n: int
) -> tf.Tensor:
    """Bilinear samples on an n x n grid per box via four gather_nd (XLA-compatible) -> [K, n, n, C]."""
    steps = tf.range(n, dtype=tf.float32)
    ys = y[:, None] + steps[None] * dy[:, None]  # [K, n]
    xs = x[:, None] + steps[None] * dx[:, None]
    hc, wc = canvas.shape[1], canvas.shape[2]
    ys = tf.clip_by_value(ys, 0.0, hc - 1.0)
    xs = tf.clip_by_value(xs, 0.0, wc - 1.0)
    y_lo = tf.minimum(tf.floor(ys), hc - 2.0)
    x_lo = tf.minimum(tf.floor(xs), wc - 2.0)
    wy = (ys - y_lo)[:, :, None, None]  # [K, n, 1, 1]
    wx = (xs - x_lo)[:, None, :, None]  # [K, 1, n, 1]
    y_lo = tf.cast(y_lo, tf.int32)
    x_lo = tf.cast(x_lo, tf.int32)
    k = tf.shape(ys)[0]
    bi = tf.broadcast_to(image_index[:, None, None], [k, n, n])

    def at(yy: tf.Tensor, xx: tf.Tensor) -> tf.Tensor:
        idx = tf.stack([bi, tf.broadcast_to(yy[:, :, None], [k, n, n]), tf.broadcast_to(xx[:, None, :], [k, n, n])], -1)
        return tf.gather_nd(canvas, idx)

    top = at(y_lo, x_lo) * (1.0 - wx) + at(y_lo, x_lo + 1) * wx
    bottom = at(y_lo + 1, x_lo) * (1.0 - wx) + at(y_lo + 1, x_lo + 1) * wx
    return top * (1.0 - wy) + bottom * wy


class BoxHead(keras.layers.Layer):
    """torchvision's TwoMLPHead + FastRCNNPredictor: flatten, 2 x (FC + ReLU), class logits [K+1] and
    class-specific box deltas [K * 4] (foreground classes only). Outputs are float32.

    With ``iou=True`` a third output, class-specific IoU logits [K]: the predicted IoU of each refined box
    with its object (IoU-Net / IoU-aware detectors), trained by `roi_iou_loss`.
    """

    def __init__(self, num_classes: int, hidden: int = 1024, iou: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.hidden = hidden
        self.fc1 = keras.layers.Dense(hidden, activation="relu", dtype=self.dtype_policy, name="fc1")
        self.fc2 = keras.layers.Dense(hidden, activation="relu", dtype=self.dtype_policy, name="fc2")
        self.cls = keras.layers.Dense(num_classes + 1, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                                      dtype=self.dtype_policy, name="cls")
        self.box = keras.layers.Dense(4 * num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
                                      dtype=self.dtype_policy, name="box")
        self.iou = keras.layers.Dense(num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                                      dtype=self.dtype_policy, name="iou") if iou else None

    def build(self, input_shape: tuple) -> None:
        """``input_shape``: [B, R, size, size, C] pooled features."""
        flat = int(input_shape[-3] * input_shape[-2] * input_shape[-1])
        self.fc1.build((None, None, flat))
        self.fc2.build((None, None, self.hidden))
        self.cls.build((None, None, self.hidden))
        self.box.build((None, None, self.hidden))
        if self.iou is not None:
            self.iou.build((None, None, self.hidden))
        super().build(input_shape)

    def call(self, pooled: tf.Tensor) -> tuple[tf.Tensor, ...]:
        b, r = pooled.shape[0] if pooled.shape[0] is not None else tf.shape(pooled)[0], pooled.shape[1]
        x = tf.reshape(pooled, [b, r, -1])
        x = self.fc2(self.fc1(tf.cast(x, self.compute_dtype)))
        logits = tf.cast(self.cls(x), tf.float32)
        deltas = tf.reshape(tf.cast(self.box(x), tf.float32), [b, r, self.num_classes, 4])
        if self.iou is None:
            return logits, deltas
        return logits, deltas, tf.cast(self.iou(x), tf.float32)

    def get_config(self) -> dict:
        return {**super().get_config(), "num_classes": self.num_classes, "hidden": self.hidden, "iou": self.iou is not None}


def _of_true_class(values: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """The class-specific head outputs `values` [B, S, K, ...] of each ROI's labelled class (1-based
    `labels` [B, S]; background ROIs get class 1's, for masking by the caller)."""
    return tf.gather(values, tf.maximum(labels - 1, 0), batch_dims=2)


def roi_loss(
    logits: tf.Tensor, deltas: tf.Tensor, rois: dict[str, tf.Tensor], coder: BoxCoder, box_loss: str = "smooth_l1"
) -> tuple[tf.Tensor, tf.Tensor]:
    """Classification CE (mean over sampled ROIs) and the box loss of the true class (sum over positives
    divided by the number of sampled ROIs), as torchvision's fastrcnn_loss.

    ``box_loss``: ``smooth_l1`` on the encoded deltas (torchvision), or ``giou``: GIOU_LOSS_WEIGHT x (1 - GIoU)
    of the decoded box and its GT (mmdetection's GIoU Faster R-CNN), which weighs every box edge by the
    overlap it costs instead of by its delta.
    """
    valid = rois["valid"]
    labels = rois["labels"]
    count = tf.maximum(tf.reduce_sum(tf.cast(valid, tf.float32)), 1.0)
    cls = masked_sum(softmax_cross_entropy(logits, tf.maximum(labels, 0)), valid) / count
    positive = valid & (labels > 0)
    class_deltas = _of_true_class(deltas, labels)  # [B, S, 4]
    if box_loss == "giou":
        boxes = coder.decode(rois["boxes"], class_deltas)
        per_roi = GIOU_LOSS_WEIGHT * (1.0 - generalized_iou(boxes, tf.stop_gradient(rois["matched"])))
        return cls, masked_sum(per_roi, positive) / count
    if box_loss != "smooth_l1":
        raise ValueError(f"unknown box loss {box_loss!r}")
    targets = tf.stop_gradient(coder.encode(rois["boxes"], rois["matched"]))
    box = masked_sum(smooth_l1(class_deltas - targets), positive) / count
    return cls, box


def roi_iou_loss(iou_logits: tf.Tensor, deltas: tf.Tensor, rois: dict[str, tf.Tensor], coder: BoxCoder) -> tf.Tensor:
    """Binary cross-entropy of the predicted IoU logit of the true class against the IoU of the refined box
    (the proposal decoded with the head's deltas, held fixed) with its ground truth, mean over the sampled
    positives: the head learns how well each of its boxes fits, the detection score then weighs it in."""
    labels = rois["labels"]
    positive = rois["valid"] & (labels > 0)
    boxes = coder.decode(rois["boxes"], _of_true_class(deltas, labels))
    target = tf.stop_gradient(matched_iou(boxes, rois["matched"]))
    logits = _of_true_class(iou_logits, labels)
    count = tf.maximum(tf.reduce_sum(tf.cast(positive, tf.float32)), 1.0)
    return masked_sum(binary_cross_entropy(logits, target), positive) / count
