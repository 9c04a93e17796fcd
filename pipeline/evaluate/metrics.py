"""Detection metrics on pixel boxes: COCO (pycocotools) and VOC, plus P/R/F1 at the best-F1 score threshold.

    coco_metrics(gt, det, class_names, max_dets=1000) -> dict

Inputs are per-image lists (same order, same length): `ImageBoxes` (ground truth) and `ImageDetections`,
boxes float ``x0, y0, x1, y1`` in pixels (pixel edges at integers), labels 1-based in `class_names` order.

What the numbers mean
- ``AP`` (AP@[.5:.95]), ``AP50``, ``AP75``, ``APs``/``APm``/``APl`` (size buckets by ground-truth area in
  px²: small < 32², medium < 96², large ≥ 96²) and ``AR`` are pycocotools' numbers, but the summary is read
  from ``eval['precision']`` at ``max_dets`` (the stock ``summarize()`` always uses 100, far too few for
  dense scenes). ``max_dets`` is per image *and class*, as in pycocotools.
- ``per_class[name]``: AP, AP50, AP75, n_gt, n_det.
- ``VOC_AP50``: Pascal VOC (2010+) all-point interpolated AP at IoU 0.5 with VOC's matching (a detection
  takes its highest-IoU ground truth; if that one is already taken it is a false positive), averaged over
  classes with ground truth. Continuous pixel edges: no "+1" in widths.
- ``prf["0.5"]``, ``prf["0.4"]`` (keys from `f1_ious`): precision, recall, F1, tp, fp, fn at the score
  threshold that maximises F1 over all classes pooled (pycocotools matching at that IoU).
- ``pr_curve``: COCO's interpolated precision at 101 recall points (IoU 0.5, all sizes), per class and mean.

Undefined values are -1, as in pycocotools: an AP with no ground truth (in that class / size bucket /
the whole set) is -1. With ground truth but no detections every AP, precision, recall and F1 is 0.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.predict.iou import iou_matrix, iou_one_to_many

AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0, 1e5**2),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e5**2),
}
COCO_IOUS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)  # as pycocotools


@dataclass
class ImageBoxes:
    """Ground truth of one image: boxes (N, 4) xyxy pixels, labels (N,) 1-based."""

    boxes: np.ndarray
    labels: np.ndarray
    image_id: str = ""

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, np.float64).reshape(-1, 4)
        self.labels = np.asarray(self.labels, np.int64).reshape(-1)
        if len(self.boxes) != len(self.labels):
            raise ValueError(f"image {self.image_id!r}: {len(self.boxes)} boxes but {len(self.labels)} labels")


@dataclass
class ImageDetections(ImageBoxes):
    """Detections of one image: boxes, labels and scores (N,)."""

    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scores = np.asarray(self.scores, np.float64).reshape(-1)
        if len(self.scores) != len(self.boxes):
            raise ValueError(f"image {self.image_id!r}: {len(self.boxes)} boxes but {len(self.scores)} scores")


def _xywh(boxes: np.ndarray) -> np.ndarray:
    out = boxes.copy()
    out[:, 2:] = boxes[:, 2:] - boxes[:, :2]
    return out


def to_coco(gt: list[ImageBoxes], det: list[ImageDetections], class_names: list[str]) -> tuple[Any, Any]:
    """Build pycocotools `COCO` objects (ground truth, detections) from per-image pixel boxes.

    Ids start at 1: pycocotools stores the matched id in its match arrays and reads 0 as "unmatched".
    """
    from pycocotools.coco import COCO

    images = [{"id": i + 1, "file_name": g.image_id or str(i + 1)} for i, g in enumerate(gt)]
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(class_names)]

    def anns(items: list[Any], with_scores: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i, item in enumerate(items):
            xywh = _xywh(item.boxes)
            for j in range(len(xywh)):
                x, y, w, h = (float(v) for v in xywh[j])
                a = {"id": len(out) + 1, "image_id": i + 1, "category_id": int(item.labels[j]),
                     "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
                if with_scores:
                    a["score"] = float(item.scores[j])
                out.append(a)
        return out

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "categories": categories, "annotations": anns(gt, False)}
        coco_gt.createIndex()
        coco_dt = COCO()
        coco_dt.dataset = {"images": images, "categories": categories, "annotations": anns(det, True)}
        coco_dt.createIndex()
    return coco_gt, coco_dt


def _mean_valid(values: np.ndarray) -> float:
    v = values[values > -1]
    return float(np.mean(v)) if v.size else -1.0


def _check(gt: list[ImageBoxes], det: list[ImageDetections], class_names: list[str]) -> None:
    if len(gt) != len(det):
        raise ValueError(f"{len(gt)} ground-truth images but {len(det)} detection images")
    k = len(class_names)
    for item in [*gt, *det]:
        if item.labels.size and (item.labels.min() < 1 or item.labels.max() > k):
            raise ValueError(f"image {item.image_id!r}: labels must be 1..{k}, got {sorted(set(item.labels))}")


def _prf_at_best_f1(evaluator: Any, t: int, n_images: int, n_classes: int) -> dict[str, float]:
    """Pool pycocotools' matches at IoU index `t` (area 'all') and pick the score threshold maximising F1."""
    scores, tps, n_gt = [], [], 0
    for k in range(n_classes):
        for i in range(n_images):
            e = evaluator.evalImgs[k * len(AREA_RANGES) * n_images + i]  # area index 0 = 'all'
            if e is None:
                continue
            n_gt += int(np.count_nonzero(e["gtIgnore"] == 0))
            keep = ~e["dtIgnore"][t].astype(bool)
            scores.append(np.asarray(e["dtScores"])[keep])
            tps.append(e["dtMatches"][t][keep] > 0)
    s = np.concatenate(scores) if scores else np.zeros(0)
    tp = np.concatenate(tps) if tps else np.zeros(0, bool)
    order = np.argsort(-s, kind="mergesort")
    return operating_point(s[order], tp[order], n_gt)


def operating_point(scores: np.ndarray, tp: np.ndarray, n_gt: int, min_precision: float | None = None
                    ) -> dict[str, float] | None:
    """P/R/F1 at one score threshold of a ranked list (`scores` descending, `tp` whether each detection is
    a true positive, as `ranked_matches` gives): the threshold that maximises F1, or with `min_precision`
    the one with the most recall at precision >= it (None when no threshold reaches it)."""
    if n_gt == 0:
        return {"precision": -1.0, "recall": -1.0, "f1": -1.0, "score_threshold": -1.0,
                "tp": 0, "fp": len(scores), "fn": 0}
    if len(scores) == 0:
        return None if min_precision is not None else {
            "precision": 0.0, "recall": 0.0, "f1": 0.0, "score_threshold": -1.0, "tp": 0, "fp": 0, "fn": n_gt}
    ctp = np.cumsum(tp)
    cfp = np.cumsum(~tp)
    # Only cut between distinct scores: a threshold keeps every detection with score >= it.
    last = np.r_[scores[1:] != scores[:-1], True]
    prec = ctp / (ctp + cfp)
    rec = ctp / n_gt
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)
    if min_precision is None:
        b = int(np.argmax(np.where(last, f1, -1.0)))
    else:
        ok = np.flatnonzero(last & (prec >= min_precision) & (ctp > 0))
        if not len(ok):
            return None
        b = int(ok[-1])  # recall only grows down the list: the last cut that keeps the precision
    return {"precision": float(prec[b]), "recall": float(rec[b]), "f1": float(max(f1[b], 0.0)),
            "score_threshold": float(scores[b]), "tp": int(ctp[b]), "fp": int(cfp[b]), "fn": int(n_gt - ctp[b])}


def ranked_matches(gt: list[ImageBoxes], det: list[ImageDetections], iou: float = 0.5
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """Every detection, pooled over images and classes by descending score, with whether it is a true
    positive at `iou`, and the number of ground-truth boxes. Matching is pycocotools': per image, in
    descending score order, each detection takes the best-overlapping unmatched ground truth of its class.
    A detection's match depends only on those scoring above it, so cutting this one list at a threshold
    gives the matches of that threshold."""
    scores, tps = [], []
    for g, d in zip(gt, det):
        order = np.argsort(-d.scores, kind="stable")
        boxes, labels = d.boxes[order], d.labels[order]
        taken = np.zeros(len(g.boxes), bool)
        ious = iou_matrix(boxes, g.boxes) if len(boxes) and len(g.boxes) else np.zeros((len(boxes), 0))
        hit = np.zeros(len(order), bool)
        for i in range(len(order)):
            cand = np.where((~taken) & (g.labels == labels[i]), ious[i], -1.0) if ious.shape[1] else ious[i]
            j = int(np.argmax(cand)) if len(cand) else -1
            if j >= 0 and cand[j] >= iou:
                taken[j] = hit[i] = True
        scores.append(d.scores[order])
        tps.append(hit)
    s = np.concatenate(scores) if scores else np.zeros(0)
    tp = np.concatenate(tps) if tps else np.zeros(0, bool)
    order = np.argsort(-s, kind="mergesort")
    return s[order], tp[order], sum(len(g.boxes) for g in gt)


def prf_at_threshold(gt: list[ImageBoxes], det: list[ImageDetections], threshold: float, iou: float = 0.5
                     ) -> dict[str, float]:
    """Precision / recall / F1 of the detections scoring >= `threshold` (all classes, matched as
    `ranked_matches`). Precision is -1 when nothing passes the threshold, recall -1 when there is no
    ground truth."""
    scores, hit, n_gt = ranked_matches(gt, det, iou)
    kept = hit[scores >= threshold]
    tp, fp = int(kept.sum()), int(len(kept) - kept.sum())
    precision = tp / (tp + fp) if tp + fp else -1.0
    recall = tp / n_gt if n_gt else -1.0
    f1 = 2 * precision * recall / (precision + recall) if precision > 0 and recall > 0 else 0.0
    return {"score_threshold": float(threshold), "precision": float(precision), "recall": float(recall),
            "f1": float(f1), "tp": tp, "fp": fp, "fn": n_gt - tp}


def voc_ap(gt: list[ImageBoxes], det: list[ImageDetections], label: int, iou: float = 0.5) -> float:
    """Pascal VOC all-point interpolated AP for one class (-1 when the class has no ground truth)."""
    n_gt = sum(int(np.count_nonzero(g.labels == label)) for g in gt)
    if n_gt == 0:
        return -1.0
    entries = []  # (score, image index, box)
    for i, d in enumerate(det):
        for j in np.flatnonzero(d.labels == label):
            entries.append((d.scores[j], i, d.boxes[j]))
    if not entries:
        return 0.0
    entries.sort(key=lambda e: -e[0])
    taken = {i: np.zeros(int(np.count_nonzero(g.labels == label)), bool) for i, g in enumerate(gt)}
    gt_boxes = {i: g.boxes[g.labels == label] for i, g in enumerate(gt)}
    tp = np.zeros(len(entries))
    for n, (_, i, box) in enumerate(entries):
        if len(gt_boxes[i]) == 0:
            continue
        ious = iou_one_to_many(box, gt_boxes[i])
        j = int(np.argmax(ious))
        if ious[j] >= iou and not taken[i][j]:  # VOC: best GT already taken -> false positive
            taken[i][j] = True
            tp[n] = 1
    ctp = np.cumsum(tp)
    rec = ctp / n_gt
    prec = ctp / np.arange(1, len(tp) + 1)
    mrec = np.r_[0.0, rec, 1.0]
    mpre = np.r_[0.0, prec, 0.0]
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    idx = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def run_cocoeval(
    gt: list[ImageBoxes], det: list[ImageDetections], class_names: list[str], max_dets: int = 1000,
    extra_ious: tuple[float, ...] = (),
) -> Any:
    """Run pycocotools' evaluate + accumulate with maxDets [1, 10, 100, max_dets] and extra IoU thresholds.

    Extra thresholds are appended after the ten COCO ones; pycocotools treats each threshold on its own, so
    the COCO numbers are unchanged by them.
    """
    from pycocotools.cocoeval import COCOeval

    coco_gt, coco_dt = to_coco(gt, det, class_names)
    ev = COCOeval(coco_gt, coco_dt, "bbox")
    extra = [t for t in extra_ious if not np.any(np.isclose(COCO_IOUS, t))]
    ev.params.iouThrs = np.r_[COCO_IOUS, np.asarray(extra, float)]
    ev.params.maxDets = sorted({1, 10, 100, int(max_dets)})
    ev.params.areaRng = [list(r) for r in AREA_RANGES.values()]
    ev.params.areaRngLbl = list(AREA_RANGES)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    return ev


_SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR", "ARs", "ARm", "ARl")


def coco_metrics(
    gt: list[ImageBoxes],
    det: list[ImageDetections],
    class_names: list[str],
    max_dets: int = 1000,
    f1_ious: tuple[float, ...] = (0.5, 0.4),
) -> dict[str, Any]:
    """All detection metrics for per-image pixel boxes (see the module docstring for definitions)."""
    _check(gt, det, class_names)
    counts = _counts(gt, det, max_dets)
    if not gt:
        return _undefined_metrics(class_names, f1_ious, counts)
    ev = run_cocoeval(gt, det, class_names, max_dets, tuple(f1_ious))
    acc = _Accumulated(ev, max_dets)
    out = _summary(acc)
    per_class = _per_class(acc, gt, det, class_names)
    out["VOC_AP50"] = _mean_valid(np.asarray([c["VOC_AP50"] for c in per_class.values()]))
    out.update(counts)
    out["per_class"] = per_class
    out["prf"] = {f"{t:g}": _prf_at_best_f1(ev, acc.t_index(t), len(gt), len(class_names)) for t in f1_ious}
    out["pr_curve"] = _pr_curve(acc, class_names, per_class)
    return out


class _Accumulated:
    """pycocotools' accumulated precision [T,R,K,A,M] and recall [T,K,A,M], read at `max_dets`."""

    def __init__(self, ev: Any, max_dets: int) -> None:
        self.precision, self.recall = ev.eval["precision"], ev.eval["recall"]
        self.ious = np.asarray(ev.params.iouThrs)
        self.recall_points = np.asarray(ev.params.recThrs)
        self.m = ev.params.maxDets.index(int(max_dets))
        self.coco_t = np.arange(len(COCO_IOUS))

    def t_index(self, value: float) -> int:
        """Index of IoU threshold `value` (one of the COCO ten or an extra one)."""
        return int(np.flatnonzero(np.isclose(self.ious, value))[0])

    def ap(self, a: int = 0, t: Any = None, k: Any = slice(None)) -> float:
        """Mean precision over IoU thresholds `t` (None: the COCO ten), area index `a`, classes `k`."""
        t = self.coco_t if t is None else t
        return _mean_valid(self.precision[t][:, :, k, a, self.m])

    def ar(self, a: int = 0) -> float:
        """Mean recall over the COCO IoU thresholds at area index `a`."""
        return _mean_valid(self.recall[self.coco_t][:, :, a, self.m])


def _counts(gt: list[ImageBoxes], det: list[ImageDetections], max_dets: int) -> dict[str, Any]:
    return {"max_dets": int(max_dets), "n_images": len(gt), "n_gt": int(sum(len(g.labels) for g in gt)),
            "n_det": int(sum(len(d.labels) for d in det)),
            "area_ranges_px2": {k: list(v) for k, v in AREA_RANGES.items()}}


def _undefined_metrics(class_names: list[str], f1_ious: tuple[float, ...], counts: dict[str, Any]
                       ) -> dict[str, Any]:
    """The metrics of no images: every value undefined (-1), as pycocotools has it."""
    undefined = {k: -1.0 for k in _SUMMARY_KEYS}
    per_class = {n: {"AP": -1.0, "AP50": -1.0, "AP75": -1.0, "VOC_AP50": -1.0, "n_gt": 0, "n_det": 0}
                 for n in class_names}
    prf = {f"{t:g}": _prf_at_best_f1_empty() for t in f1_ious}
    return {**undefined, "VOC_AP50": -1.0, **counts, "per_class": per_class, "prf": prf,
            "pr_curve": {"iou": 0.5, "recall": [], "mean": [], "per_class": {}}}


def _summary(acc: _Accumulated) -> dict[str, Any]:
    """AP@[.5:.95], AP50, AP75, AP per size bucket, AR and AR per size bucket."""
    t50, t75 = [acc.t_index(0.5)], [acc.t_index(0.75)]
    return {
        "AP": acc.ap(), "AP50": acc.ap(t=t50), "AP75": acc.ap(t=t75),
        "APs": acc.ap(1), "APm": acc.ap(2), "APl": acc.ap(3),
        "AR": acc.ar(), "ARs": acc.ar(1), "ARm": acc.ar(2), "ARl": acc.ar(3),
    }


def _per_class(acc: _Accumulated, gt: list[ImageBoxes], det: list[ImageDetections], class_names: list[str]
               ) -> dict[str, dict[str, Any]]:
    """Per class: COCO AP, AP50, AP75, VOC AP50 and the ground-truth and detection counts."""
    t50, t75 = [acc.t_index(0.5)], [acc.t_index(0.75)]
    return {
        name: {
            "AP": acc.ap(k=[k]), "AP50": acc.ap(t=t50, k=[k]), "AP75": acc.ap(t=t75, k=[k]),
            "VOC_AP50": voc_ap(gt, det, k + 1),
            "n_gt": int(sum(np.count_nonzero(g.labels == k + 1) for g in gt)),
            "n_det": int(sum(np.count_nonzero(d.labels == k + 1) for d in det)),
        }
        for k, name in enumerate(class_names)
    }


def _pr_curve(acc: _Accumulated, class_names: list[str], per_class: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """COCO's interpolated precision at the 101 recall points (IoU 0.5, all sizes): per class with ground
    truth, and the mean over the classes defined at each point."""
    t50 = acc.t_index(0.5)
    curves = {name: acc.precision[t50, :, k, 0, acc.m].tolist() for k, name in enumerate(class_names)
              if per_class[name]["n_gt"] > 0}
    pr = acc.precision[t50, :, :, 0, acc.m]
    valid = pr > -1
    mean_curve = np.where(valid.any(1), np.where(valid, pr, 0).sum(1) / np.maximum(valid.sum(1), 1), -1.0)
    return {"iou": 0.5, "recall": acc.recall_points.round(4).tolist(), "mean": mean_curve.tolist(),
            "per_class": curves}


def _prf_at_best_f1_empty() -> dict[str, float]:
    return {"precision": -1.0, "recall": -1.0, "f1": -1.0, "score_threshold": -1.0, "tp": 0, "fp": 0, "fn": 0}
