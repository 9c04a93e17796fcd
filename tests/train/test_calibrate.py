"""pipeline/train/calibrate.py: the output threshold stored with a model, chosen on validation data."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import rasterio

from pipeline.config import Config
from pipeline.evaluate.metrics import (
    ImageBoxes,
    ImageDetections,
    coco_metrics,
    prf_at_threshold,
    ranked_matches,
)
from pipeline.predict import exported
from pipeline.train.calibrate import calibrate_on_val_blocks, choose_output_threshold
from tests.evaluate.test_run import _labels
from tests.predict.fakes import BrightSquareDetector, write_scene

GT = [ImageBoxes(np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]), np.array([1, 1, 1]))]
# ranked: TP 0.9, FP 0.8, TP 0.6, FP 0.5, FP 0.4, TP 0.3
DET = [ImageDetections(np.array([[0, 0, 10, 10], [60, 60, 70, 70], [20, 20, 30, 30], [80, 80, 90, 90],
                                 [100, 100, 110, 110], [40, 40, 50, 50]]), np.ones(6, int),
                       scores=np.array([0.9, 0.8, 0.6, 0.5, 0.4, 0.3]))]


def test_best_f1_rule_matches_the_coco_best_f1():
    cal = choose_output_threshold(GT, DET, None, "tile")
    coco = coco_metrics(GT, DET, ["tree"], max_dets=100)["prf"]["0.5"]
    assert cal["rule"] == "best_f1" and cal["level"] == "tile"
    # cuts: 0.9 (P 1, R 1/3, F1 .5), 0.6 (P 2/3, R 2/3, F1 .667), 0.3 (P 1/2, R 1, F1 .667): first best
    assert cal["score_threshold"] == pytest.approx(0.6) == pytest.approx(coco["score_threshold"])
    assert cal["f1"] == pytest.approx(coco["f1"]) == pytest.approx(2 / 3)


def test_precision_target_keeps_the_most_recall_at_that_precision():
    cal = choose_output_threshold(GT, DET, 0.5, "scene")
    assert cal["rule"] == "max_recall_at_precision_0.5"
    assert cal["score_threshold"] == pytest.approx(0.3)  # P 3/6 = 0.5, R 1: below the best-F1 threshold
    assert (cal["precision"], cal["recall"]) == (pytest.approx(0.5), pytest.approx(1.0))
    # a target only the top score reaches (0.9, above the best-F1 threshold): the best F1 is kept
    strict = choose_output_threshold(GT, DET, 0.7, "scene")
    assert strict["rule"] == "best_f1" and strict["score_threshold"] == pytest.approx(0.6)
    # the stored figures are what prf_at_threshold measures at the stored threshold
    again = prf_at_threshold(GT, DET, cal["score_threshold"])
    assert again["precision"] == pytest.approx(cal["precision"]) and again["recall"] == pytest.approx(cal["recall"])


def test_unreachable_precision_falls_back_to_best_f1_with_a_warning(caplog):
    only_false = [ImageDetections(np.array([[60, 60, 70, 70], [0, 0, 10, 10]]), np.ones(2, int),
                                  scores=np.array([0.9, 0.5]))]
    with caplog.at_level(logging.WARNING):
        cal = choose_output_threshold(GT, only_false, 0.6, "tile")
    assert cal["rule"] == "best_f1" and cal["score_threshold"] == pytest.approx(0.5)
    assert "no score threshold reaches precision 0.60" in caplog.text
    assert choose_output_threshold([ImageBoxes(np.zeros((0, 4)), np.zeros(0, int))], DET, 0.5, "tile") is None
    empty = [ImageDetections(np.zeros((0, 4)), np.zeros(0, int), scores=np.zeros(0))]
    assert choose_output_threshold(GT, empty, 0.5, "tile") is None


def test_ranked_matches_give_prf_at_every_threshold():
    rng = np.random.default_rng(0)
    gts, dets = [], []
    for i in range(4):  # several images, two classes, overlapping and duplicate detections, tied scores
        g = rng.uniform(0, 80, (6, 2))
        gts.append(ImageBoxes(np.c_[g, g + 15], rng.integers(1, 3, 6), str(i)))
        d = np.r_[np.c_[g, g + 15] + rng.normal(0, 4, (6, 4)), rng.uniform(0, 80, (4, 4)).cumsum(1)]
        dets.append(ImageDetections(d, rng.integers(1, 3, 10), str(i), scores=np.round(rng.uniform(0, 1, 10), 1)))
    scores, hit, n_gt = ranked_matches(gts, dets, 0.5)
    assert n_gt == 24 and np.all(np.diff(scores) <= 0)
    for t in np.unique(scores):
        p = prf_at_threshold(gts, dets, t)
        kept = hit[scores >= t]
        assert p["tp"] == kept.sum() and p["fp"] == len(kept) - kept.sum()
    coco = coco_metrics(gts, dets, ["a", "b"], max_dets=100)["prf"]["0.5"]
    ours = choose_output_threshold(gts, dets, None, "tile")
    assert ours["f1"] == pytest.approx(coco["f1"]) and ours["score_threshold"] == pytest.approx(coco["score_threshold"])


# Bright squares: brightness 200 scores 0.78, 120 scores 0.47 (BrightSquareDetector: mean brightness / 255).
TRUE_BRIGHT = [(10, 10, 24, 24), (40, 30, 52, 42)]
FALSE_BRIGHT = (70, 130, 84, 144)  # unlabelled
TRUE_DIM = (100, 20, 114, 34, 120)
FALSE_DIM = [(100, 100, 114, 114, 120), (130, 60, 144, 74, 120)]  # unlabelled


def _val_tiles(tmp_path, image, labels):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    splits = {"method": "block", "scenes": [{
        "scene": "s", "image": str(image), "labels": str(labels), "width": 160, "height": 160, "crs": "EPSG:32617",
        "blocks": [{"window": [0, 0, 160, 160], "split": "val"}]}]}
    (tiles / "splits.json").write_text(json.dumps(splits))
    return tiles


@pytest.mark.parametrize(("min_precision", "threshold", "recall"), [(0.5, 0.47, 1.0), (None, 0.78, 2 / 3),
                                                                   (0.6, 0.78, 2 / 3)])
def test_calibration_on_val_blocks_predicts_the_scene_as_satdet_predict(tmp_path, monkeypatch, min_precision,
                                                                         threshold, recall):
    scene = write_scene(tmp_path / "s.tif", 160, 160, [*TRUE_BRIGHT, FALSE_BRIGHT], extra=[TRUE_DIM, *FALSE_DIM])
    with rasterio.open(scene, "r+") as ds:  # the dim squares in band 1 only: class 1 (tree), as the bright ones
        for band in (2, 3):
            ds.write(np.full((160, 160), 20, np.uint8), band)
    labels = _labels(tmp_path, [*TRUE_BRIGHT, TRUE_DIM[:4]])
    tiles = _val_tiles(tmp_path, scene, labels)
    monkeypatch.setattr(exported, "resolve_export_dir", lambda p: p)
    monkeypatch.setattr(exported, "load_detector", lambda p: BrightSquareDetector(tile_size=64))
    cfg = Config(classes=["tree"], predict={"overlap": 16}, train={"output_min_precision": min_precision})
    cal = calibrate_on_val_blocks(cfg, tiles, tmp_path / "export")
    # ranked: 0.78 x 3 (2 TP, 1 FP), then 0.47 x 3 (1 TP, 2 FP); ties are one cut each: P 2/3, R 2/3 (F1 2/3),
    # then P 1/2, R 1 (F1 2/3). The best F1 (the first of equals) keeps the bright ones; precision 0.5 keeps all.
    assert cal["level"] == "scene" and cal["split"] == "val"
    assert cal["score_threshold"] == pytest.approx(threshold, abs=0.01)
    assert cal["recall"] == pytest.approx(recall)


def test_calibration_without_the_source_scene_returns_none_so_the_tile_level_one_stays(tmp_path, caplog):
    tiles = _val_tiles(tmp_path, tmp_path / "moved.tif", tmp_path / "moved.geojson")
    with caplog.at_level(logging.WARNING):
        assert calibrate_on_val_blocks(Config(classes=["tree"]), tiles, tmp_path / "export") is None
    assert "moved.tif: not readable here" in caplog.text
