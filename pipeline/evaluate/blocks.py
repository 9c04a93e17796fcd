"""Labelled blocks of a scene predicted as `satdet predict` delivers them, with their ground truth: what
scene-level evaluation (pipeline.evaluate.run) and the output-threshold calibration
(pipeline.train.calibrate) score. Reads only `tiling`, `predict` and `classes` of the config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.errors import SatdetError
from pipeline.evaluate.metrics import ImageBoxes, ImageDetections


@dataclass
class BlockResult:
    """One evaluated block: its scene, window, ground truth and detections in scene pixels."""

    scene: str
    image: str
    window: tuple[int, int, int, int]
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    detections: Any  # pipeline.predict.scene.SceneDetections


def load_splits(tiles_dir: Path) -> dict[str, Any]:
    path = tiles_dir / "splits.json"
    if not path.is_file():
        raise SatdetError(f"{path}: not found; run the tiling stage first (satdet tile CONFIG)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise SatdetError(f"{path}: not valid JSON; re-run the tiling stage") from None


def split_windows(tiles_dir: Path, split: str) -> list[tuple[dict[str, Any], list[tuple[int, ...]]]]:
    """Each tiled scene (its splits.json entry) with the windows of its `split` blocks; scenes without any
    are left out."""
    out = []
    for entry in load_splits(tiles_dir).get("scenes", []):
        windows = [tuple(int(v) for v in b["window"]) for b in entry.get("blocks", []) if b.get("split") == split]
        if windows:
            out.append((entry, windows))
    return out


def predict_blocks(config: Config, detector: Any, name: str, image: str, labels_path: str,
                    windows: list[tuple[int, ...]] | None) -> list[BlockResult]:
    """Predict `windows` of one scene (None: the whole scene) at score threshold 0, with the ground truth
    the tiling edge policy keeps in each. The adaptation (scene statistics, AdaBN) is that of the whole scene,
    as `satdet predict` on the scene would do, not of each block alone."""
    from pipeline.geo.edges import EdgePolicy
    from pipeline.geo.labels import read_labels
    from pipeline.geo.raster import exists_or_remote, raster_info
    from pipeline.predict.adapt import scene_detector
    from pipeline.predict.scene import predict_region

    if not exists_or_remote(image):
        raise SatdetError(f"{image}: evaluation scene not found; fix evaluate.scenes or --scene")
    if not exists_or_remote(labels_path):
        raise SatdetError(f"{labels_path}: labels of evaluation scene {image} not found; fix evaluate.scenes or --labels")
    policy = EdgePolicy(config.tiling.min_visibility)
    pcfg = config.predict.model_copy(update={"score_threshold": 0.0})
    info = raster_info(image)
    labels = read_labels(labels_path, info, config.classes, config.tiling.label_field)
    adapted = scene_detector(detector, image, pcfg)
    out = []
    for c, r, w, h in windows or [(0, 0, info.width, info.height)]:
        kept = policy.apply(labels.boxes, (c, r, c + w, r + h))
        region = (c, r, w, h)
        dets = predict_region(adapted, image, pcfg, region=region)
        out.append(BlockResult(name, image, region, kept.boxes, labels.class_ids[kept.index], dets))
    return out


def block_boxes(blocks: list[BlockResult]) -> tuple[list[ImageBoxes], list[ImageDetections]]:
    """Ground truth and detections of each block, in block pixels, one pycocotools image per block."""
    gts, dets = [], []
    for b in blocks:
        shift = np.array(b.window[:2] * 2, np.float64)
        name = f"{b.scene}@{b.window[0]},{b.window[1]}"
        gts.append(ImageBoxes(b.gt_boxes - shift, b.gt_labels, name))
        d = b.detections
        dets.append(ImageDetections(d.boxes - shift, d.labels, name, scores=d.scores))
    return gts, dets
