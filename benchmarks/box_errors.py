"""Where localisation goes wrong: size and centre errors of the boxes a run's model gets right.

    .venv/bin/python benchmarks/box_errors.py --runs-dir runs             # after benchmarks/cross_site.py
    .venv/bin/python benchmarks/box_errors.py --config configs/neon-trees.yaml --runs-dir runs --splits val

Every labelled block of the given splits is predicted as `satdet evaluate` does (the run's `predict`
settings). Detections at or above the model's output threshold are matched to ground truth greedily by
score at IoU >= 0.3; for the matches it reports the IoU, the log ratio of predicted to true width and height
(a bias shows as a median away from 0, scatter as the spread) and the centre offset as a fraction of the
true size. It then rescores the blocks with every box resized by the median ratios: when AP75 does not move,
the loose boxes are scatter, not a bias a constant correction could remove. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def matched_pairs(gt: np.ndarray, det: np.ndarray, scores: np.ndarray, threshold: float, min_iou: float = 0.3
                  ) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(detection, ground truth, IoU) of each greedy score-ordered match at IoU >= min_iou."""
    from pipeline.predict.iou import iou_matrix

    keep = scores >= threshold
    det = det[keep][np.argsort(-scores[keep], kind="stable")]
    if len(gt) == 0 or len(det) == 0:
        return []
    iou = iou_matrix(det, gt)
    free = np.ones(len(gt), bool)
    out = []
    for i in range(len(det)):
        j = int(np.argmax(np.where(free, iou[i], -1.0)))
        if free[j] and iou[i, j] >= min_iou:
            free[j] = False
            out.append((det[i], gt[j], float(iou[i, j])))
    return out


def error_stats(pairs: list[tuple[np.ndarray, np.ndarray, float]]) -> dict[str, float]:
    d = np.array([p for p, _, _ in pairs])
    g = np.array([t for _, t, _ in pairs])
    iou = np.array([v for _, _, v in pairs])
    dw, dh = d[:, 2] - d[:, 0], d[:, 3] - d[:, 1]
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    log_w, log_h = np.log(dw / gw), np.log(dh / gh)
    dx = ((d[:, 0] + d[:, 2]) - (g[:, 0] + g[:, 2])) / 2 / gw
    dy = ((d[:, 1] + d[:, 3]) - (g[:, 1] + g[:, 3])) / 2 / gh
    r = lambda v: round(float(v), 4)
    return {"n_matched": len(pairs), "mean_iou": r(iou.mean()), "frac_iou_ge_0.5": r((iou >= 0.5).mean()),
            "frac_iou_ge_0.75": r((iou >= 0.75).mean()), "median_gt_width_px": r(np.median(gw)),
            "median_log_w_ratio": r(np.median(log_w)), "median_log_h_ratio": r(np.median(log_h)),
            "std_log_w_ratio": r(log_w.std()), "std_log_h_ratio": r(log_h.std()),
            "median_dx": r(np.median(dx)), "median_dy": r(np.median(dy)),
            "std_dx": r(dx.std()), "std_dy": r(dy.std())}


def resized(boxes: np.ndarray, sw: float, sh: float) -> np.ndarray:
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    w, h = (boxes[:, 2] - boxes[:, 0]) * sw, (boxes[:, 3] - boxes[:, 1]) * sh
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def scene_report(blocks: list, config, threshold: float) -> dict:
    from pipeline.evaluate.blocks import block_boxes
    from pipeline.evaluate.metrics import ImageDetections, coco_metrics

    gts, dets = block_boxes(blocks)
    pairs = [p for g, d in zip(gts, dets) for p in matched_pairs(g.boxes, d.boxes, d.scores, threshold)]
    if not pairs:
        return {"n_matched": 0}
    out = error_stats(pairs)
    base = coco_metrics(gts, dets, config.classes, config.evaluate.max_dets, (0.5,))
    sw, sh = np.exp(-out["median_log_w_ratio"]), np.exp(-out["median_log_h_ratio"])
    fixed = [ImageDetections(resized(d.boxes, sw, sh), d.labels, d.image_id, scores=d.scores) for d in dets]
    corrected = coco_metrics(gts, fixed, config.classes, config.evaluate.max_dets, (0.5,))
    for name, m in (("as_predicted", base), ("median_size_corrected", corrected)):
        out[name] = {k: round(float(m[k]), 4) for k in ("AP", "AP50", "AP75")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "neon-trees-cross-site.yaml"))
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--splits", default="val,test", help="Comma-separated tiling splits to score.")
    ap.add_argument("--set", "-s", action="append", default=[], help="Config override section.key=value.")
    args = ap.parse_args()

    from pipeline.tf_quiet import import_tensorflow

    import_tensorflow()
    from pipeline.config import load_config
    from pipeline.evaluate.run import evaluate_scenes
    from pipeline.predict.adapt import load_for_predict
    from pipeline.predict.exported import output_threshold, resolve_export_dir

    cfg = load_config(args.config, [f"runs_dir={args.runs_dir}", *args.set])
    model_dir, tiles_dir = cfg.run_dir / "model", cfg.run_dir / "tiles"
    detector = load_for_predict(resolve_export_dir(model_dir), cfg.predict)
    threshold = output_threshold(cfg.predict, detector.info)
    report = {"benchmark": "box_errors", "config": args.config, "overrides": args.set, "model": str(model_dir),
              "score_threshold": threshold, "adaptation": {"normalize": cfg.predict.normalize, "tta": cfg.predict.tta},
              "scenes": {}}
    for split in args.splits.split(","):
        split_cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"split": split})})
        blocks = evaluate_scenes(split_cfg, detector, tiles_dir)
        for scene in dict.fromkeys(b.scene for b in blocks):
            report["scenes"][f"{split}/{scene}"] = scene_report([b for b in blocks if b.scene == scene], cfg, threshold)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
