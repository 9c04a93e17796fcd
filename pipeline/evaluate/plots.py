"""Evaluation figures (matplotlib, Agg backend): PR curves and example overlays on scene crops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.files import atomic_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: containers and CI have no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_pr_curves(metrics: dict[str, Any], path: Path) -> Path:
    """Precision-recall at IoU 0.5 (COCO 101-point interpolation): scene and tile means, scene per class."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    drawn = False
    for level, style in (("scene", "-"), ("tile", "--")):
        m = metrics.get(level)
        if not m or not m.get("pr_curve", {}).get("recall"):
            continue
        curve = m["pr_curve"]
        rec = np.asarray(curve["recall"])
        mean = np.asarray(curve["mean"])
        if (mean >= 0).any():
            ax.plot(rec, np.clip(mean, 0, None), style, lw=2, label=f"{level} (AP50 {m['AP50']:.3f})")
            drawn = True
        if level == "scene" and len(curve["per_class"]) > 1:
            for name, prec in curve["per_class"].items():
                ax.plot(rec, np.clip(prec, 0, None), ":", lw=1, label=f"scene: {name}")
    if not drawn:
        ax.text(0.5, 0.5, "no ground truth to draw a curve", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall, IoU 0.5")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="lower left", fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return path


def _display(data: np.ndarray) -> np.ndarray:
    """(C, H, W) of any dtype → (H, W, 3) float in [0, 1], stretched per band at the 2–98th percentiles."""
    img = np.moveaxis(data[:3] if data.shape[0] >= 3 else np.repeat(data[:1], 3, 0), 0, -1).astype(np.float32)
    lo = np.percentile(img, 2, axis=(0, 1))
    hi = np.percentile(img, 98, axis=(0, 1))
    return np.clip((img - lo) / np.maximum(hi - lo, 1e-6), 0, 1)


def _crops(blocks: list[Any], size: int, n: int) -> list[tuple[Any, tuple[int, int, int, int]]]:
    """Up to n crops (block, window): in each block, centred on the block's ground-truth centroid."""
    out = []
    for b in sorted(blocks, key=lambda b: -len(b.gt_boxes))[:n]:
        c, r, w, h = b.window
        cw, ch = min(size, w), min(size, h)
        if len(b.gt_boxes):
            cx, cy = np.median((b.gt_boxes[:, :2] + b.gt_boxes[:, 2:]) / 2, axis=0)
        else:
            cx, cy = c + w / 2, r + h / 2
        x0 = int(np.clip(cx - cw / 2, c, c + w - cw))
        y0 = int(np.clip(cy - ch / 2, r, r + h - ch))
        out.append((b, (x0, y0, cw, ch)))
    return out


def plot_examples(blocks: list[Any], config: Config, path: Path, score_threshold: float, size: int = 400) -> Path:
    """Scene crops with ground truth (red) and detections at `score_threshold` (green)."""
    from matplotlib.patches import Rectangle
    from rasterio.windows import Window

    from pipeline.geo.raster import open_raster

    plt = _pyplot()
    crops = _crops(blocks, size, max(config.evaluate.examples, 1))
    cols = max(1, min(2, len(crops)))
    rows = max(1, int(np.ceil(len(crops) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 5 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if not crops:
        axes[0, 0].text(0.5, 0.5, "no evaluated scene blocks", ha="center", va="center")
    for ax, (b, (x0, y0, w, h)) in zip(axes.ravel(), crops):
        with open_raster(b.image) as ds:
            ax.imshow(_display(ds.read(window=Window(x0, y0, w, h))), extent=(x0, x0 + w, y0 + h, y0))
        for box in b.gt_boxes:
            ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, ec="red", lw=1.2))
        d = b.detections
        keep = d.scores >= score_threshold
        for box in d.boxes[keep]:
            ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, ec="lime", lw=1.0))
        ax.set_xlim(x0, x0 + w)
        ax.set_ylim(y0 + h, y0)
        ax.set_title(f"{b.scene}\n@ ({x0}, {y0}): {int(keep.sum())} det, {len(b.gt_boxes)} GT", fontsize=8)  # long names wrap
    fig.suptitle(f"green: detections (score ≥ {score_threshold:.2f}), red: ground truth", fontsize=10)
    _save(fig, path)
    plt.close(fig)
    return path
