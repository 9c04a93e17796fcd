"""The train step: clipping order, mixed precision, non-finite skips, XLA."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import ClipConfig, OptimizerConfig
from pipeline.model.losses import LOSS_NAMES
from pipeline.train.clipping import build_clipper
from pipeline.train.optim import build_optimizer
from pipeline.train.step import LossScale, TrainStep

from .standin import build_model, synthetic_arrays


def _batch(n=4, seed=0):
    images, targets = synthetic_arrays(n, seed)
    return tf.constant(images), {k: tf.constant(v) for k, v in targets.items()}


def _sgd(lr=0.1):
    return build_optimizer(OptimizerConfig(name="sgd", learning_rate=lr, momentum=0.9, weight_decay=0.0), lr)


def _manual_grads(model, images, targets):
    with tf.GradientTape() as tape:
        loss = tf.add_n(list(model.compute_losses(images, targets, training=True).values()))
    return loss, tape.gradient(loss, model.trainable_variables)


def test_global_norm_step_equals_manual_clip_by_global_norm_step():
    images, targets = _batch()
    model, ref = build_model(0), build_model(0)
    loss, grads = _manual_grads(ref, images, targets)
    norm = float(tf.linalg.global_norm(grads))
    clip_norm = norm / 4  # make sure clipping is active
    step = TrainStep(
        model, _sgd(), build_clipper(ClipConfig(strategy="global_norm", clip_norm=clip_norm))
    )
    out = step(images, targets)
    ref_opt = _sgd()
    clipped, _ = tf.clip_by_global_norm(grads, clip_norm)
    ref_opt.apply_gradients(zip(clipped, ref.trainable_variables))
    for a, b in zip(model.trainable_variables, ref.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
    assert float(out["grad_norm_before"]) == pytest.approx(norm, rel=1e-5)
    assert float(out["grad_norm_after"]) == pytest.approx(clip_norm, rel=1e-5)
    assert bool(out["clipped"]) and not bool(out["skipped"])
    assert float(out["loss"]) == pytest.approx(float(loss), rel=1e-6)
    assert set(LOSS_NAMES) <= set(out)


def test_mixed_precision_clips_unscaled_gradients():
    images, targets = _batch()
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model, ref = build_model(0), build_model(0)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.conv.compute_dtype == "float16"
    _, grads = _manual_grads(ref, images, targets)
    norm = float(tf.linalg.global_norm(grads))
    clip_norm = norm / 2  # scaled gradients (x 1024) clipped to this would give a ~1000x smaller update
    step = TrainStep(
        model,
        _sgd(),
        build_clipper(ClipConfig(strategy="global_norm", clip_norm=clip_norm)),
        loss_scale=LossScale(initial=1024.0),
    )
    out = step(images, targets)
    assert float(out["grad_norm_before"]) == pytest.approx(norm, rel=2e-2)
    clipped, _ = tf.clip_by_global_norm(grads, clip_norm)
    ref_opt = _sgd()
    ref_opt.apply_gradients(zip(clipped, ref.trainable_variables))
    for a, b in zip(model.trainable_variables, ref.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-2, atol=2e-4)
    assert float(step.loss_scale.scale.numpy()) == 1024.0


def test_non_finite_gradient_skips_the_step_and_leaves_weights_untouched():
    images, targets = _batch()
    model = build_model(0)
    opt = _sgd()
    clipper = build_clipper(ClipConfig(strategy="autoclip", warmup_steps=0, history=8))
    step = TrainStep(model, opt, clipper, loss_scale=LossScale(initial=8.0))
    step(images, targets)  # one good step builds the optimizer and fills the history
    before = [v.numpy().copy() for v in model.trainable_variables]
    slots = [v.numpy().copy() for v in opt.variables]
    bad = tf.tensor_scatter_nd_update(images, [[0, 0, 0, 0]], [np.nan])
    out = step(bad, targets)
    assert bool(out["skipped"])  # (ReLU may hide the NaN from the loss; the gradient carries it)
    for a, b in zip(model.trainable_variables, before):
        np.testing.assert_array_equal(a.numpy(), b)
    for a, b in zip(opt.variables, slots):  # momentum, iteration count: untouched too
        np.testing.assert_array_equal(a.numpy(), b)
    assert int(step.skipped.numpy()) == 1
    assert int(clipper.count.numpy()) == 1  # the NaN norm did not enter the autoclip history
    assert float(step.loss_scale.scale.numpy()) == 4.0  # halved
    out = step(images, targets)  # training continues
    assert not bool(out["skipped"]) and int(opt.iterations.numpy()) == 2


def test_xla_step_matches_the_plain_step():
    images, targets = _batch()
    plain, jitted = build_model(0), build_model(0)
    cfg = ClipConfig(strategy="global_norm", clip_norm=0.01)
    out_a = TrainStep(plain, _sgd(), build_clipper(cfg))(images, targets)
    out_b = TrainStep(jitted, _sgd(), build_clipper(cfg), jit_compile=True)(images, targets)
    assert float(out_b["grad_norm_before"]) == pytest.approx(float(out_a["grad_norm_before"]), rel=1e-4)
    assert bool(out_b["clipped"])
    for a, b in zip(plain.trainable_variables, jitted.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
