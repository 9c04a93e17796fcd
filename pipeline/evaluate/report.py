"""eval/report.md: the metrics of one evaluation as a human-readable markdown page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.files import atomic_write_text


def _f(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "n/a" if v < 0 else f"{v:.3f}"
    return str(v)


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table: the header, its rule, one line per row (cells as given)."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def _summary_rows(metrics: dict[str, Any]) -> list[str]:
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR", "VOC_AP50", "n_gt", "n_det"]
    scene, tile = metrics.get("scene") or {}, metrics.get("tile") or {}
    return _table(["metric", "scene", "tile"], [[k, _f(scene.get(k)), _f(tile.get(k))] for k in keys])


def _prf_rows(m: dict[str, Any]) -> list[str]:
    return _table(["IoU", "score threshold", "precision", "recall", "F1", "TP", "FP", "FN"],
                  [[iou, _f(p["score_threshold"]), _f(p["precision"]), _f(p["recall"]), _f(p["f1"]),
                    p["tp"], p["fp"], p["fn"]] for iou, p in (m.get("prf") or {}).items()])


def _class_rows(m: dict[str, Any]) -> list[str]:
    return _table(["class", "AP", "AP50", "AP75", "VOC AP50", "GT", "detections"],
                  [[name, _f(c["AP"]), _f(c["AP50"]), _f(c["AP75"]), _f(c["VOC_AP50"]), c["n_gt"], c["n_det"]]
                   for name, c in (m.get("per_class") or {}).items()])


def _scene_rows(metrics: dict[str, Any]) -> list[str]:
    """One row per evaluated scene, then the pooled figures: AP, AP50, AP75, P/R/F1 at best F1 per IoU."""
    per_scene = metrics.get("per_scene") or {}
    ious = sorted({iou for m in per_scene.values() for iou in (m.get("prf") or {})}, key=float, reverse=True)
    head = "| scene | GT | AP | AP50 | AP75 | " + " | ".join(f"P/R/F1 @{iou}" for iou in ious) + " | P/R @0.5, output threshold |"
    rows = [head, "|" + "---|" * (6 + len(ious))]
    pooled = metrics.get("scene")
    items = list(per_scene.items()) + ([("**pooled**", pooled)] if pooled and len(per_scene) > 1 else [])
    for name, m in items:
        prf = [f"{_f(m['prf'][i]['precision'])}/{_f(m['prf'][i]['recall'])}/{_f(m['prf'][i]['f1'])}"
               if i in (m.get("prf") or {}) else "—" for i in ious]
        out = (m.get("at_output_threshold") or {}).get("0.5")
        at_out = f"{_f(out['precision'])}/{_f(out['recall'])}" if out else "—"
        rows.append(f"| {name} | {m['n_gt']} | {_f(m['AP'])} | {_f(m['AP50'])} | {_f(m['AP75'])} | "
                    + " | ".join(prf) + f" | {at_out} |")
    return rows


def render_report(metrics: dict[str, Any], config: Config) -> str:
    """The markdown text of report.md."""
    lines = [
        f"# Evaluation: {config.name}",
        "",
        (f"Split **{metrics['split']}**: {metrics['n_scenes']} scene(s), {metrics['n_blocks']} block(s) "
        f"predicted whole (scene level); {metrics['n_tiles']} tile(s) (tile level). Model: `{metrics['model']}`."),
        "",
        ("Scene level is what `satdet predict` delivers: windows with overlap, seam rule, nodata suppression and "
        f"{config.predict.merge.upper()} merge (IoU {config.predict.merge_iou}). COCO numbers are pycocotools' "
        f"at maxDets={config.evaluate.max_dets} per image (block or tile) and class; size buckets by "
        "ground-truth area in px² (small < 32², medium < 96², large ≥ 96²); n/a = no ground truth there."),
        "",
        _adaptation_line(metrics),
        "",
        "## Summary",
        "",
        *_summary_rows(metrics),
        "",
    ]
    if metrics.get("per_scene"):
        intro = ("Scene level, each scene on its own (P/R/F1 at the score threshold that maximises F1, and at the "
                 f"output threshold {metrics['output_score_threshold']}):")
        lines += ["## Per scene", "", intro, "", *_scene_rows(metrics), ""]
    for level in ("scene", "tile"):
        m = metrics.get(level)
        if not m:
            lines += [f"## {level.capitalize()} level", "", "Not available (nothing to score).", ""]
            continue
        lines += [
            f"## {level.capitalize()} level",
            "",
            "Precision / recall / F1 at the score threshold that maximises F1 (all classes pooled):",
            "",
            *_prf_rows(m),
            "",
            "Per class:",
            "",
            *_class_rows(m),
            "",
        ]
    lines += [
        "## Figures",
        "",
        "![precision-recall](pr_curve.png)",
        "",
        "![examples: detections green, ground truth red](examples.png)",
        "",
        f"Scene detections with score ≥ {metrics['output_score_threshold']}: `detections.geojson` (EPSG:4326).",
        "",
    ]
    return "\n".join(lines)


def _adaptation_line(metrics: dict[str, Any]) -> str:
    a = metrics.get("adaptation") or {}
    return (f"Test-time adaptation: normalisation `{a.get('normalize', 'train')}`, AdaBN "
            f"`{a.get('adapt_bn', False)}`, flips `{a.get('tta', False)}`, resolution matching "
            f"`{a.get('match_resolution', False)}` (see docs/predict.md).")


def write_report(metrics: dict[str, Any], config: Config, path: Path) -> Path:
    """Write report.md atomically."""
    return atomic_write_text(path, render_report(metrics, config))
