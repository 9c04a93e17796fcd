"""A PNG grid of what the model sees: augmented, normalised training images, de-normalised for display,
with their (augmented) boxes drawn."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.stats import denormalize, load_stats
from pipeline.files import atomic_path


def _display(image: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """Normalised (H, W, C) → RGB (or grey) in [0, 1]: raw scale, then each band stretched over its clip range."""
    raw = denormalize(image, stats)
    low, high = np.asarray(stats["low"], np.float32), np.asarray(stats["high"], np.float32)
    unit = np.clip((raw - low) / np.maximum(high - low, 1e-12), 0, 1)
    if unit.shape[-1] >= 3:
        return unit[..., :3]  # the first three bands (RGB for RGB tiles; e.g. RGB of RGBN)
    return np.repeat(unit[..., :1], 3, axis=-1)


def write_preview(config: Any, tiles_dir: str | Path, n: int = 16, split: str = "train",
                  out: str | Path | None = None) -> Path:
    """Draw `n` images of `split` (augmented when split is train) with boxes; write tiles_dir/preview.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from pipeline.data.dataset import build_dataset
    from pipeline.data.explain import checked_iter

    tiles_dir = Path(tiles_dir)
    out = Path(out) if out is not None else tiles_dir / "preview.png"
    stats = load_stats(tiles_dir)
    training = split == "train"
    ds = build_dataset(tiles_dir, split, config, training=training, batch_size=1, with_ids=True).take(n)
    samples = [(images[0].numpy(), {k: v[0].numpy() for k, v in t.items()})
               for images, t in checked_iter(ds, tiles_dir, split)]
    cols = max(1, math.ceil(math.sqrt(len(samples))))
    rows = max(1, math.ceil(len(samples) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    classes = list(config.classes)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (image, t) in zip(axes.ravel(), samples):
        ax.imshow(_display(image, stats), interpolation="nearest")
        k = int(t["num_boxes"])
        for (x0, y0, x1, y1), label in zip(t["boxes"][:k], t["labels"][:k]):
            colour = colours((int(label) - 1) % 10)
            # pixel edges sit at integers; imshow puts pixel centres there, hence the half-pixel shift
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.2, ec=colour))
        tile_id = t["tile_id"].decode()
        tile_id = tile_id if len(tile_id) <= 32 else "…" + tile_id[-31:]  # long scene names overlap their neighbours
        ax.set_title(f"{tile_id} ({k} boxes)", fontsize=7)
    legend = ", ".join(f"{i}={name}" for i, name in enumerate(classes, 1))
    fig.suptitle(f"{split}{' (augmented)' if training else ''}: classes {legend}", fontsize=9)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out
