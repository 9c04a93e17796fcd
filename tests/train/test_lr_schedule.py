"""Warmup + cosine / step / constant learning-rate schedules against their formulas."""

from __future__ import annotations

import math

import pytest

from pipeline.config import ScheduleConfig
from pipeline.train.schedule import build_schedule


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
