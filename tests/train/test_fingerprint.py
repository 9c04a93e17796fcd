"""--resume checks the settings the checkpoints were written with (checkpoints/fingerprint.json)."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.errors import SatdetError
from pipeline.train.checkpoints import FINGERPRINT_FILE, check_fingerprint, config_fingerprint
from pipeline.train.fit import fit

from .standin import build_model, synthetic_dataset, tiny_config

STATS = {"dtype": "uint8", "bands": [1, 2, 3], "channels": 3, "tile_size": 400, "low": [0.0] * 3}


def _fit(model_dir, cfg, resume=False):
    return fit(build_model(0), lambda start: synthetic_dataset().skip(start), cfg, model_dir, resume=resume,
               progress=False)


def _error(model_dir, cfg) -> str:
    with pytest.raises(SatdetError) as info:
        check_fingerprint(model_dir, config_fingerprint(cfg, STATS), resuming=True)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_resume_with_other_settings_names_each_difference_in_both_directions(tmp_path):
    cfg = tiny_config(clip={"strategy": "global_norm"})
    check_fingerprint(tmp_path, config_fingerprint(cfg, STATS), resuming=False)
    stored = json.loads((tmp_path / "checkpoints" / FINGERPRINT_FILE).read_text())
    assert stored["train.clip.strategy"] == "global_norm" and stored["tiles.tile_size"] == 400

    other = cfg.model_copy(deep=True)
    other.model.backbone, other.train.optimizer.name = "tiny", "adam"
    other.train.clip.strategy = "autoclip"  # adds a setting: the length of autoclip's saved history
    other.classes = ["tree", "roof"]
    message = _error(tmp_path, other)
    for change in ('model.backbone: "mobilenet_v3_large" -> "tiny"', 'train.optimizer.name: "sgd" -> "adam"',
                   'train.clip.strategy: "global_norm" -> "autoclip"', "train.clip.history: (unset) -> 1000",
                   'classes: ["tree"] -> ["tree", "roof"]'):
        assert change in message, message
    assert "tile_size" not in message  # only what differs

    # the other direction: a run written with autoclip, resumed with global_norm, loses the setting
    check_fingerprint(tmp_path, config_fingerprint(other, STATS), resuming=False)
    message = _error(tmp_path, cfg)
    assert "train.clip.history: 1000 -> (unset)" in message and "train.clip.strategy" in message

    # the tile layout, from tiles/stats.json
    check_fingerprint(tmp_path, config_fingerprint(cfg, STATS), resuming=False)
    with pytest.raises(SatdetError, match=r'\(tiles\.dtype: "uint8" -> "uint16"; tiles\.tile_size: 400 -> 512\)'):
        check_fingerprint(tmp_path, config_fingerprint(cfg, {**STATS, "tile_size": 512, "dtype": "uint16"}),
                          resuming=True)

    # harmless settings resume: steps, learning rate, clip threshold, inference-only and kernel choices
    same = cfg.model_copy(deep=True)
    same.train.steps, same.train.optimizer.learning_rate, same.train.clip.clip_norm = 99, 0.5, 3.0
    same.model.score_threshold, same.model.nms_impl, same.model.max_detections = 0.3, "padded", 7
    check_fingerprint(tmp_path, config_fingerprint(same, STATS), resuming=True)


def test_fit_refuses_a_resume_with_another_clipping_strategy_and_allows_more_steps(tmp_path, caplog):
    cfg = tiny_config(steps=4, clip={"strategy": "zclip"})
    cfg.train.checkpoint_every = 2
    _fit(tmp_path, cfg)
    assert (tmp_path / "checkpoints" / FINGERPRINT_FILE).is_file()

    changed = tiny_config(steps=4, clip={"strategy": "none"})
    with pytest.raises(SatdetError, match=r'\(train\.clip\.strategy: "zclip" -> "none"\)'):
        _fit(tmp_path, changed, resume=True)

    longer = tiny_config(steps=6, clip={"strategy": "zclip"})  # train.steps may change on resume
    (tmp_path / "checkpoints" / FINGERPRINT_FILE).unlink()  # as in a run from before fingerprints
    with caplog.at_level(logging.WARNING, logger="pipeline.train.checkpoints"):
        summary = _fit(tmp_path, longer, resume=True)
    assert summary["step"] == 6 and summary["resumed_from"].endswith("ckpt-4")
    assert any("resuming without checking" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "checkpoints" / FINGERPRINT_FILE).is_file()  # written for the next resume


def test_switching_weight_averaging_at_resume_is_named_and_its_decay_may_change(tmp_path):
    cfg = tiny_config()
    check_fingerprint(tmp_path, config_fingerprint(cfg, STATS), resuming=False)
    assert "train.ema" not in json.loads((tmp_path / "checkpoints" / FINGERPRINT_FILE).read_text())  # as older runs
    averaged = cfg.model_copy(deep=True)
    averaged.train.ema_decay = 0.99
    assert "train.ema: (unset) -> true" in _error(tmp_path, averaged)
    check_fingerprint(tmp_path, config_fingerprint(averaged, STATS), resuming=False)
    assert "train.ema: true -> (unset)" in _error(tmp_path, cfg)
    other_decay = averaged.model_copy(deep=True)
    other_decay.train.ema_decay = 0.999
    check_fingerprint(tmp_path, config_fingerprint(other_decay, STATS), resuming=True)


def test_runs_from_before_the_roi_align_shift_resume_and_switching_it_is_named(tmp_path):
    """Off (the default) leaves the fingerprint as runs made before the option wrote it; turning it on or off
    at resume changes what the box head was trained on, and the error names it."""
    cfg = tiny_config()
    assert not cfg.model.roi_align_shift
    check_fingerprint(tmp_path, config_fingerprint(cfg, STATS), resuming=False)
    assert "model.roi_align_shift" not in json.loads((tmp_path / "checkpoints" / FINGERPRINT_FILE).read_text())
    shifted = cfg.model_copy(deep=True)
    shifted.model.roi_align_shift = True
    assert "model.roi_align_shift: (unset) -> true" in _error(tmp_path, shifted)
    check_fingerprint(tmp_path, config_fingerprint(shifted, STATS), resuming=False)
    assert "model.roi_align_shift: true -> (unset)" in _error(tmp_path, cfg)
    check_fingerprint(tmp_path, config_fingerprint(shifted, STATS), resuming=True)  # same setting: no error
