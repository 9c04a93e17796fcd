"""The output threshold: predict.score_threshold, else the export's validation-calibrated one, else 0.3."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import PredictConfig
from pipeline.evaluate.metrics import ImageBoxes, ImageDetections, coco_metrics
from pipeline.predict.exported import DEFAULT_OUTPUT_THRESHOLD, output_threshold
from pipeline.predict.scene import predict_region
from pipeline.train.validation import output_threshold as calibrate

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


def test_calibration_is_the_best_f1_threshold_of_the_validation_metrics():
    gt = [ImageBoxes(np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([1, 1]))]
    # two true boxes at 0.9 and 0.6, a false one at 0.7: F1 is best keeping all three (P 2/3, R 1)
    # or the first only (P 1, R 0.5): 0.8 vs 0.667 -> threshold 0.6
    det = [ImageDetections(np.array([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]]), np.array([1, 1, 1]),
                           scores=np.array([0.9, 0.7, 0.6]))]
    cal = calibrate(coco_metrics(gt, det, ["tree"], max_dets=100))
    assert cal["score_threshold"] == pytest.approx(0.6)
    assert cal["precision"] == pytest.approx(2 / 3) and cal["recall"] == pytest.approx(1.0)
    assert calibrate(None) is None
