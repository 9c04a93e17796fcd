"""The evaluation stage: score the exported model per scene (what users get) and per tile.

    run_evaluation(config, model_dir, tiles_dir, out_dir) -> Path     (CLI `satdet evaluate CONFIG`)

Scene level: for every scene in tiles/splits.json with blocks of `config.evaluate.split`, each such block
is predicted with the full-scene inference of pipeline.predict (windows, seam rule, nodata, merge — the
same code path as `satdet predict`) at score threshold 0, so the PR curve covers the model's whole score
range (the model's own `model.score_threshold` still applies). Ground truth comes from the scene's labels
through pipeline.geo.labels (any format, any CRS), restricted to the block with the tiling edge policy
(pipeline.geo.edges.EdgePolicy, `tiling.min_visibility`): a label cut by the block edge counts, clipped,
when enough of it is inside. Each block is one "image" for pycocotools, so `evaluate.max_dets` must
cover the objects of a whole block.

Tile level: the split's TFRecord shards are decoded and run through the same exported model (raw pixels,
normalisation inside), scored against the tile boxes stored by tiling.

Outputs in `out_dir`: metrics.json, report.md, pr_curve.png, examples.png, detections.geojson
(scene-level detections at `predict.score_threshold`, EPSG:4326).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.errors import SatdetError
from pipeline.evaluate.blocks import BlockResult, block_boxes, predict_blocks, split_windows
from pipeline.evaluate.metrics import ImageBoxes, ImageDetections, coco_metrics, prf_at_threshold
from pipeline.files import atomic_write_json

log = logging.getLogger(__name__)


def evaluate_scenes(config: Config, detector: Any, tiles_dir: Path) -> list[BlockResult]:
    """Predict every `config.evaluate.split` block of every labelled scene, then every `evaluate.scenes`
    scene whole; ground truth per block. `detector` is what pipeline.predict.adapt.load_for_predict gives."""
    split = config.evaluate.split
    results: list[BlockResult] = []
    if not config.evaluate.only_scenes:
        for entry, windows in split_windows(tiles_dir, split):
            if not entry.get("labels"):
                log.warning("scene %s has no labels; skipped in scene-level evaluation", entry.get("scene"))
                continue
            results += predict_blocks(config, detector, entry["scene"], entry["image"], entry["labels"], windows)
    for scene in config.evaluate.scenes:
        image, labels = str(scene.image), str(scene.labels)
        results += predict_blocks(config, detector, Path(image).stem, image, labels, None)
    return results


def _block_metrics(blocks: list[BlockResult], config: Config) -> dict[str, Any]:
    gts, dets = block_boxes(blocks)
    out = coco_metrics(gts, dets, config.classes, config.evaluate.max_dets, tuple(config.evaluate.iou_thresholds_f1))
    out["at_output_threshold"] = {f"{iou:g}": prf_at_threshold(gts, dets, config.predict.score_threshold, iou)
                                  for iou in config.evaluate.iou_thresholds_f1}
    return out


def evaluate_tiles(config: Config, detector: Any, tiles_dir: Path, batch: int = 8) -> tuple[dict[str, Any] | None, int]:
    """Per-tile metrics on the split's shards through the exported model; (None, 0) when there are none.
    A model trained with data.normalize: scene gets each tile moved to its scene's stretch, as in training."""
    import tensorflow as tf

    from pipeline.data.records import decode_tile_numpy
    from pipeline.data.tiles import shard_paths

    per_scene = _per_scene_detectors(detector, tiles_dir)

    shards = shard_paths(tiles_dir, config.evaluate.split)
    if not shards:
        return None, 0
    gts: list[ImageBoxes] = []
    dets: list[ImageDetections] = []
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        keys = {(t["image"].shape, t["scene"] if per_scene else "") for t in pending}
        for shape, scene in keys:  # tiles of one run share a size; group anyway to be safe
            group = [t for t in pending if t["image"].shape == shape and (not per_scene or t["scene"] == scene)]
            out = (per_scene(scene) if per_scene else detector).predict(np.stack([t["image"] for t in group]))
            for n, t in enumerate(group):
                k = int(out["num_detections"][n])
                gts.append(ImageBoxes(t["boxes"], t["labels"], t["id"]))
                dets.append(ImageDetections(out["boxes"][n][:k], out["classes"][n][:k], t["id"],
                                            scores=out["scores"][n][:k]))
        pending.clear()

    for record in tf.data.TFRecordDataset([str(s) for s in shards]).as_numpy_iterator():
        pending.append(decode_tile_numpy(record))
        if len(pending) >= batch:
            flush()
    if pending:
        flush()
    return coco_metrics(gts, dets, config.classes, config.evaluate.max_dets,
                        tuple(config.evaluate.iou_thresholds_f1)), len(gts)


def run_evaluation(config: Config, model_dir: Path, tiles_dir: Path, out_dir: Path) -> Path:
    """Scene- and tile-level evaluation of the exported model; writes the report files into `out_dir`."""
    from pipeline.evaluate.plots import plot_examples, plot_pr_curves
    from pipeline.evaluate.report import write_report
    from pipeline.predict.adapt import SceneAdapter, load_for_predict
    from pipeline.predict.exported import output_threshold, resolve_export_dir

    model_dir, tiles_dir, out_dir = Path(model_dir), Path(tiles_dir), Path(out_dir)
    export_dir = resolve_export_dir(model_dir)
    detector = load_for_predict(export_dir, config.predict)
    threshold = output_threshold(config.predict, detector.info)
    config = config.model_copy(update={"predict": config.predict.model_copy(update={"score_threshold": threshold})})
    model_classes = list(detector.info.get("classes") or config.classes)
    if model_classes != list(config.classes):
        raise SatdetError(f"{export_dir}: model classes {model_classes} differ from config classes "
                          f"{list(config.classes)}; evaluate with the config the model was trained with")

    blocks = evaluate_scenes(config, detector, tiles_dir)
    scene = _block_metrics(blocks, config) if blocks else None
    per_scene = {name: _block_metrics([b for b in blocks if b.scene == name], config)
                 for name in dict.fromkeys(b.scene for b in blocks)}
    exported = detector.exported if isinstance(detector, SceneAdapter) else detector
    tile, n_tiles = (None, 0) if config.evaluate.only_scenes else evaluate_tiles(config, exported, tiles_dir)
    if scene is None and tile is None:
        raise SatdetError(f"{tiles_dir}: no labelled {config.evaluate.split} blocks or tiles to evaluate; "
                          f"check tiling.split fractions or set evaluate.split")

    out_dir.mkdir(parents=True, exist_ok=True)
    thr = config.predict.score_threshold
    _write_detections_above(blocks, thr, out_dir / "detections.geojson")

    metrics = {
        "split": config.evaluate.split,
        "n_scenes": len({b.scene for b in blocks}),
        "n_blocks": len(blocks),
        "n_tiles": n_tiles,
        "model": str(export_dir),
        "output_score_threshold": thr,
        "adaptation": {"normalize": config.predict.normalize, "adapt_bn": config.predict.adapt_bn,
                       "tta": config.predict.tta, "match_resolution": config.predict.match_resolution},
        "scene": scene,
        "per_scene": {name: scene_summary(m) for name, m in per_scene.items()},
        "tile": tile,
    }
    atomic_write_json(out_dir / "metrics.json", metrics)
    plot_pr_curves(metrics, out_dir / "pr_curve.png")
    plot_examples(blocks, config, out_dir / "examples.png", score_threshold=_example_threshold(scene, thr))
    write_report(metrics, config, out_dir / "report.md")
    return out_dir


def _write_detections_above(blocks: list[BlockResult], threshold: float, path: Path) -> None:
    """The scene-level detections scoring >= `threshold` as EPSG:4326 GeoJSON (empty without a CRS)."""
    from pipeline.files import atomic_write_text
    from pipeline.predict.vectors import write_detections

    shown = []
    for b in blocks:
        d = b.detections
        keep = d.scores >= threshold
        shown.append(type(d)(**{**d.__dict__, "boxes": d.boxes[keep], "scores": d.scores[keep],
                                "labels": d.labels[keep]}))
    if shown and all(s.crs for s in shown):
        write_detections(shown, path, "geojson")
    else:
        atomic_write_text(path, '{"type": "FeatureCollection", "features": []}\n')


def _per_scene_detectors(detector: Any, tiles_dir: Path) -> Any:
    """For a model trained with data.normalize: scene, a function scene name -> `detector` fed that scene's
    stretch (stats.json `scenes`); None for any other model."""
    if detector.info.get("training_normalize") != "scene":
        return None
    from pipeline.data.stats import load_stats, scene_stats_of
    from pipeline.predict.adapt import SceneNormalized

    stats = load_stats(tiles_dir)

    @functools.cache  # one per scene, not one per batch of tiles
    def for_scene(scene: str) -> SceneNormalized:
        return SceneNormalized(detector, scene_stats_of(stats, scene, str(tiles_dir / "stats.json")))

    return for_scene


def scene_summary(m: dict[str, Any]) -> dict[str, Any]:
    """The per-scene table's figures: COCO AP/AP50/AP75, counts, P/R/F1 at best F1 for each F1 IoU."""
    out = {k: m[k] for k in ("AP", "AP50", "AP75", "AR", "n_gt", "n_det")}
    out["prf"] = m.get("prf") or {}
    out["at_output_threshold"] = m.get("at_output_threshold") or {}
    return out


def _example_threshold(scene: dict[str, Any] | None, default: float) -> float:
    """Draw detections at the best-F1 threshold (IoU 0.5) when known, else the output threshold."""
    best = ((scene or {}).get("prf") or {}).get("0.5", {}).get("score_threshold", -1)
    return float(best) if best is not None and best >= 0 else default
