"""Validation AP50 during training: run the model in inference mode on the val tiles and score with
pipeline.evaluate.metrics (pycocotools) — the number used for the best checkpoint and early stopping —
and the tile-level output threshold (pipeline.train.calibrate) when the scenes are not at hand."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from pipeline.evaluate.metrics import ImageBoxes, ImageDetections, coco_metrics


def make_predict_fn(model: keras.Model) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """Inference as a tf.function (traced once per batch shape: full batches and the last, smaller one)."""
    return tf.function(lambda images: model(images, training=False), reduce_retracing=True)


def validation_ap50(
    model: keras.Model,
    dataset: tf.data.Dataset,
    class_names: list[str],
    max_dets: int = 1000,
    predict_fn: Callable[[tf.Tensor], dict[str, tf.Tensor]] | None = None,
) -> float:
    """COCO AP50 of `model` over a finite (images, targets) dataset; -1 when there is no ground truth.

    `predict_fn` (from `make_predict_fn`) avoids re-tracing at every validation; default: eager calls."""
    metrics = validation_metrics(model, dataset, class_names, max_dets, predict_fn)
    return -1.0 if metrics is None else float(metrics["AP50"])


def validation_metrics(
    model: keras.Model,
    dataset: tf.data.Dataset,
    class_names: list[str],
    max_dets: int = 1000,
    predict_fn: Callable[[tf.Tensor], dict[str, tf.Tensor]] | None = None,
) -> dict[str, Any] | None:
    """pipeline.evaluate.metrics.coco_metrics of `model` over a finite dataset; None without ground truth."""
    gts, dets = validation_boxes(model, dataset, predict_fn)
    if not gts:
        return None
    return coco_metrics(gts, dets, class_names, max_dets=max_dets)


def validation_boxes(
    model: keras.Model,
    dataset: tf.data.Dataset,
    predict_fn: Callable[[tf.Tensor], dict[str, tf.Tensor]] | None = None,
) -> tuple[list[ImageBoxes], list[ImageDetections]]:
    """Ground truth and detections of every tile of a finite (images, targets) dataset."""
    gts: list[ImageBoxes] = []
    dets: list[ImageDetections] = []
    for images, targets in dataset:
        out = predict_fn(images) if predict_fn is not None else model(images, training=False)
        boxes, labels, nb = targets["boxes"].numpy(), targets["labels"].numpy(), targets["num_boxes"].numpy()
        d_boxes, d_scores = out["boxes"].numpy(), out["scores"].numpy()
        d_classes, nd = out["classes"].numpy(), out["num_detections"].numpy()
        for i in range(len(nb)):
            gts.append(ImageBoxes(boxes[i, : nb[i]], labels[i, : nb[i]], image_id=str(len(gts))))
            k = int(nd[i])
            dets.append(
                ImageDetections(
                    d_boxes[i, :k], d_classes[i, :k], image_id=str(len(dets)), scores=d_scores[i, :k]
                )
            )
    return gts, dets


class Validation:
    """A val split scored during training (AP50: the best checkpoint, early stopping) and after it (the
    output threshold), with one traced inference function for all of it."""

    def __init__(self, model: keras.Model, dataset: tf.data.Dataset, class_names: list[str], max_dets: int):
        self.dataset, self.class_names, self.max_dets = dataset, class_names, max_dets
        self.predict_fn = make_predict_fn(model)

    def ap50(self, model: keras.Model) -> float:
        return validation_ap50(model, self.dataset, self.class_names, self.max_dets, predict_fn=self.predict_fn)

    def output_threshold(self, model: keras.Model, min_precision: float | None) -> dict[str, Any] | None:
        """The output threshold chosen on the validation tiles (pipeline.train.calibrate)."""
        from pipeline.train.calibrate import choose_output_threshold

        gts, dets = validation_boxes(model, self.dataset, self.predict_fn)
        return choose_output_threshold(gts, dets, min_precision, "tile")


__all__ = ["Validation", "make_predict_fn", "validation_ap50", "validation_boxes", "validation_metrics"]
