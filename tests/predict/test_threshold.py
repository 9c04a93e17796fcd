"""The output threshold: predict.score_threshold, else the export's validation-calibrated one, else 0.3.
How the stored one is chosen: tests/train/test_calibrate.py."""

from __future__ import annotations

import pytest

from pipeline.config import PredictConfig
from pipeline.predict.exported import DEFAULT_OUTPUT_THRESHOLD, output_threshold
from pipeline.predict.scene import predict_region

from .fakes import BrightSquareDetector, write_scene


def test_unset_threshold_takes_the_exports_calibrated_one_else_the_default():
    calibrated = {"output_threshold": {"score_threshold": 0.42}}
    assert output_threshold(PredictConfig(), calibrated) == pytest.approx(0.42)
    assert output_threshold(PredictConfig(), {"output_threshold": None}) == DEFAULT_OUTPUT_THRESHOLD
    assert output_threshold(PredictConfig(score_threshold=0.1), calibrated) == pytest.approx(0.1)


def test_predict_region_applies_the_calibrated_threshold(tmp_path):
    # brightness 200 -> score 0.78, brightness 120 -> score 0.47
    scene = write_scene(tmp_path / "s.tif", 64, 64, [(5, 5, 15, 15)], extra=[(30, 30, 40, 40, 120)])
    det = BrightSquareDetector(tile_size=64)
    det.info["output_threshold"] = {"score_threshold": 0.6}
    assert len(predict_region(det, scene, PredictConfig())) == 1
    det.info["output_threshold"] = None
    assert len(predict_region(det, scene, PredictConfig())) == 2  # 0.3 for exports without one
