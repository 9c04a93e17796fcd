"""pipeline/evaluate/metrics.py: our wrapper agrees with pycocotools run directly."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.evaluate.metrics import ImageBoxes, ImageDetections, coco_metrics, voc_ap

CLASSES = ["tree", "car"]


def _random_set(seed: int, n_images: int = 5, n_per_image: int = 30):
    rng = np.random.default_rng(seed)
    gt, det = [], []
    for i in range(n_images):
        xy = rng.uniform(0, 300, (n_per_image, 2))
        wh = rng.uniform(8, 140, (n_per_image, 2))  # spans the small/medium/large buckets
        boxes = np.c_[xy, xy + wh]
        labels = rng.integers(1, 3, n_per_image)
        gt.append(ImageBoxes(boxes, labels, f"img{i}"))
        keep = rng.random(n_per_image) < 0.8
        jitter = rng.normal(0, 4, (n_per_image, 4))
        d_boxes = np.r_[boxes[keep] + jitter[keep], np.c_[xy[:5] + 50, xy[:5] + 80]]
        d_labels = np.r_[labels[keep], rng.integers(1, 3, 5)]
        d_labels[:2] = 3 - d_labels[:2]  # a couple of wrong classes
        det.append(ImageDetections(d_boxes, d_labels, f"img{i}", scores=rng.random(len(d_boxes))))
    return gt, det


def _direct(gt, det, max_dets):
    """pycocotools the documented way: dataset dict for GT, loadRes for detections."""
    images = [{"id": i + 1} for i in range(len(gt))]
    anns, results = [], []
    for i, g in enumerate(gt):
        for b, lab in zip(g.boxes, g.labels):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(lab),
                         "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0})
    for i, d in enumerate(det):
        for b, lab, s in zip(d.boxes, d.labels, d.scores):
            results.append({"image_id": i + 1, "category_id": int(lab),
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": images, "annotations": anns,
                        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]}
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_summary_at_100_dets_equals_pycocotools_stats():
    gt, det = _random_set(0)
    ours = coco_metrics(gt, det, CLASSES, max_dets=100)
    stats = _direct(gt, det, 100).stats
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    for j, name in enumerate(names):
        assert ours[name] == pytest.approx(stats[j], abs=1e-12), name
    assert ours["AR"] == pytest.approx(stats[8], abs=1e-12)
    assert 0.1 < ours["AP50"] < 1.0  # the synthetic set is neither trivial nor hopeless


def test_summary_uses_max_dets_not_stock_100():
    # 150 objects in one image, all detected: the stock summary (100 dets) caps recall at 2/3
    rng = np.random.default_rng(1)
    xy = np.stack(np.meshgrid(np.arange(15) * 40.0, np.arange(10) * 40.0), -1).reshape(-1, 2)
    boxes = np.c_[xy, xy + 30]
    gt = [ImageBoxes(boxes, np.ones(150))]
    det = [ImageDetections(boxes, np.ones(150), scores=rng.random(150))]
    ev = _direct(gt, det, 1000)
    direct_at_1000 = float(np.mean(ev.eval["precision"][:, :, :1, 0, 2]))
    ours = coco_metrics(gt, det, CLASSES[:1], max_dets=1000)
    assert ours["AP"] == pytest.approx(direct_at_1000)
    assert ours["AP"] == pytest.approx(1.0)
    assert ev.stats[0] == -1  # stock summarize looks for maxDets=100, which is not in [1, 10, 1000]
    assert coco_metrics(gt, det, CLASSES[:1], max_dets=100)["AP"] < 0.7


def test_per_class_ap_matches_pycocotools_precision_slice():
    gt, det = _random_set(2)
    ours = coco_metrics(gt, det, CLASSES, max_dets=100)
    prec = _direct(gt, det, 100).eval["precision"]
    for k, name in enumerate(CLASSES):
        expected = prec[:, :, k, 0, 2]
        assert ours["per_class"][name]["AP"] == pytest.approx(float(np.mean(expected[expected > -1])))
        assert ours["per_class"][name]["n_gt"] == sum(int((g.labels == k + 1).sum()) for g in gt)


def test_prf_at_best_threshold_hand_computed():
    gt = [ImageBoxes([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [1, 1, 1])]
    det = [ImageDetections([[0, 0, 10, 10], [60, 60, 70, 70], [20, 20, 30, 30], [41, 41, 52, 52]],
                           [1, 1, 1, 1], scores=[0.9, 0.8, 0.7, 0.2])]
    out = coco_metrics(gt, det, ["tree"], f1_ious=(0.5, 0.4))
    # ranks: TP, FP, TP, then the shifted box (IoU 81/140 = 0.58 -> TP at 0.5 and 0.4)
    # after 3: P=2/3 R=2/3 F1=.667; after 4: P=3/4 R=1 F1=.857 -> best at threshold 0.2
    for key in ("0.5", "0.4"):
        prf = out["prf"][key]
        assert prf["score_threshold"] == pytest.approx(0.2)
        assert (prf["tp"], prf["fp"], prf["fn"]) == (3, 1, 0)
        assert prf["f1"] == pytest.approx(2 * 0.75 / 1.75)


def test_voc_all_point_ap_hand_computed():
    gt = [ImageBoxes([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1])]
    # TP (0.9), duplicate of the same GT -> FP (0.8), TP (0.6)
    det = [ImageDetections([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], [1, 1, 1], scores=[0.9, 0.8, 0.6])]
    # recall 0.5 at precision 1, recall 1 at precision 2/3 -> AP = 0.5*1 + 0.5*2/3
    assert voc_ap(gt, det, 1) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert coco_metrics(gt, det, ["tree"])["VOC_AP50"] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_empty_inputs_do_not_crash():
    no_images = coco_metrics([], [], ["tree"])
    assert no_images["AP"] == -1 and no_images["n_images"] == 0
    gt = [ImageBoxes([[0, 0, 10, 10]], [1])]
    no_dets = coco_metrics(gt, [ImageDetections(np.zeros((0, 4)), [])], ["tree"])
    assert no_dets["AP"] == 0 and no_dets["AP50"] == 0 and no_dets["prf"]["0.5"]["recall"] == 0
    no_gt = coco_metrics([ImageBoxes(np.zeros((0, 4)), [])],
                         [ImageDetections([[0, 0, 5, 5]], [1], scores=[0.5])], ["tree"])
    assert no_gt["AP"] == -1 and no_gt["per_class"]["tree"]["VOC_AP50"] == -1


def test_bad_labels_are_rejected():
    with pytest.raises(ValueError, match="labels must be 1..1"):
        coco_metrics([ImageBoxes([[0, 0, 1, 1]], [0])], [ImageDetections(np.zeros((0, 4)), [])], ["tree"])
