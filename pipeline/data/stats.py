"""Per-band normalisation from tiles/stats.json — the one definition used by tf.data and the exported model.

    x_norm = (clip(x, low, high) - mean) / std

`low`/`high` are per-band percentiles of the training pixels; `mean`/`std` are measured on the clipped
training pixels (written by the tiling stage). A band with std 0 (constant) is divided by 1 instead.

Nodata: float tiles carry their nodata pixels as NaN; for float dtypes a non-finite pixel is replaced by
the band's `mean` before clipping, so it normalises to exactly 0 and never reaches the model
(`fill_nonfinite`). Integer pixels are always finite and pass unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import SatdetError

STATS_FILE = "stats.json"
_PER_BAND = ("low", "high", "mean", "std")


def load_stats(tiles_dir: str | Path) -> dict[str, Any]:
    """Read and validate `tiles_dir/stats.json`; a missing or malformed file is a SatdetError."""
    path = Path(tiles_dir) / STATS_FILE
    if not path.is_file():
        raise SatdetError(f"{path}: not found; run the tiling stage first (satdet tile CONFIG)")
    try:
        stats = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SatdetError(f"{path}: not valid JSON ({err.__class__.__name__}); re-run the tiling stage") from None
    validate_stats(stats, str(path))
    return stats


def validate_stats(stats: Any, source: str = "stats") -> None:
    """Check the fields `normalize` and the decoders rely on; raise SatdetError naming `source`."""
    if not isinstance(stats, dict):
        raise SatdetError(f"{source}: top level must be an object; re-run the tiling stage")
    missing = [k for k in ("dtype", "channels", *_PER_BAND) if k not in stats]
    if missing:
        raise SatdetError(f"{source}: missing keys {missing}; re-run the tiling stage")
    try:
        np.dtype(stats["dtype"])
    except TypeError:
        raise SatdetError(f"{source}: unknown dtype {stats['dtype']!r}; re-run the tiling stage") from None
    channels = stats["channels"]
    if not isinstance(channels, int) or channels < 1:
        raise SatdetError(f"{source}: channels must be a positive integer, got {channels!r}")
    for key in _PER_BAND:
        values = stats[key]
        if not isinstance(values, list) or len(values) != channels:
            raise SatdetError(f"{source}: {key!r} must be a list of {channels} numbers (one per band), got {values!r}")
        if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in values):
            raise SatdetError(f"{source}: {key!r} must hold finite numbers, got {values!r}")
    if any(h < lo for lo, h in zip(stats["low"], stats["high"])):
        raise SatdetError(f"{source}: 'high' must be >= 'low' for every band; re-run the tiling stage")
    if any(s < 0 for s in stats["std"]):
        raise SatdetError(f"{source}: 'std' must be >= 0 for every band")


def scene_stats_of(stats: dict[str, Any], scene: str, source: str = "stats") -> dict[str, Any]:
    """`stats` with the per-band numbers of training scene `scene` (stats.json `scenes`, written by tiling)
    in place of the pooled ones: what `data.normalize: scene` normalises that scene's tiles with."""
    own = (stats.get("scenes") or {}).get(scene)
    if own is None:
        raise SatdetError(f"{source}: no statistics of scene {scene!r} (tiles written before data.normalize: scene "
                          "existed?); re-run the tiling stage, or set data.normalize: global")
    merged = {**stats, **{k: own[k] for k in _PER_BAND}}
    validate_stats(merged, f"{source} (scene {scene!r})")
    return merged


def _constants(stats: dict[str, Any]) -> tuple[np.ndarray, ...]:
    low, high, mean, std = (np.asarray(stats[k], np.float32) for k in _PER_BAND)
    std = np.where(std > 0, std, np.float32(1.0))  # a constant band would divide by zero
    return low, high, mean, std


def _floating(stats: dict[str, Any]) -> bool:
    """Whether the tiles' pixels are floats (the only ones that can hold NaN nodata)."""
    return np.dtype(str(stats.get("dtype", "float32"))).kind == "f"


def fill_value(stats: dict[str, Any]) -> np.ndarray:
    """Per-band raw value that nodata pixels take (the training mean: 0 after normalisation), float32."""
    return np.asarray(stats["mean"], np.float32)


def fill_nonfinite(images: Any, stats: dict[str, Any]) -> Any:
    """TF: replace NaN/inf pixels (..., C) of float images by the band mean (`fill_value`); others unchanged."""
    import tensorflow as tf

    if not images.dtype.is_floating:
        return images
    fill = tf.cast(fill_value(stats), images.dtype)
    return tf.where(tf.math.is_finite(images), images, fill)


def fill_nonfinite_numpy(images: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """NumPy twin of `fill_nonfinite` (a copy only when something is replaced)."""
    if images.dtype.kind != "f":
        return images
    bad = ~np.isfinite(images)
    if not bad.any():
        return images
    return np.where(bad, fill_value(stats).astype(images.dtype), images)


def normalize(images: Any, stats: dict[str, Any]) -> Any:
    """Normalise raw pixels (..., C) of any numeric dtype to float32: (clip(x, low, high) - mean) / std.

    Pure TF with the per-band numbers baked in as constants, so it runs inside tf.data, in a
    tf.function, and inside an exported SavedModel.
    """
    import tensorflow as tf

    low, high, mean, std = _constants(stats)
    x = tf.cast(images, tf.float32)
    if _floating(stats):
        x = tf.where(tf.math.is_finite(x), x, mean)  # nodata (NaN) -> the band mean -> 0
    x = tf.clip_by_value(x, low, high)
    return (x - mean) / std


def denormalize(images: Any, stats: dict[str, Any]) -> np.ndarray:
    """NumPy inverse of `normalize` (up to the clip): back to the raw pixel scale, float32 — for display."""
    _, _, mean, std = _constants(stats)
    return np.asarray(images, np.float32) * std + mean


def normalize_numpy(images: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """NumPy twin of `normalize` (for tools and reference checks)."""
    low, high, mean, std = _constants(stats)
    x = np.asarray(images, np.float32)
    if _floating(stats):
        x = np.where(np.isfinite(x), x, mean)  # nodata (NaN) -> the band mean -> 0
    return (np.clip(x, low, high) - mean) / std


def numpy_normalizer(stats: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """A fast NumPy `normalize` for one (H, W, C) image, used inside the augmentation numpy_function.

    Same formula and float32 arithmetic as `normalize`. For uint8 it is a per-band 256-entry lookup
    table built with `normalize_numpy` and applied with cv2.LUT: one pass instead of five elementwise
    TF ops.
    """
    channels = int(stats["channels"])
    if np.dtype(stats["dtype"]) == np.uint8:
        import cv2

        table = normalize_numpy(np.repeat(np.arange(256, dtype=np.uint8)[:, None], channels, 1), stats)
        lut = np.ascontiguousarray(table[:, 0] if channels == 1 else table.reshape(1, 256, channels))

        def from_uint8(image: np.ndarray) -> np.ndarray:
            if image.dtype != np.uint8:
                return normalize_numpy(image, stats)
            return cv2.LUT(np.ascontiguousarray(image), lut).reshape(image.shape)

        return from_uint8
    return lambda image: normalize_numpy(image, stats)


def percentile_stats(samples: np.ndarray, percentiles: tuple[float, float]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-band (low, high, mean, std) of (N, C) samples: low/high as np.percentile (linear), mean/std of
    the samples clipped to [low, high]. For integer pixels of at most 16 bits the mean/std come from
    per-band histograms (exact sums of few distinct values)."""
    if samples.dtype.kind in "ui" and samples.dtype.itemsize <= 2:
        lo_value = int(np.iinfo(samples.dtype).min)
        n = len(samples)
        out = np.zeros((4, samples.shape[1]))
        for band in range(samples.shape[1]):
            # one band at a time, as float64: NumPy interpolates in the input dtype (int16 would overflow)
            low, high = np.percentile(samples[:, band].astype(np.float64), list(percentiles))
            counts = np.bincount(samples[:, band].astype(np.int64) - lo_value)
            values = np.arange(len(counts), dtype=np.float64) + lo_value
            clipped = np.clip(values, low, high)
            mean = float(counts @ clipped) / n
            out[:, band] = (low, high, mean, math.sqrt(float(counts @ (clipped - mean) ** 2) / n))
        return out[0], out[1], out[2], out[3]
    samples = samples.astype(np.float64)
    low, high = np.percentile(samples, list(percentiles), axis=0)  # one partition pass for both
    clipped = np.clip(samples, low, high)
    return low, high, clipped.mean(axis=0), clipped.std(axis=0)
