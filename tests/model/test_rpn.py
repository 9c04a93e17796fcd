"""pipeline/model/rpn.py: anchor matching and the balanced sampler."""

import numpy as np
import tensorflow as tf

from pipeline.model.rpn import gt_valid_mask, masked_iou, match_anchors, sample_balanced


def _labels(pos, neg, ignore, seed=0):
    row = np.array([1] * pos + [0] * neg + [-1] * ignore, np.int32)
    return np.random.default_rng(seed).permutation(row)


def test_sampler_fills_with_negatives_when_positives_are_scarce():
    labels = tf.constant(np.stack([_labels(30, 500, 270), _labels(300, 500, 0, 1), _labels(0, 10, 790, 2)]))
    pos, neg = sample_balanced(labels, 256, 0.5, seed=0)
    pos, neg = pos.numpy(), neg.numpy()
    assert pos.sum(1).tolist() == [30, 128, 0]
    assert neg.sum(1).tolist() == [226, 128, 10]
    lab = labels.numpy()
    assert np.all(lab[pos] == 1) and np.all(lab[neg] == 0)


def test_sampler_is_random_but_seeded():
    labels = tf.constant(_labels(300, 500, 0)[None])
    a, _ = sample_balanced(labels, 64, 0.25, seed=1)
    b, _ = sample_balanced(labels, 64, 0.25, seed=1)
    c, _ = sample_balanced(labels, 64, 0.25, seed=2)
    assert a.numpy().sum() == 16
    assert np.array_equal(a.numpy(), b.numpy()) and not np.array_equal(a.numpy(), c.numpy())


def test_matching_thresholds_low_quality_and_padding():
    anchors = tf.constant([[0, 0, 10, 10], [0, 0, 10, 12], [30, 30, 40, 40], [100, 100, 110, 110], [0, 0, 20, 20]],
                          tf.float32)
    gt = tf.constant([[[0, 0, 10, 10], [30, 30, 45, 45], [0, 0, 0, 0]]], tf.float32)
    valid = gt_valid_mask(tf.constant([2]), 3)
    iou = masked_iou(anchors, gt, valid)
    labels, matched = match_anchors(iou, 0.7, 0.3)
    # anchor 2 has IoU 0.44 with GT 1 (ignored by thresholds) but is that GT's best anchor -> positive
    assert labels.numpy()[0].tolist() == [1, 1, 1, 0, 0]
    assert matched.numpy()[0, :3].tolist() == [0, 0, 1]
    labels_strict, _ = match_anchors(iou, 0.7, 0.3, allow_low_quality=False)
    assert labels_strict.numpy()[0].tolist() == [1, 1, -1, 0, 0]


def test_matching_without_gt_makes_everything_negative():
    anchors = tf.constant([[0, 0, 10, 10], [5, 5, 20, 20]], tf.float32)
    gt = tf.zeros([1, 4, 4])
    labels, _ = match_anchors(masked_iou(anchors, gt, gt_valid_mask(tf.constant([0]), 4)), 0.7, 0.3)
    assert labels.numpy().tolist() == [[0, 0]]
