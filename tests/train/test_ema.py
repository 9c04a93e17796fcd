"""Weight averaging (train.ema_decay): the average follows the EMA formula over every float variable
(BatchNorm statistics included), validation scores and saves the averaged weights, the trained model ends
holding them while the checkpoint keeps the trained ones, and a resumed run continues the same average."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from pipeline.train.checkpoints import make_checkpoint
from pipeline.train.ema import WeightAverage
from pipeline.train.fit import fit

from .standin import build_model, synthetic_dataset, tiny_config


def _values(model) -> list[np.ndarray]:
    return [np.array(v.numpy()) for v in model.variables if "float" in str(v.dtype)]


def test_average_follows_the_ramped_ema_over_weights_and_batchnorm_statistics():
    model = build_model(0, bn=True)
    ema = WeightAverage(model, decay=0.9)
    expected = _values(model)
    rng = np.random.default_rng(0)
    for n in range(30):
        for v in model.variables:
            if "float" in str(v.dtype):
                v.assign(rng.normal(size=v.shape).astype(np.float32))
        d = min(0.9, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d)
        expected = [d * e + (1 - d) * c for e, c in zip(expected, _values(model))]
        ema.update()
    averaged = [np.array(a.numpy()) for a in ema.state.averages]
    assert len(averaged) == len(expected) and any("moving_variance" in v.path for v in model.variables)
    for got, want in zip(averaged, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_applied_swaps_the_averages_in_and_restores_the_weights_even_on_error():
    model = build_model(0)
    ema = WeightAverage(model, decay=0.5)
    own = _values(model)
    for v in model.trainable_variables:
        v.assign(v + 1.0)
    ema.update()  # decay 0.1 at n=0: average = 0.1 * initial + 0.9 * shifted
    shifted = _values(model)
    with pytest.raises(RuntimeError), ema.applied():
        for got, start, now in zip(_values(model), own, shifted):
            np.testing.assert_allclose(got, 0.1 * start + 0.9 * now, rtol=1e-6)
        raise RuntimeError("scoring failed")
    for got, now in zip(_values(model), shifted):
        np.testing.assert_array_equal(got, now)


def test_fit_validates_and_exports_the_average_and_checkpoints_the_trained_weights(tmp_path):
    cfg = tiny_config(steps=20, eval_every=10)
    cfg.train.ema_decay = 0.8
    cfg.train.checkpoint_every = 20
    model = build_model(0, bn=True)
    seen: list[list[np.ndarray]] = []

    def evaluate(m):
        seen.append(_values(m))
        return float(len(seen))  # every validation is the best so far: best/ holds the last one

    fit(model, lambda start: synthetic_dataset().skip(start), cfg, tmp_path, evaluate_fn=evaluate, progress=False)
    final = _values(model)
    # the final validation scored the weights the model now holds: the averages
    for got, scored in zip(final, seen[-1]):
        np.testing.assert_array_equal(got, scored)
    trained = build_model(1, bn=True)
    ema = WeightAverage(trained, 0.8)
    ckpt = make_checkpoint(model=trained, ema=ema.state)
    ckpt.restore(tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))).expect_partial()
    assert int(ema.state.updates.numpy()) == 20
    for got, average in zip(final, ema.state.averages):
        np.testing.assert_allclose(got, average.numpy())
    assert any(not np.allclose(a, b) for a, b in zip(_values(trained), final))  # the checkpoint: trained weights
    best = build_model(2, bn=True)
    best.load_weights(str(tmp_path / "best" / "model.weights.h5"))
    for got, want in zip(_values(best), final):
        np.testing.assert_allclose(got, want)
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 20


def test_resumed_run_continues_the_same_average(tmp_path):
    def run(model_dir, steps, resume):
        cfg = tiny_config(steps=20)
        cfg.train.schedule.name = "constant"
        cfg.train.ema_decay = 0.9
        cfg.train.checkpoint_every = 10
        cfg.train.steps = steps
        model = build_model(0)
        fit(model, lambda start: synthetic_dataset().skip(start), cfg, model_dir, resume=resume, progress=False)
        return _values(model)

    straight = run(tmp_path / "straight", 20, False)
    run(tmp_path / "halves", 10, False)
    resumed = run(tmp_path / "halves", 20, True)
    for a, b in zip(straight, resumed):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(a, b) for a, b in zip(straight, _values(build_model(0))))
