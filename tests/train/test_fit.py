"""fit: a short run on synthetic data (loss, telemetry, checkpoints), best weights and early stopping,
divergence."""

from __future__ import annotations

import json

import numpy as np
import tensorflow as tf

from pipeline.model.losses import LOSS_NAMES
from pipeline.train.fit import fit
from pipeline.train.telemetry import read_log

from .standin import build_model, synthetic_dataset, tiny_config


def test_fit_lowers_the_loss_and_writes_telemetry_and_checkpoints(tmp_path):
    cfg = tiny_config(steps=60, clip={"strategy": "zclip", "warmup_steps": 5}, learning_rate=0.05)
    cfg.train.log_every = 10
    cfg.train.checkpoint_every = 30
    cfg.train.optimizer.name = "adam"
    cfg.train.optimizer.learning_rate = 0.03
    summary = fit(
        build_model(0), lambda start: synthetic_dataset(batch=8).skip(start), cfg, tmp_path, progress=False
    )
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [10, 20, 30, 40, 50, 60]
    first, last = log[0]["loss"], np.mean([r["loss"] for r in log[-2:]])
    assert last < 0.8 * first
    for key in (
        "loss",
        *LOSS_NAMES,
        "lr",
        "grad_norm_before",
        "grad_norm_after",
        "clipped",
        "clip_fraction",
        "clip_fraction_total",
        "skipped_steps",
        "images_per_s",
        "clip_threshold",
    ):
        assert key in log[-1], key
    assert summary["step"] == 60 and summary["skipped_steps"] == 0
    ckpts = tf.train.get_checkpoint_state(str(tmp_path / "checkpoints")).all_model_checkpoint_paths
    assert [p.rsplit("-", 1)[1] for p in ckpts] == ["30", "60"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    json.dumps(log)  # the log is plain JSON


def test_fit_keeps_best_checkpoint_and_stops_early(tmp_path):
    cfg = tiny_config(steps=50, eval_every=5, early_stopping_patience=2)
    scores = iter([0.2, 0.5, 0.4, 0.3, 0.9, 0.9])
    summary = fit(
        build_model(0),
        lambda start: synthetic_dataset().skip(start),
        cfg,
        tmp_path,
        evaluate_fn=lambda m: next(scores),
        progress=False,
    )
    assert summary["stop_reason"] == "early_stopping" and summary["step"] == 20
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best == {"step": 10, "ap50": 0.5}
    assert (tmp_path / "best" / "model.weights.h5").exists()


def test_fit_stops_as_diverged_after_consecutive_non_finite_steps(tmp_path):
    cfg = tiny_config(steps=50, max_consecutive_skips=3)

    def poisoned(start):  # every batch carries a NaN pixel: every step is skipped
        return synthetic_dataset().map(lambda x, y: (x * np.float32("nan"), y)).skip(start)

    model = build_model(0)
    before = [v.numpy().copy() for v in model.trainable_variables]
    summary = fit(model, poisoned, cfg, tmp_path, progress=False)
    assert summary["stop_reason"] == "diverged" and summary["step"] == 3 and summary["skipped_steps"] == 3
    for a, b in zip(model.trainable_variables, before):
        np.testing.assert_array_equal(a.numpy(), b)
    assert read_log(tmp_path)[-1]["step"] == 3
