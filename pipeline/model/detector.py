"""FasterRCNN(keras.Model): backbone + FPN + RPN + ROI box head, with static shapes throughout.

    model = build_detector(config.model, num_classes=len(config.classes), bands=3)
    losses = model.compute_losses(images, targets, training=True)   # four float32 scalars (five: iou_score)
    detections = model(images, training=False)                       # padded boxes/scores/classes

Images are normalised float32 ``[B, H, W, C]`` with static H, W (any size: they are zero-padded at the
bottom/right to a multiple of 32 inside, and all outputs are in the unpadded image's pixels). Anchors are
NumPy constants of the static shape, so each new image size traces a new graph.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf

from pipeline.config import ModelConfig
from pipeline.model.anchors import multilevel_anchors, num_anchors_per_location
from pipeline.model.backbone import build_backbone, feature_centre_shift, is_pretrained
from pipeline.model.boxes import BoxCoder, batched_nms, clip_boxes
from pipeline.model.fpn import FPN
from pipeline.model.kernels import resolve_kernel
from pipeline.model.losses import IOU_LOSS_NAME, LOSS_NAMES
from pipeline.model.padding import pad_rows
from pipeline.model.roi import BoxHead, roi_align, roi_iou_loss, roi_loss, sample_rois
from pipeline.model.rpn import (
    RPNHead,
    gt_valid_mask,
    masked_iou,
    match_anchors,
    propose,
    rpn_loss,
    sample_balanced,
)

_SIZE_DIVISOR = 32  # the coarsest backbone stride
_ROI_MAX_LEVEL = 5  # ROI heads pool from P2-P5 at most (P6 exists for large anchors only)


@contextlib.contextmanager
def _dtype_policy(name: str) -> Iterator[None]:
    """Build layers under a keras dtype policy without leaving it set globally."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


class FasterRCNN(keras.Model):
    """Faster R-CNN with FPN (torchvision's design and defaults, see docs/model.md).

    Args:
        model_cfg: the ``model`` config section (or its dict).
        num_classes: number of object classes (background excluded; labels are 1-based).
        bands: input channels.
        stats: tiles/stats.json (per-band low, high, mean, std) for a pretrained backbone's input mapping;
            None reads the inputs as z-scores (see backbone.input_affine). Unused with ``weights: none``.
    """

    def __init__(self, model_cfg: ModelConfig | dict, num_classes: int, bands: int,
                 stats: dict[str, Any] | None = None, **kwargs: Any) -> None:
        cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.model_validate(model_cfg)
        if cfg.pretrained_input is None and is_pretrained(cfg.weights):
            # recorded (get_config, exports) so a rebuild with weights: none + load_weights keeps the layer
            cfg = cfg.model_copy(update={"pretrained_input": True})
        kwargs.setdefault("dtype", cfg.mixed_precision)
        super().__init__(**kwargs)
        self.cfg = cfg
        self.num_classes = int(num_classes)
        self.bands = int(bands)
        # a string: keras/TF attribute tracking would wrap a dict
        self._stats_json = json.dumps(stats, default=lambda v: v.tolist())  # numpy values too
        self.roi_min_level = cfg.min_level if cfg.roi_min_level is None else cfg.roi_min_level
        self.feature_min_level = min(cfg.min_level, self.roi_min_level)  # finest FPN level built
        self.roi_max_level = min(cfg.max_level, _ROI_MAX_LEVEL)
        self.num_anchors = num_anchors_per_location(cfg.aspect_ratios, cfg.anchor_scales_per_octave)
        self.rpn_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.roi_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.roi_align_impl = resolve_kernel("roi_align_impl", cfg.roi_align_impl)
        self.nms_impl = resolve_kernel("nms_impl", cfg.nms_impl)
        backbone_top = min(cfg.max_level, _ROI_MAX_LEVEL)
        with _dtype_policy(cfg.mixed_precision):
            self.backbone = build_backbone(cfg.backbone, self.bands, cfg.weights, cfg.bn_momentum,
                                           freeze_bn=cfg.freeze_bn, freeze_stages=cfg.freeze_stages, stats=stats,
                                           pretrained_input=cfg.pretrained_input)
            self.fpn = FPN(cfg.fpn_channels, num_inputs=backbone_top - self.feature_min_level + 1,
                           extra_levels=cfg.max_level - backbone_top,
                           light_levels=cfg.min_level - self.feature_min_level, name="fpn")  # box-head-only levels
            self.rpn_head = RPNHead(cfg.fpn_channels, self.num_anchors, name="rpn_head")
            self.box_head = BoxHead(self.num_classes, cfg.head_dim, iou=cfg.iou_score, name="box_head")
        self.seed_generator = keras.random.SeedGenerator(cfg.seed, name="sampling_seed")
        # A SeedGenerator is not a TF trackable: expose its state so tf.train.Checkpoint saves the RNG too.
        self.sampling_rng_state = self.seed_generator.state
        # Create every weight now (eagerly, tiny input) so checkpoints and tf.function tracing see them.
        self.rpn_head(self._rpn_levels(self._features(tf.zeros([1, 64, 64, self.bands]), training=False)))
        self.box_head.build((None, None, cfg.roi_size, cfg.roi_size, cfg.fpn_channels))
        self.built = True

    # ----------------------------------------------------------------------------------- shared parts
    def _features(self, images: tf.Tensor, training: bool) -> list[tf.Tensor]:
        """FPN levels feature_min_level..max_level (finest first) of images padded to a multiple of 32."""
        h, w = images.shape[1], images.shape[2]
        if h is None or w is None:
            raise ValueError("FasterRCNN needs images with a static height and width")
        ph, pw = (-h) % _SIZE_DIVISOR, (-w) % _SIZE_DIVISOR
        x = tf.cast(images, tf.float32)
        if ph or pw:
            x = tf.pad(x, [[0, 0], [0, ph], [0, pw], [0, 0]])
        c = self.backbone(x, training=training)
        return self.fpn(c[self.feature_min_level - 2 : self.roi_max_level - 1])

    def _rpn_levels(self, features: list[tf.Tensor]) -> list[tf.Tensor]:
        """The levels with anchors: min_level..max_level."""
        return features[self.cfg.min_level - self.feature_min_level :]

    def _anchors(self, features: list[tf.Tensor]) -> list[tf.Tensor]:
        """Anchors of the RPN levels (`features` as `_rpn_levels` gives them)."""
        shapes = [(f.shape[1], f.shape[2]) for f in features]
        strides = [2**level for level in range(self.cfg.min_level, self.cfg.max_level + 1)]
        arrays = multilevel_anchors(shapes, strides, self.cfg.anchor_sizes, self.cfg.aspect_ratios,
                                    self.cfg.anchor_scales_per_octave)
        return [tf.constant(a) for a in arrays]

    def _roi_features(self, features: list[tf.Tensor], boxes: tf.Tensor) -> tf.Tensor:
        first = self.roi_min_level - self.feature_min_level
        levels = features[first : first + self.roi_max_level - self.roi_min_level + 1]
        shifts = None
        if self.cfg.roi_align_shift:
            shifts = [feature_centre_shift(self.cfg.backbone, self.roi_min_level + i) for i in range(len(levels))]
        return roi_align(levels, boxes, self.roi_min_level, self.cfg.roi_size, self.cfg.roi_sampling_ratio,
                         self.roi_align_impl, shifts)

    # ----------------------------------------------------------------------------------- training
    def compute_losses(self, images: tf.Tensor, targets: dict[str, tf.Tensor], training: bool = True
                       ) -> dict[str, tf.Tensor]:
        """The four float32 loss scalars for a batch with padded targets (boxes xyxy px, labels 1-based)."""
        cfg = self.cfg
        size = (images.shape[1], images.shape[2])
        gt_boxes = tf.cast(targets["boxes"], tf.float32)
        gt_labels = tf.cast(targets["labels"], tf.int32)
        num_boxes = tf.cast(targets["num_boxes"], tf.int32)
        gt_valid = gt_valid_mask(num_boxes, gt_boxes.shape[1])

        features = self._features(images, training)
        rpn_levels = self._rpn_levels(features)
        logits, deltas = self.rpn_head(rpn_levels)
        level_anchors = self._anchors(rpn_levels)
        anchors = tf.concat(level_anchors, axis=0)

        labels, matched = match_anchors(masked_iou(anchors, gt_boxes, gt_valid), cfg.rpn_fg_iou, cfg.rpn_bg_iou)
        positive, negative = sample_balanced(labels, cfg.rpn_batch_per_image, cfg.rpn_positive_fraction,
                                             self.seed_generator)
        rpn_obj, rpn_box = rpn_loss(logits, deltas, anchors, gt_boxes, matched, positive, negative, self.rpn_coder)

        proposals, valid = propose(logits, deltas, level_anchors, size, self.rpn_coder, cfg.rpn_pre_nms_top_n_train,
                                   cfg.rpn_post_nms_top_n_train, cfg.rpn_nms_iou, nms_impl=self.nms_impl)
        rois = sample_rois(proposals, valid, gt_boxes, gt_labels, num_boxes, cfg.roi_batch_per_image,
                           cfg.roi_positive_fraction, cfg.roi_fg_iou, self.seed_generator)
        cls_logits, box_deltas, *iou_logits = self.box_head(self._roi_features(features, rois["boxes"]))
        roi_cls, roi_box = roi_loss(cls_logits, box_deltas, rois, self.roi_coder, cfg.roi_box_loss)
        losses = dict(zip(LOSS_NAMES, (rpn_obj, rpn_box, roi_cls, roi_box), strict=True))
        if iou_logits:
            losses[IOU_LOSS_NAME] = roi_iou_loss(iou_logits[0], box_deltas, rois, self.roi_coder)
        return losses

    # ----------------------------------------------------------------------------------- inference
    def call(self, images: tf.Tensor, training: bool = False) -> dict[str, tf.Tensor]:
        """Detections: boxes [B, N, 4] xyxy px, scores [B, N], classes [B, N] int32 (1-based),
        num_detections [B] int32, with N = max_detections (padding rows are zero)."""
        cfg = self.cfg
        height, width = images.shape[1], images.shape[2]
        features = self._features(images, training)
        rpn_levels = self._rpn_levels(features)
        logits, deltas = self.rpn_head(rpn_levels)
        proposals, valid, objectness = propose(
            logits, deltas, self._anchors(rpn_levels), (height, width), self.rpn_coder, cfg.rpn_pre_nms_top_n_test,
            cfg.rpn_post_nms_top_n_test, cfg.rpn_nms_iou, nms_impl=self.nms_impl, with_scores=True)
        cls_logits, box_deltas, *iou_logits = self.box_head(self._roi_features(features, proposals))
        scores = self._scores(cls_logits, objectness, iou_logits[0] if iou_logits else None)
        return self._postprocess(proposals, valid, scores, box_deltas, height, width)

    def _scores(self, cls_logits: tf.Tensor, objectness: tf.Tensor, iou_logits: tf.Tensor | None) -> tf.Tensor:
        """Per-class detection scores [B, P, K] of the proposals: the box head's class probabilities, fused
        with the RPN objectness (`score_fusion`) and the predicted IoU (`iou_score`) as configured."""
        scores = tf.nn.softmax(cls_logits, axis=-1)[..., 1:]
        if self.cfg.score_fusion == "geometric_mean":
            scores = tf.sqrt(scores * objectness[..., None])  # both stages' probabilities (CenterNet2)
        if iou_logits is not None:
            scores = tf.sqrt(scores * tf.sigmoid(iou_logits))  # weighed by the predicted fit of the box
        return scores

    def _postprocess(self, proposals: tf.Tensor, valid: tf.Tensor, scores: tf.Tensor, box_deltas: tf.Tensor,
                     height: int, width: int) -> dict[str, tf.Tensor]:
        """Decoded, clipped boxes of the proposals with their per-class `scores` [B, P, K], after NMS."""
        cfg = self.cfg
        k = self.num_classes
        b, p = tf.shape(proposals)[0], proposals.shape[1]
        boxes = clip_boxes(self.roi_coder.decode(proposals[:, :, None, :], box_deltas), height, width)  # [B, P, K, 4]
        big = ((boxes[..., 2] - boxes[..., 0]) >= 1e-2) & ((boxes[..., 3] - boxes[..., 1]) >= 1e-2)
        scores = tf.where(big & valid[..., None], scores, 0.0)
        boxes = tf.reshape(boxes, [b, p * k, 4])
        scores = tf.reshape(scores, [b, p * k])
        classes = tf.tile(tf.range(1, k + 1, dtype=tf.int32)[None], [b, p])
        # Many classes: pre-select the best candidates so NMS stays cheap (no effect for a few classes).
        limit = max(4 * cfg.max_detections, 4000)
        if p * k > limit:
            scores, top = tf.math.top_k(scores, k=limit)
            boxes = tf.gather(boxes, top, batch_dims=1)
            classes = tf.gather(classes, top, batch_dims=1)
        keep, num = batched_nms(boxes, scores, classes, cfg.max_detections, cfg.nms_iou, cfg.score_threshold,
                                 impl=self.nms_impl)
        mask = tf.range(keep.shape[1])[None, :] < num[:, None]
        out = {
            "boxes": tf.where(mask[..., None], tf.gather(boxes, keep, batch_dims=1), 0.0),
            "scores": tf.where(mask, tf.gather(scores, keep, batch_dims=1), 0.0),
            "classes": tf.where(mask, tf.gather(classes, keep, batch_dims=1), 0),
        }
        out = {key: pad_rows(v, cfg.max_detections) for key, v in out.items()}
        out["num_detections"] = num
        return out

    def get_config(self) -> dict[str, Any]:
        return {"model_cfg": self.cfg.model_dump(mode="json"), "num_classes": self.num_classes, "bands": self.bands,
                "stats": json.loads(self._stats_json)}


def build_detector(model_cfg: ModelConfig, num_classes: int, bands: int,
                   stats: dict[str, Any] | None = None) -> FasterRCNN:
    """Build a FasterRCNN for ``num_classes`` object classes and ``bands`` input channels; ``stats``
    (tiles/stats.json) set a pretrained backbone's input mapping (docs/model.md, 'Pretrained backbones')."""
    return FasterRCNN(model_cfg, num_classes, bands, stats)


__all__ = ["FasterRCNN", "build_detector"]
