"""pipeline/model/detector.py: output contract, losses, XLA and mixed precision on CPU."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.model.detector import FasterRCNN, build_detector
from pipeline.model.losses import LOSS_NAMES


def _step(model, optimizer, jit):
    @tf.function(jit_compile=jit)
    def step(images, targets):
        with tf.GradientTape() as tape:
            losses = model.compute_losses(images, targets, training=True)
            total = tf.add_n(list(losses.values()))
        grads = tape.gradient(total, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return losses

    return step


def test_inference_outputs_follow_the_contract_for_any_image_size(tiles, make_config):
    images, _ = tiles
    model = build_detector(make_config(max_detections=20), num_classes=2, bands=3)
    out = model(tf.constant(images[:2, :100, :90]), training=False)  # 100 x 90: not a multiple of 32
    assert set(out) == {"boxes", "scores", "classes", "num_detections"}
    assert out["boxes"].shape == (2, 20, 4) and out["scores"].shape == (2, 20) and out["classes"].shape == (2, 20)
    assert out["classes"].dtype == tf.int32 and out["num_detections"].dtype == tf.int32
    boxes, n = out["boxes"].numpy(), out["num_detections"].numpy()
    for b in range(2):
        assert np.all(boxes[b, :, [0, 2]] <= 90.0) and np.all(boxes[b, :, [1, 3]] <= 100.0) and np.all(boxes >= 0)
        assert set(out["classes"].numpy()[b, : n[b]]) <= {1, 2}
        assert np.all(out["scores"].numpy()[b, : n[b]] > 0.05) and np.all(out["scores"].numpy()[b, n[b]:] == 0)
        assert np.all(np.diff(out["scores"].numpy()[b, : n[b]]) <= 1e-6)  # sorted by score


@pytest.mark.parametrize("box_loss", ["smooth_l1", "giou"])
def test_losses_are_finite_scalars_including_an_image_without_boxes(tiles, make_config, box_loss):
    images, targets = tiles
    targets = {k: v.copy() for k, v in targets.items()}
    targets["num_boxes"][1] = 0
    targets["boxes"][1] = 0
    targets["labels"][1] = 0
    model = build_detector(make_config(roi_box_loss=box_loss), num_classes=2, bands=3)
    losses = model.compute_losses(tf.constant(images), targets, training=True)
    assert tuple(losses) == LOSS_NAMES
    assert float(losses["roi_box"]) > 0.0  # GT boxes are appended to the ROIs: positives always exist
    for value in losses.values():
        assert value.shape == () and value.dtype == tf.float32 and np.isfinite(value.numpy())
    empty = {"boxes": np.zeros((1, 3, 4), np.float32), "labels": np.zeros((1, 3), np.int32), "num_boxes": np.zeros(1)}
    only_empty = model.compute_losses(tf.constant(images[:1]), empty, training=True)
    assert all(np.isfinite(v.numpy()) for v in only_empty.values())
    assert float(only_empty["rpn_box"]) == 0.0 and float(only_empty["roi_box"]) == 0.0
    assert float(only_empty["rpn_objectness"]) > 0.0


def test_xla_compiled_train_step_runs_on_cpu_and_moves_weights(tiles, make_config):
    images, targets = tiles
    # run_training with jit_compile picks the XLA-friendly kernels (gather ROIAlign, padded NMS): test those. XLA compile time grows with the
    # number of ops, not their sizes: three levels (P3-P5) and one image keep it short.
    cfg = make_config(roi_align_impl="gather", nms_impl="padded", fpn_channels=16, head_dim=32, min_level=3, anchor_sizes=[16, 32, 64],
                      rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, roi_batch_per_image=32)
    model = build_detector(cfg, num_classes=2, bands=3)
    before = [v.numpy().copy() for v in model.trainable_variables]
    step = _step(model, keras.optimizers.SGD(0.01), jit=True)
    losses = step(tf.constant(images[:1]), {k: tf.constant(v[:1]) for k, v in targets.items()})
    assert all(np.isfinite(v.numpy()) for v in losses.values())
    assert any(not np.allclose(a, v.numpy()) for a, v in zip(before, model.trainable_variables))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_forward_and_losses_run_on_cpu(tiles, policy, make_config):
    images, targets = tiles
    model = build_detector(make_config(mixed_precision=policy), num_classes=2, bands=4)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left untouched
    assert model.rpn_head.conv.compute_dtype == policy.removeprefix("mixed_")
    x = tf.constant(np.concatenate([images[:2], images[:2, ..., :1]], -1))
    out = model(x, training=False)
    assert out["boxes"].dtype == tf.float32 and out["scores"].dtype == tf.float32
    losses = model.compute_losses(x, {k: v[:2] for k, v in targets.items()}, training=True)
    assert all(v.dtype == tf.float32 and np.isfinite(v.numpy()) for v in losses.values())


def test_config_round_trip_and_weights_reload(tmp_path, tiles, make_config):
    images, _ = tiles
    model = build_detector(make_config(), num_classes=2, bands=3)
    clone = FasterRCNN.from_config(model.get_config())
    model.save_weights(str(tmp_path / "w.weights.h5"))
    clone.load_weights(str(tmp_path / "w.weights.h5"))
    a, b = model(tf.constant(images[:1])), clone(tf.constant(images[:1]))
    np.testing.assert_allclose(a["boxes"].numpy(), b["boxes"].numpy(), atol=1e-5)


def test_unknown_weights_file_is_a_user_error(make_config):
    from pipeline.errors import SatdetError

    with pytest.raises(SatdetError, match="weights file not found"):
        build_detector(make_config(backbone="mobilenet_v3_large", weights="/nonexistent/w.h5"), 1, 3)


def test_tf_checkpoint_restores_weights_and_the_sampling_rng(tmp_path, make_config):
    from pipeline.model.rpn import sample_balanced

    model = build_detector(make_config(seed=7), num_classes=2, bands=3)
    labels = tf.constant(np.random.default_rng(0).integers(-1, 2, (2, 500)), tf.int32)
    sample_balanced(labels, 64, 0.5, model.seed_generator)  # advance the RNG before saving
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    clone = build_detector(make_config(seed=123), num_classes=2, bands=3)
    tf.train.Checkpoint(model=clone).read(path).assert_existing_objects_matched()
    for a, b in zip(model.weights, clone.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    want = sample_balanced(labels, 64, 0.5, model.seed_generator)
    got = sample_balanced(labels, 64, 0.5, clone.seed_generator)
    assert all(np.array_equal(w.numpy(), g.numpy()) for w, g in zip(want, got))


@pytest.mark.parametrize("shift", [False, True])
def test_a_box_head_level_below_the_anchor_levels(tiles, make_config, shift):
    images, targets = tiles
    cfg = make_config(min_level=3, max_level=5, anchor_sizes=[16, 32, 64], roi_min_level=2, roi_align_shift=shift)
    model = build_detector(cfg, num_classes=2, bands=3)
    # P2 is built for the box head only: no 3x3 output convolution, no anchors
    assert model.fpn.light_levels == 1 and not hasattr(model.fpn, "output_0") and hasattr(model.fpn, "output_1")
    x = tf.constant(images[:1])
    features = model._features(x, training=False)
    assert [f.shape[1] for f in features] == [x.shape[1] // s for s in (4, 8, 16, 32)]
    assert len(model._rpn_levels(features)) == 3 and model._anchors(model._rpn_levels(features))[0].shape[0] == (
        (x.shape[1] // 8) ** 2 * model.num_anchors)
    # a 20 px box pools from P2 (level floor(4 + log2(20 / 224)) clamped to 2), a 120 px one from P3
    from pipeline.model.backbone import feature_centre_shift
    from pipeline.model.roi import roi_align

    boxes = tf.constant([[[10.0, 10.0, 30.0, 30.0], [4.0, 4.0, 124.0, 124.0]]])
    pooled = model._roi_features(features, boxes).numpy()
    for i, level in enumerate((2, 3)):  # with the shift, each level sampled where its cells are centred
        shifts = [feature_centre_shift(cfg.backbone, level)] if shift else None
        want = roi_align(features[i : i + 1], boxes[:, i : i + 1], level, shifts=shifts)[0, 0].numpy()
        np.testing.assert_allclose(pooled[0, i], want, atol=1e-5)
    # the P2 lateral learns through the box head
    with tf.GradientTape() as tape:
        losses = model.compute_losses(tf.constant(images), targets, training=True)
        total = tf.add_n(list(losses.values()))
    grad = tape.gradient(total, model.fpn.lateral_0.kernel)
    assert all(np.isfinite(v.numpy()) for v in losses.values()) and float(tf.norm(grad)) > 0
    out = model(x, training=False)
    assert out["boxes"].shape == (1, cfg.max_detections, 4)


def test_box_head_level_must_not_be_coarser_than_the_anchor_levels(make_config):
    with pytest.raises(ValueError, match="roi_min_level"):
        make_config(min_level=2, roi_min_level=3)


def test_geometric_mean_score_fusion_combines_both_stages(make_config):
    """score_fusion: geometric_mean scores each detection sqrt(box-head probability x proposal objectness);
    the default keeps the box head's probability. Same boxes, same weights."""
    plain = build_detector(make_config(score_threshold=0.0), num_classes=1, bands=3)
    fused = build_detector(make_config(score_threshold=0.0, score_fusion="geometric_mean"), num_classes=1, bands=3)
    proposals = tf.constant([[[10.0, 10.0, 40.0, 40.0], [60.0, 60.0, 90.0, 100.0]]])
    valid = tf.constant([[True, True]])
    cls_logits = tf.constant([[[0.0, 2.0], [0.0, -1.0]]])  # box-head tree probabilities 0.881, 0.269
    deltas = tf.zeros([1, 2, 1, 4])
    objectness = tf.constant([[0.25, 0.81]])
    a = plain._postprocess(proposals, valid, plain._scores(cls_logits, objectness, None), deltas, 128, 128)
    b = fused._postprocess(proposals, valid, fused._scores(cls_logits, objectness, None), deltas, 128, 128)
    head = tf.sigmoid([2.0, -1.0]).numpy()
    np.testing.assert_allclose(sorted(a["scores"].numpy()[0, :2]), sorted(head), rtol=1e-5)
    expected = np.sqrt(head * [0.25, 0.81])  # 0.469, 0.467: the ranking follows both stages
    got = {tuple(np.round(box, 3)): s for box, s in zip(b["boxes"].numpy()[0, :2], b["scores"].numpy()[0, :2])}
    np.testing.assert_allclose([got[(10.0, 10.0, 40.0, 40.0)], got[(60.0, 60.0, 90.0, 100.0)]], expected, rtol=1e-5)


def test_inference_with_score_fusion_runs_end_to_end(tiles, make_config):
    images, _ = tiles
    model = build_detector(make_config(score_fusion="geometric_mean", score_threshold=0.0), num_classes=2, bands=3)
    out = model(images, training=False)
    scores = out["scores"].numpy()
    assert out["boxes"].shape == (4, 50, 4) and np.all((scores >= 0) & (scores <= 1))
    assert np.all(out["num_detections"].numpy() > 0)


def test_iou_score_weighs_each_class_probability_by_the_predicted_iou(make_config):
    """iou_score: the detection score is sqrt(class probability x sigmoid(IoU logit)), so of two boxes with
    the same class probability the one predicted to fit better ranks first."""
    model = build_detector(make_config(score_threshold=0.0, iou_score=True), num_classes=1, bands=3)
    cls_logits = tf.constant([[[0.0, 2.0], [0.0, 2.0]]])
    iou_logits = tf.constant([[[1.5], [-0.5]]])
    scores = model._scores(cls_logits, tf.constant([[0.5, 0.5]]), iou_logits).numpy()[0, :, 0]
    np.testing.assert_allclose(scores, np.sqrt(tf.sigmoid(2.0).numpy() * tf.sigmoid([1.5, -0.5]).numpy()), rtol=1e-5)
    assert scores[0] > scores[1]


def test_iou_score_adds_a_loss_that_trains_the_iou_branch_towards_the_refined_boxes_iou(tiles, make_config):
    """The fifth loss term is the BCE of the IoU logit of the true class against the IoU of the decoded box
    with its ground truth: a train step moves the IoU layer, and inference scores with it."""
    images, targets = tiles
    model = build_detector(make_config(iou_score=True), num_classes=2, bands=3)
    step = _step(model, keras.optimizers.SGD(0.01), jit=False)
    before = model.box_head.iou.kernel.numpy().copy()
    losses = step(tf.constant(images), targets)
    assert tuple(losses) == (*LOSS_NAMES, "roi_iou")
    assert np.isfinite(float(losses["roi_iou"])) and float(losses["roi_iou"]) > 0.0
    assert not np.allclose(model.box_head.iou.kernel.numpy(), before)
    out = model(tf.constant(images[:1]), training=False)
    n = int(out["num_detections"][0])
    assert n > 0 and np.all((out["scores"].numpy()[0, :n] > 0) & (out["scores"].numpy()[0, :n] <= 1))


def test_roi_iou_loss_trains_the_true_class_logit_towards_the_refined_boxes_iou():
    """roi_iou_loss with two classes: the positive (class 2) overlaps its ground truth by IoU 0.5, so the BCE is
    lowest at logit(0.5) = 0 of class 2's logit, whatever class 1's logit or the negative's are; the IoU
    target is held fixed (no gradient reaches the box deltas)."""
    from pipeline.model.boxes import BoxCoder
    from pipeline.model.roi import roi_iou_loss

    rois = {"boxes": tf.constant([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 4.0, 4.0]]]),
            "matched": tf.constant([[[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 4.0, 4.0]]]),
            "labels": tf.constant([[2, 0]]), "valid": tf.constant([[True, True]])}
    deltas = tf.Variable(tf.zeros([1, 2, 2, 4]))
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))

    def loss(v: float) -> float:
        return float(roi_iou_loss(tf.constant([[[-7.0, v], [9.0, 9.0]]]), deltas, rois, coder))

    assert loss(0.0) < loss(-1.0) and loss(0.0) < loss(1.0)
    np.testing.assert_allclose(loss(0.0), np.log(2.0), rtol=1e-5)  # BCE(target 0.5, logit 0)
    with tf.GradientTape() as tape:
        value = roi_iou_loss(tf.constant([[[0.0, 1.0], [0.0, 0.0]]]), deltas, rois, coder)
    grad = tape.gradient(value, deltas)
    assert grad is None or not np.any(grad.numpy())
