"""Multi-level anchor generator (NumPy at trace time: anchors are constants of the static image shape).

Level ``l`` has stride ``2**l``; its anchors are centred on the feature cells, ``((i + 0.5) * stride,
(j + 0.5) * stride)`` — the centre of the image region the cell covers, consistent with pixel edges at
integers and with the half-pixel ROIAlign. Each location carries ``len(scales) * len(aspect_ratios)``
anchors of area ``(size * scale)**2`` and ratio ``h / w``; flattening order is (row, column, anchor) so it
matches the RPN head's ``[B, h, w, A * k]`` output reshaped to ``[B, h * w * A, k]``.

Choosing sizes for small objects: the smallest anchor should be close to the smallest object you need
(e.g. 16 px for 15–80 px tree crowns, sizes 16, 32, 64, 128, 256 on P2–P6); extra scales per octave
(``anchor_scales_per_octave: 2`` adds size * 2**0.5) densify the size coverage between levels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def cell_anchors(size: float, aspect_ratios: Sequence[float], scales_per_octave: int = 1) -> np.ndarray:
    """The ``A`` anchors of one location, centred on 0: [A, 4] xyxy float32 (scale-major, ratio-minor)."""
    out = []
    for s in range(scales_per_octave):
        scaled = size * 2.0 ** (s / scales_per_octave)
        for ratio in aspect_ratios:
            h = scaled * np.sqrt(ratio)
            w = scaled / np.sqrt(ratio)
            out.append([-w / 2, -h / 2, w / 2, h / 2])
    return np.asarray(out, np.float32)


def level_anchors(feature_shape: tuple[int, int], stride: int, cell: np.ndarray) -> np.ndarray:
    """Anchors of one level: [h * w * A, 4] xyxy float32 for a feature map of ``feature_shape = (h, w)``."""
    h, w = feature_shape
    cy = (np.arange(h, dtype=np.float32) + 0.5) * stride
    cx = (np.arange(w, dtype=np.float32) + 0.5) * stride
    cy, cx = np.meshgrid(cy, cx, indexing="ij")
    centres = np.stack([cx, cy, cx, cy], axis=-1).reshape(h, w, 1, 4)
    return (centres + cell.reshape(1, 1, -1, 4)).reshape(-1, 4).astype(np.float32)


def num_anchors_per_location(aspect_ratios: Sequence[float], scales_per_octave: int = 1) -> int:
    """``A``: anchors at each feature location."""
    return len(aspect_ratios) * scales_per_octave


def multilevel_anchors(
    feature_shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    sizes: Sequence[float],
    aspect_ratios: Sequence[float],
    scales_per_octave: int = 1,
) -> list[np.ndarray]:
    """Anchors per level (finest first): a list of [h_l * w_l * A, 4] xyxy float32 arrays."""
    if not (len(feature_shapes) == len(strides) == len(sizes)):
        raise ValueError(f"need one size per level: {len(sizes)} sizes for {len(feature_shapes)} levels")
    return [
        level_anchors(shape, stride, cell_anchors(size, aspect_ratios, scales_per_octave))
        for shape, stride, size in zip(feature_shapes, strides, sizes)
    ]
