"""The whole detector learns: a few synthetic tiles (squares = class 1, circles = class 2) are overfit to
AP50 > 0.9 with the tiny backbone in a bounded number of CPU steps."""

import keras
import numpy as np
import tensorflow as tf

from pipeline.model.boxes import pairwise_iou
from pipeline.model.detector import build_detector


def _voc_ap50(detections, targets, label):
    """All-point interpolated AP at IoU 0.5 for one class over a batch (VOC 2010+ definition)."""
    records, total = [], 0
    for b in range(len(targets["num_boxes"])):
        n = targets["num_boxes"][b]
        gt = targets["boxes"][b, :n][targets["labels"][b, :n] == label]
        total += len(gt)
        k = detections["num_detections"][b]
        keep = detections["classes"][b, :k] == label
        boxes, scores = detections["boxes"][b, :k][keep], detections["scores"][b, :k][keep]
        iou = pairwise_iou(boxes, gt).numpy() if len(gt) and len(boxes) else np.zeros((len(boxes), len(gt)))
        used = np.zeros(len(gt), bool)
        for i in np.argsort(-scores):
            j = int(np.argmax(iou[i])) if len(gt) else -1
            hit = j >= 0 and iou[i, j] >= 0.5 and not used[j]
            if hit:
                used[j] = True
            records.append((scores[i], hit))
    records.sort(key=lambda r: -r[0])
    hits = np.array([h for _, h in records], float)
    tp, fp = np.cumsum(hits), np.cumsum(1 - hits)
    recall = tp / max(total, 1)
    precision = tp / np.maximum(tp + fp, 1e-9)
    mrec = np.concatenate([[0], recall, [1]])
    mpre = np.concatenate([[0], precision, [0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def test_overfits_synthetic_tiles_to_ap50_above_0_9(tiles, make_config):
    images, targets = tiles
    keras.utils.set_random_seed(0)
    # P3-P5 (anchors 16-64 px) covers the 16-40 px objects with fewer ops per step than P2-P5.
    model = build_detector(make_config(min_level=3, anchor_sizes=[16, 32, 64]), num_classes=2, bands=3)
    optimizer = keras.optimizers.Adam(2e-3)
    x = tf.constant(images)
    t = {k: tf.constant(v) for k, v in targets.items()}

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            losses = model.compute_losses(x, t, training=True)
            total = tf.add_n(list(losses.values()))
        grads = tape.gradient(total, model.trainable_variables)
        grads, _ = tf.clip_by_global_norm(grads, 10.0)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return total

    first = float(step())
    for _ in range(STEPS - 1):
        last = float(step())
    detections = {k: v.numpy() for k, v in model(x, training=False).items()}
    aps = [_voc_ap50(detections, targets, label) for label in (1, 2)]
    assert last < first / 3
    assert np.mean(aps) > 0.9, aps


STEPS = 90  # AP50 reaches 1.0 after 70-80 steps (checked for model seeds 0-2 and another tile seed)
