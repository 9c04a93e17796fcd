"""Optimizers from config: decoupled weight decay that skips biases and norm parameters."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.config import OptimizerConfig
from pipeline.train.optim import build_optimizer


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_weight_decay_shrinks_kernels_but_not_biases_or_norm_parameters(name):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(3), keras.layers.BatchNormalization()])
    model.build((None, 2))
    opt = build_optimizer(OptimizerConfig(name=name, learning_rate=0.5, weight_decay=0.1), 0.5)
    model.layers[0].bias.assign(np.ones(3, np.float32))
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    zeros = [np.zeros(v.shape, np.float32) for v in model.trainable_variables]
    opt.apply_gradients(zip(zeros, model.trainable_variables))
    after = {v.path: v.numpy() for v in model.trainable_variables}
    kernel = next(p for p in before if p.endswith("kernel"))
    np.testing.assert_allclose(after[kernel], before[kernel] * (1 - 0.5 * 0.1), rtol=1e-6)  # w -= lr*wd*w
    for path, value in before.items():
        if not path.endswith("kernel"):
            np.testing.assert_array_equal(after[path], value)


def test_sgd_uses_configured_momentum_and_no_keras_clipping():
    opt = build_optimizer(OptimizerConfig(name="sgd", momentum=0.8), 0.01)
    assert opt.momentum == pytest.approx(0.8)
    assert opt.clipnorm is None and opt.global_clipnorm is None and opt.clipvalue is None
