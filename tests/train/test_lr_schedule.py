"""Warmup + cosine / step / constant learning-rate schedules against their formulas; a schedule length that
changes (fitted to a time budget) and the fitting arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import ScheduleConfig
from pipeline.train.schedule import BudgetFit, ScheduleLength, build_schedule


def test_linear_warmup_then_cosine_to_final_factor():
    s = build_schedule(
        ScheduleConfig(name="cosine", warmup_steps=10, warmup_factor=0.1, final_factor=0.05), 0.2, 100
    )
    assert float(s(0)) == pytest.approx(0.2 * 0.1)
    assert float(s(5)) == pytest.approx(
        0.2 * (0.1 + 0.9 * 0.5) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.05)))
    )
    assert float(s(50)) == pytest.approx(0.2 * (0.05 + 0.95 * 0.5))
    assert float(s(100)) == pytest.approx(0.2 * 0.05)
    assert float(s(500)) == pytest.approx(0.2 * 0.05)  # past the end it stays at the floor


def test_step_decay_drops_by_gamma_at_each_milestone():
    s = build_schedule(
        ScheduleConfig(name="step", warmup_steps=0, step_milestones=[0.5, 0.75], step_gamma=0.1), 1.0, 100
    )
    assert [float(s(t)) for t in (0, 49, 50, 74, 75, 99)] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_constant_after_warmup():
    s = build_schedule(ScheduleConfig(name="constant", warmup_steps=4, warmup_factor=0.5), 0.1, 100)
    assert [float(s(t)) for t in (0, 2, 4, 90)] == pytest.approx([0.05, 0.075, 0.1, 0.1])


def test_a_changed_variable_length_ends_at_final_factor_at_the_new_length_without_retracing():
    length = ScheduleLength(100)
    s = build_schedule(
        ScheduleConfig(name="cosine", warmup_steps=10, warmup_factor=0.1, final_factor=0.05),
        0.2,
        length.steps,
    )
    lr = tf.function(lambda t: s(t))
    assert float(lr(tf.constant(100))) == pytest.approx(0.2 * 0.05)
    length.shorten(60)
    assert float(lr(tf.constant(30))) == pytest.approx(0.2 * (0.05 + 0.95 * 0.5))
    assert float(lr(tf.constant(60))) == pytest.approx(0.2 * 0.05)
    assert float(lr(tf.constant(59))) < 0.2 * 0.06
    assert lr.experimental_get_tracing_count() == 1
    assert s.get_config()["total_steps"] == 60


def test_step_milestones_follow_a_changed_length():
    length = ScheduleLength(100)
    s = build_schedule(
        ScheduleConfig(name="step", warmup_steps=0, step_milestones=[0.5, 0.75], step_gamma=0.1),
        1.0,
        length.steps,
    )
    length.shorten(40)
    assert [float(s(t)) for t in (19, 20, 29, 30)] == pytest.approx([1.0, 0.1, 0.1, 0.01])


@pytest.mark.parametrize("name", ["cosine", "step"])
def test_a_variable_length_gives_bit_identical_rates_to_the_int_one(name):
    cfg = ScheduleConfig(name=name, warmup_steps=100, step_milestones=[0.67, 0.89], final_factor=0.0)
    steps = tf.range(2101)
    plain = build_schedule(cfg, 0.02, 2000)(steps).numpy()
    variable = build_schedule(cfg, 0.02, ScheduleLength(2000).steps)(steps).numpy()
    np.testing.assert_array_equal(plain, variable)


def test_schedule_length_settles_after_a_restore():
    fitted, unfitted = ScheduleLength(900), ScheduleLength(1000)
    fitted.shorten(700)
    assert fitted.settle(2000) == 700  # a fitted length is kept ...
    assert fitted.settle(500) == 500  # ... but never beyond train.steps
    assert unfitted.settle(3000) == 3000  # an unfitted one follows train.steps


def _fitter(**kw):
    fit = BudgetFit(budget_s=100.0, planned=1000, start=0, skip=1, min_measured=3, safety=0.05, **kw)
    for step in range(1, 21):
        fit.step_done(step, 1.0)  # 1 s per step; steps 1 (tracing) and 2 (warm-up) are not measured
    return fit


def test_budget_fit_waits_for_measured_steps_after_tracing_and_warmup():
    fit = BudgetFit(budget_s=100.0, planned=1000, start=10, skip=2, min_measured=3)
    for step in range(11, 16):
        fit.step_done(step, 50.0 if step == 11 else 1.0)
    assert fit.measured == 2 and fit.fit(15, 10.0, 1000) is None  # steps 11-13 left out, too few measured
    fit.step_done(16, 1.0)
    assert fit.fit(16, 10.0, 1000) is not None and fit.rate == pytest.approx(1.0)


def test_budget_fit_takes_the_longest_length_that_ends_in_time():
    fit = _fitter()
    assert fit.fit(20, 20.0, 1000) == 95  # 100 s - 5% safety - 20 s used, at 1 step/s
    assert fit.fit(20, 20.0, 95) is None  # fits: never lengthened, nothing to change
    assert fit.fit(20, 20.0, 60) is None


def test_budget_fit_budgets_validations_and_checkpoints():
    fit = _fitter(eval_every=10, checkpoint_every=25, evaluates=True)
    fit.overhead("eval", 4.0)
    fit.overhead("checkpoint", 2.0)
    end = fit.fit(20, 20.0, 1000)
    left = 100.0 * 0.95 - 20.0
    assert fit.need_s(20, end) <= left < fit.need_s(20, end + 1)
    # 20 -> 69: 49 steps, evals at 30-60 and the final one, checkpoints at 25, 50 and the final one = 75 s
    assert end == 69 and fit.need_s(20, 69) == 49 + 5 * 4.0 + 3 * 2.0 == left
    assert fit.fit(20, 94.0, 1000) == 20  # no time left even for the final validation: stop now
