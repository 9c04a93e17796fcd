"""Validation AP50 during training: run the model in inference mode on the val tiles and score with
pipeline.evaluate.metrics (pycocotools) — the number used for the best checkpoint and early stopping."""

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


def output_threshold(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The score threshold that maximises F1 at IoU 0.5 on the validation tiles, with its precision/recall
    (stored in the export as the model's default output threshold); None when it is undefined."""
    prf = ((metrics or {}).get("prf") or {}).get("0.5")
    if not prf or prf.get("score_threshold", -1) < 0 or prf.get("f1", 0) <= 0:
        return None
    return {"score_threshold": float(prf["score_threshold"]), "iou": 0.5, "split": "val", "level": "tile",
            **{k: float(prf[k]) for k in ("precision", "recall", "f1")}}


def validation_metrics(
    model: keras.Model,
    dataset: tf.data.Dataset,
    class_names: list[str],
    max_dets: int = 1000,
    predict_fn: Callable[[tf.Tensor], dict[str, tf.Tensor]] | None = None,
) -> dict[str, Any] | None:
    """pipeline.evaluate.metrics.coco_metrics of `model` over a finite dataset; None without ground truth."""
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
    if not gts:
        return None
    return coco_metrics(gts, dets, class_names, max_dets=max_dets)


class Validation:
    """A val split scored during training (AP50: the best checkpoint, early stopping) and after it (the
    output threshold), with one traced inference function for all of it."""

    def __init__(self, model: keras.Model, dataset: tf.data.Dataset, class_names: list[str], max_dets: int):
        self.dataset, self.class_names, self.max_dets = dataset, class_names, max_dets
        self.predict_fn = make_predict_fn(model)

    def ap50(self, model: keras.Model) -> float:
        return validation_ap50(model, self.dataset, self.class_names, self.max_dets, predict_fn=self.predict_fn)

    def output_threshold(self, model: keras.Model) -> dict[str, Any] | None:
        """`output_threshold` of the model's validation metrics."""
        metrics = validation_metrics(model, self.dataset, self.class_names, self.max_dets, self.predict_fn)
        return output_threshold(metrics)


__all__ = ["Validation", "make_predict_fn", "output_threshold", "validation_ap50", "validation_metrics"]
