"""A skipped (non-finite) step leaves every model variable as it was, BatchNorm moving statistics included,
and so does the initial variable build; a finite step still moves the statistics."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import ClipConfig, OptimizerConfig
from pipeline.train.clipping import build_clipper
from pipeline.train.optim import build_optimizer
from pipeline.train.step import LossScale, TrainStep, build_variables

from .standin import build_bn_detector, build_model, detector_arrays, synthetic_arrays


def _snapshot(variables) -> list[bytes]:
    return [v.numpy().tobytes() for v in variables]


def _changed(variables, snapshot: list[bytes]) -> list[str]:
    """Paths of the variables whose bytes differ from the snapshot."""
    return [v.path for v, old in zip(variables, snapshot, strict=True) if v.numpy().tobytes() != old]


def _with_nan(images: tf.Tensor) -> tf.Tensor:
    return tf.tensor_scatter_nd_update(images, [[1, 5, 7, 0]], [np.nan])  # one pixel of the second image


def test_real_detector_skipped_step_leaves_bn_statistics_bit_identical():
    keras.utils.set_random_seed(0)
    model = build_bn_detector()
    stats = [v for v in model.non_trainable_variables if "moving_" in v.path]
    assert len(stats) == 10  # moving mean and variance of the five batch norms
    for v in stats:  # the constructor's build call (inference mode) left them at their initial values
        assert (v.numpy() == (0.0 if v.path.endswith("moving_mean") else 1.0)).all(), v.path
    images, targets = detector_arrays(n=2, size=64)
    images, targets = tf.constant(images), {k: tf.constant(v) for k, v in targets.items()}

    constructed = _snapshot(model.variables)
    spec = (tf.TensorSpec.from_tensor(images), {k: tf.TensorSpec.from_tensor(v) for k, v in targets.items()})
    build_variables(model, spec)
    assert _changed(model.variables, constructed) == []  # the build moves no statistic and no seed

    opt = build_optimizer(OptimizerConfig(name="sgd", learning_rate=0.01), 0.01)
    step = TrainStep(model, opt, build_clipper(ClipConfig(strategy="global_norm", clip_norm=10.0)))
    initial = _snapshot(stats)
    assert not bool(step(images, targets)["skipped"])
    assert len(_changed(stats, initial)) > len(stats) // 2  # a finite step moves the statistics

    before, before_opt = _snapshot(model.variables), _snapshot(opt.variables)
    out = step(_with_nan(images), targets)
    assert bool(out["skipped"]) and int(step.skipped.numpy()) == 1
    # weights, BN moving mean/variance, the sampling seed: all bit-identical (without the restore the
    # statistics would now be NaN), and the optimizer's slots and iteration count too
    assert _changed(model.variables, before) == []
    assert _changed(opt.variables, before_opt) == []

    kept = _snapshot(stats)
    assert not bool(step(images, targets)["skipped"])  # training goes on and moves them again
    assert len(_changed(stats, kept)) > len(stats) // 2
    assert all(np.isfinite(v.numpy()).all() for v in stats)


@pytest.mark.parametrize("variant", ["nan_input", "nan_input_xla", "mixed_float16_overflow"])
def test_skipped_step_restores_bn_statistics_with_xla_and_mixed_precision(variant):
    """The stand-in with a batch norm: the restore also holds in an XLA-compiled step and for a step that a
    float16 overflow skips (finite inputs, finite batch statistics, infinite scaled gradient)."""
    mixed = variant == "mixed_float16_overflow"
    previous = keras.config.dtype_policy()
    if mixed:
        keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build_model(0, bn=True)
    finally:
        keras.config.set_dtype_policy(previous)
    images, targets = synthetic_arrays(4, seed=0)
    images, targets = tf.constant(images), {k: tf.constant(v) for k, v in targets.items()}
    opt = build_optimizer(OptimizerConfig(name="sgd", learning_rate=0.01), 0.01)
    scale = LossScale(initial=1024.0) if mixed else None
    step = TrainStep(model, opt, build_clipper(ClipConfig()), loss_scale=scale,
                           jit_compile=variant.endswith("xla"))
    stats = [model.bn.moving_mean, model.bn.moving_variance]
    initial = _snapshot(stats)
    assert not bool(step(images, targets)["skipped"])
    assert len(_changed(stats, initial)) == 2

    before, before_opt = _snapshot(model.variables), _snapshot(opt.variables)
    if mixed:
        scale.scale.assign(2.0**40)  # the float16 backward pass overflows
        out = step(images, targets)
    else:
        out = step(_with_nan(images), targets)
    assert bool(out["skipped"])
    assert _changed(model.variables, before) == []
    assert _changed(opt.variables, before_opt) == []

    if mixed:
        scale.scale.assign(1024.0)
    kept = _snapshot(stats)
    assert not bool(step(images, targets)["skipped"])
    assert len(_changed(stats, kept)) == 2
