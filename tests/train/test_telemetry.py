"""train_log.jsonl: plain JSON (non-finite → null), cut back to the resumed step."""

from __future__ import annotations

import math

from pipeline.train.telemetry import Telemetry, read_log


def test_non_finite_values_are_logged_as_null_and_tensorboard_gets_events(tmp_path):
    t = Telemetry(tmp_path)
    t.log(1, {"loss": math.nan, "clip_threshold": math.inf, "clipped": True, "lr": 0.01})
    t.close()
    assert read_log(tmp_path) == [
        {"step": 1, "loss": None, "clip_threshold": None, "clipped": True, "lr": 0.01}
    ]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_drops_records_logged_after_the_checkpoint(tmp_path):
    t = Telemetry(tmp_path)
    for step in (5, 10, 15):
        t.log(step, {"loss": float(step)})
    t.close()
    t = Telemetry(tmp_path, start_step=10)
    t.log(15, {"loss": 1.5})
    t.close()
    assert [(r["step"], r["loss"]) for r in read_log(tmp_path)] == [(5, 5.0), (10, 10.0), (15, 1.5)]
