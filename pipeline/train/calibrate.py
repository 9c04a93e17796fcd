"""The output threshold stored with a model: the default score threshold of `satdet predict` for it.

Chosen on the validation blocks predicted the way `satdet predict` delivers a scene (windows, seams,
merge, the run's normalisation and flips), so the threshold applies to the scores users get. The rule
(`train.output_min_precision`): the most recall at precision >= the target, or the best F1 (null); never
a threshold above the best-F1 one.
Scores fall on sites the model never saw; a best-F1 threshold, which sits where the training site's
scores are confident, then keeps few detections there (docs/predict.md has the figures).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.evaluate.metrics import ImageBoxes, ImageDetections, operating_point, ranked_matches

log = logging.getLogger(__name__)

CALIBRATION_IOU = 0.5


def choose_output_threshold(gts: list[ImageBoxes], dets: list[ImageDetections], min_precision: float | None,
                            level: str) -> dict[str, Any] | None:
    """The calibrated threshold with its validation precision/recall/F1 (None when undefined: no ground truth
    or no detection). The precision target's threshold is taken only when it is below the best-F1 one: a
    weak model that reaches the target only with its very top scores keeps its best-F1 threshold."""
    scores, hit, n_gt = ranked_matches(gts, dets, CALIBRATION_IOU)
    if n_gt == 0 or len(scores) == 0:
        return None
    best = operating_point(scores, hit, n_gt)
    point, rule = best, "best_f1"
    if min_precision is not None:
        target = operating_point(scores, hit, n_gt, min_precision)
        if target is None:
            log.warning("no score threshold reaches precision %.2f on the validation %ss; storing the best-F1 one",
                        min_precision, level)
        elif target["score_threshold"] <= best["score_threshold"]:
            point, rule = target, f"max_recall_at_precision_{min_precision:g}"
    if point is None or point["f1"] <= 0:
        return None
    return {"score_threshold": point["score_threshold"], "iou": CALIBRATION_IOU, "split": "val", "level": level,
            "rule": rule, **{k: float(point[k]) for k in ("precision", "recall", "f1")}}


def calibrate_on_val_blocks(config: Config, tiles_dir: Path, export_dir: Path) -> dict[str, Any] | None:
    """`choose_output_threshold` on the labelled validation blocks of the tiled scenes, predicted by the export
    at scene level with the run's test-time settings. None when there are none, or when a scene image is not
    readable from here (the tiles can travel without their source scenes): the caller keeps the tile-level one."""
    from pipeline.evaluate.blocks import block_boxes, predict_blocks, split_windows
    from pipeline.geo.raster import exists_or_remote
    from pipeline.predict.adapt import load_for_predict

    scenes = [(e, windows) for e, windows in split_windows(tiles_dir, "val") if e.get("labels")]
    missing = [e["image"] for e, _ in scenes if not exists_or_remote(e["image"]) or not exists_or_remote(e["labels"])]
    if not scenes or missing:
        if missing:
            log.warning("%s: not readable here; output threshold calibrated on the validation tiles instead", missing[0])
        return None
    detector = load_for_predict(export_dir, config.predict)
    blocks = [b for e, windows in scenes
              for b in predict_blocks(config, detector, e["scene"], e["image"], e["labels"], windows)]
    gts, dets = block_boxes(blocks)
    return choose_output_threshold(gts, dets, config.train.output_min_precision, "scene")


__all__ = ["calibrate_on_val_blocks", "choose_output_threshold"]
