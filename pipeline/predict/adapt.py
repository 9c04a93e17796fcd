"""Test-time adaptation: predict a new scene with its own normalisation, re-estimated BatchNorm, flips,
at the training pixel size.

    base = load_for_predict(export_dir, cfg)           # the SavedModel, or its Keras model to adapt
    adapted = scene_detector(base, scene, cfg, region) # a Detector for scene inference (predict_region)

Four options of `predict:` (scene normalisation and resolution matching on by default, the others off;
docs/predict.md has their measured effect):

* `normalize: scene` — the scene is normalised with its own per-band statistics (the same percentile
  stretch as tiles/stats.json: low/high percentiles, mean/std of the clipped pixels), measured on a
  bounded random sample of its valid pixels (nodata excluded), instead of the training statistics.
  A new flight that is brighter, hazier or differently stretched then reaches the model on the scale
  the model was trained on.
* `adapt_bn: true` — AdaBN (Li et al. 2016): before predicting, the backbone's BatchNorm moving
  statistics are re-estimated on the target windows (a first pass over the scene, read window by window,
  each BN layer's batch statistics averaged over all windows), then the scene is predicted with them.
  The original statistics are restored for the next scene; the export on disk is never changed.
* `tta: true` — every window is also predicted flipped left-right, top-bottom and both; the four views
  are fused per window with weighted box fusion, a box's score being the mean over the views (a box
  seen in one view only keeps a quarter of its score).
* `match_resolution: true` (default) — a scene whose ground pixel size differs from the training one is
  read in windows resampled to it (`at_training_resolution`, pipeline.predict.resolution).

The exported SavedModel normalises inside with the training statistics, so adaptation runs the
export's Keras weights (model.weights.h5) rebuilt from model_info.json (`SceneAdapter`), which
normalises with the scene's own statistics directly and can re-estimate BatchNorm; with the training
statistics it gives the same detections as the SavedModel (tested). For any other detector taking raw
pixels (an export without Keras weights), scene normalisation moves the pixels from the scene's stretch
onto the training one before the detector normalises them (`SceneNormalized`; integer pixels are
rounded, which costs a little accuracy: docs/predict.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import PredictConfig
from pipeline.errors import SatdetError
from pipeline.predict.merge import weighted_box_fusion

log = logging.getLogger(__name__)

_SIZE_DIVISOR = 32  # the detector pads its input to a multiple of the coarsest backbone stride
_TTA_FLIPS = ((False, False), (True, False), (False, True), (True, True))  # (left-right, top-bottom)


# --------------------------------------------------------------------------------------------- statistics
def _sample_windows(width: int, height: int, size: int) -> Iterator[tuple[int, int, int, int]]:
    for row in range(0, height, size):
        for col in range(0, width, size):
            yield col, row, min(size, width - col), min(size, height - row)


def scene_stats(scene: str | Path, bands: list[int], percentiles: tuple[float, float], max_pixels: int = 200_000,
                region: tuple[int, int, int, int] | None = None, seed: int = 0, block: int = 1024) -> dict[str, Any]:
    """Per-band normalisation statistics of a scene (or a region of it), in the stats.json layout.

    Read block by block; from each block a share of at most `max_pixels` random valid pixels is kept
    (nodata value, NaN, internal mask or alpha excluded), so memory is bounded by `max_pixels` whatever
    the scene size. Percentiles, mean and std are computed exactly as the tiling stage does.
    """
    from rasterio.windows import Window

    from pipeline.data.stats import percentile_stats
    from pipeline.geo.raster import nodata_mask, open_raster, read_window

    rng = np.random.default_rng(seed)
    with open_raster(scene) as ds:
        c0, r0, w, h = region or (0, 0, ds.width, ds.height)
        share = min(1.0, max_pixels / max(w * h, 1))
        picked: list[np.ndarray] = []
        for col, row, ww, hh in _sample_windows(w, h, block):
            win = Window(c0 + col, r0 + row, ww, hh)
            data = read_window(ds, win, bands)  # a read error names the file and the window
            mask = nodata_mask(ds, data, win, bands)
            pixels = data.reshape(len(bands), -1).T
            if mask is not None:
                pixels = pixels[~mask.reshape(-1)]
            if np.issubdtype(pixels.dtype, np.floating):
                pixels = pixels[np.isfinite(pixels).all(axis=1)]
            k = min(len(pixels), math.ceil(share * ww * hh))
            if k:
                picked.append(pixels[rng.choice(len(pixels), k, replace=False)] if k < len(pixels) else pixels)
        dtype = ds.dtypes[0]
    if not picked:
        raise SatdetError(f"{scene}: no valid pixels to measure normalisation statistics on (all nodata?); "
                          "use predict.normalize=train")
    samples = np.concatenate(picked)
    low, high, mean, std = percentile_stats(samples, percentiles)
    return {"dtype": dtype, "bands": list(bands), "channels": len(bands), "percentiles": list(percentiles),
            "low": low.tolist(), "high": high.tolist(), "mean": mean.tolist(), "std": std.tolist(),
            "pixels_sampled": len(samples)}


# --------------------------------------------------------------------------------------------- detectors
class _KerasDetector:
    """The Detector protocol over the export's Keras model, normalising with `stats` (any, not only the
    training statistics). Mirrors the export's serve signature: normalise, zero-pad to the tile, detect,
    clip boxes to the window."""

    def __init__(self, model: Any, info: dict[str, Any], stats: dict[str, Any], predict_fn: Any) -> None:
        self.model = model
        self.info = info
        self.stats = stats
        self._predict_fn = predict_fn

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        from pipeline.data.stats import normalize_numpy

        images = np.asarray(images)
        tile = int(self.info["tile_size"])
        b, h, w, c = images.shape
        x = np.zeros((b, tile, tile, c), np.float32)
        x[:, :h, :w] = normalize_numpy(images, self.stats)
        out = {k: v.numpy() for k, v in self._predict_fn(x).items()}
        limit = np.array([w, h, w, h], np.float32)
        out["boxes"] = np.minimum(out["boxes"], limit)
        return out


class SceneAdapter:
    """Builds, once, the export's Keras detector; hands out per-scene adapted Detectors (`for_scene`)."""

    def __init__(self, exported: Any, weights: Path) -> None:
        import tensorflow as tf

        from pipeline.config import ModelConfig
        from pipeline.model.detector import build_detector

        self.exported = exported
        self.info = exported.info
        cfg = ModelConfig.model_validate({**self.info["model_config"], "weights": "none"})
        self.model = build_detector(cfg, len(self.info["classes"]), int(self.info["channels"]))
        self.model.load_weights(str(weights))
        tile, channels = int(self.info["tile_size"]), int(self.info["channels"])
        spec = tf.TensorSpec([None, tile, tile, channels], tf.float32)
        self._predict_fn = tf.function(lambda x: self.model(x, training=False), input_signature=[spec])
        self._bn = [layer for layer in self.model.backbone.layers
                    if layer.__class__.__name__ == "BatchNormalization"]
        self._bn_saved = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in self._bn]
        self._bn_fn: Any = None

    def for_scene(self, scene: str | Path, cfg: PredictConfig, region: tuple[int, int, int, int] | None = None
                  ) -> Any:
        """A Detector for `scene` (or `region` of it) with the adaptations `cfg` asks for."""
        bands = scene_bands(scene, self.info)
        stats = scene_normalisation(scene, bands, self.info, region) if cfg.normalize == "scene" else self.info["stats"]
        self.restore_bn()
        if cfg.adapt_bn:
            self.adapt_bn(scene, bands, stats, cfg, region)
        detector: Any = _KerasDetector(self.model, self.info, stats, self._predict_fn)
        return at_training_resolution(FlipTTA(detector, cfg.merge_iou) if cfg.tta else detector, scene, cfg)

    # ----------------------------------------------------------------------------------- AdaBN
    def restore_bn(self) -> None:
        """Put back the BatchNorm statistics the export was trained with."""
        for layer, (mean, var) in zip(self._bn, self._bn_saved):
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(var)

    def adapt_bn(self, scene: str | Path, bands: list[int], stats: dict[str, Any], cfg: PredictConfig,
                 region: tuple[int, int, int, int] | None = None) -> int:
        """Re-estimate the backbone's BN moving statistics on the scene's windows; returns windows seen.

        Each BN layer's statistics are the window-count-weighted mean of its batch statistics over all
        windows (momentum 0 per batch, averaged here), computed in training mode as AdaBN prescribes.
        """
        import tensorflow as tf

        from pipeline.data.stats import normalize_numpy
        from pipeline.geo.raster import raster_info
        from pipeline.predict.reader import read_batches
        from pipeline.predict.resolution import resize_images, resized_shape, scene_window
        from pipeline.predict.windows import plan_windows

        if not self._bn:
            return 0
        tile = int(cfg.tile_size or self.info["tile_size"])
        header = raster_info(scene)
        region = region or (0, 0, header.width, header.height)
        scale = _resolution_scale(self.info, header, cfg)
        size = scene_window(tile, scale)
        windows = plan_windows(region, size, min(cfg.overlap, size // 4))
        if self._bn_fn is None:
            for layer in self._bn:
                layer.momentum = 0.0  # moving statistics := this batch's statistics
                layer.trainable = True  # frozen (pretrained) BN runs in inference mode; AdaBN adapts it too

            def batch_stats(x: tf.Tensor) -> list[tf.Tensor]:
                self.model.backbone(x, training=True)
                return [t for layer in self._bn for t in (layer.moving_mean, layer.moving_variance)]

            spec = tf.TensorSpec([None, None, None, int(self.info["channels"])], tf.float32)
            self._bn_fn = tf.function(batch_stats, input_signature=[spec])  # one trace for every window size
        sums: list[np.ndarray] | None = None
        seen = 0
        for images, _masks, chunk in read_batches(str(scene), windows, bands, cfg.batch_size):
            shape = resized_shape(images.shape[1], images.shape[2], scale, tile)
            x = normalize_numpy(resize_images(images, shape), stats)
            ph, pw = (-x.shape[1]) % _SIZE_DIVISOR, (-x.shape[2]) % _SIZE_DIVISOR
            x = np.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))  # as the detector pads (zeros = mean)
            values = [v.numpy() * len(chunk) for v in self._bn_fn(tf.constant(x))]
            sums = values if sums is None else [s + v for s, v in zip(sums, values)]
            seen += len(chunk)
        assert sums is not None
        for i, layer in enumerate(self._bn):
            layer.moving_mean.assign(sums[2 * i] / seen)
            layer.moving_variance.assign(sums[2 * i + 1] / seen)
        log.info("AdaBN: %d BatchNorm layers re-estimated on %d windows of %s", len(self._bn), seen, scene)
        return seen


class FlipTTA:
    """Test-time flips around any Detector: four views per window, fused by weighted box fusion."""

    def __init__(self, detector: Any, iou: float = 0.55) -> None:
        self.detector = detector
        self.info = detector.info
        self.iou = iou

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        b, h, w = images.shape[:3]
        views = []
        for lr, tb in _TTA_FLIPS:
            x = images[:, :, ::-1] if lr else images
            x = x[:, ::-1] if tb else x
            out = {k: np.asarray(v) for k, v in self.detector.predict(np.ascontiguousarray(x)).items()}
            boxes = out["boxes"].astype(np.float64).copy()
            if lr:
                boxes[..., [0, 2]] = w - boxes[..., [2, 0]]
            if tb:
                boxes[..., [1, 3]] = h - boxes[..., [3, 1]]
            views.append((boxes, out["scores"], out["classes"], out["num_detections"]))
        limit = int(self.info.get("max_detections") or views[0][0].shape[1])
        result = {"boxes": np.zeros((b, limit, 4), np.float32), "scores": np.zeros((b, limit), np.float32),
                  "classes": np.zeros((b, limit), np.int32), "num_detections": np.zeros(b, np.int32)}
        for n in range(b):
            boxes = np.concatenate([v[0][n][: int(v[3][n])] for v in views])
            scores = np.concatenate([v[1][n][: int(v[3][n])] for v in views])
            labels = np.concatenate([v[2][n][: int(v[3][n])] for v in views])
            fb, fs, fl = weighted_box_fusion(boxes, scores, labels, self.iou, n_models=len(views))
            k = min(len(fb), limit)
            result["boxes"][n, :k], result["scores"][n, :k] = fb[:k], fs[:k]
            result["classes"][n, :k], result["num_detections"][n] = fl[:k], k
        return result


class SceneNormalized:
    """Scene normalisation around any Detector that takes raw pixels (the exported SavedModel included).

    Each window's pixels are moved from the scene's stretch onto the training stretch,
    x' = ((clip(x, low_s, high_s) - mean_s) / std_s) * std_t + mean_t, so that the detector's own
    normalisation with the training statistics yields the scene-normalised image (integer pixels are
    rounded and kept in their type's range; float pixels are exact).
    """

    def __init__(self, detector: Any, scene: dict[str, Any]) -> None:
        self.detector = detector
        self.info = detector.info
        self.scene_stats = scene
        self._train = self.info["stats"]
        self._dtype = np.dtype(self._train["dtype"])

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        from pipeline.data.stats import denormalize, normalize_numpy

        x = denormalize(normalize_numpy(images, self.scene_stats), self._train)
        if self._dtype.kind in "ui":
            limits = np.iinfo(self._dtype)
            x = np.clip(np.rint(x), limits.min, limits.max)
        return self.detector.predict(x.astype(self._dtype))


def keras_weights(detector: Any) -> Path | None:
    """The Keras weights file beside a loaded export (model.weights.h5), or None for any other detector."""
    from pipeline.model.export import WEIGHTS_FILE

    path = getattr(detector, "path", None)
    weights = Path(path) / WEIGHTS_FILE if path is not None else None
    return weights if weights is not None and weights.is_file() else None


def scene_bands(scene: str | Path, info: dict[str, Any]) -> list[int]:
    """The scene's bands the model reads, after checking band count and dtype against the model."""
    from pipeline.geo.raster import open_raster
    from pipeline.predict.exported import check_scene

    with open_raster(scene) as ds:
        return check_scene(ds, scene, info)


def scene_normalisation(scene: str | Path, bands: list[int], info: dict[str, Any],
                        region: tuple[int, int, int, int] | None = None) -> dict[str, Any]:
    """The model's statistics with the per-band numbers of `scene` (or `region`), same percentiles."""
    stats = info["stats"]
    percentiles = tuple(stats.get("percentiles") or (1.0, 99.0))
    return {**stats, **scene_stats(scene, bands, percentiles, region=region)}


def scene_detector(base: Any, scene: str | Path, cfg: PredictConfig,
                   region: tuple[int, int, int, int] | None = None) -> Any:
    """The Detector to predict `scene` (or `region` of it) with: `base` (any Detector, or a SceneAdapter
    for AdaBN) adapted as `cfg` asks: scene normalisation, AdaBN, test-time flips."""
    if isinstance(base, SceneAdapter):
        return base.for_scene(scene, cfg, region)
    detector = base
    if cfg.normalize == "scene" and not _has_stats(base.info):
        log.warning("the model carries no normalisation statistics; %s is predicted without scene normalisation",
                    scene)
    elif cfg.normalize == "scene":
        detector = SceneNormalized(base, scene_normalisation(scene, scene_bands(scene, base.info), base.info, region))
    elif base.info.get("training_normalize") == "scene":
        log.warning("%s: the model trained on each scene's own stretch (data.normalize: scene) and is given the "
                    "pooled training one (predict.normalize: train); predict.normalize: scene matches its training",
                    scene)
    return at_training_resolution(FlipTTA(detector, cfg.merge_iou) if cfg.tta else detector, scene, cfg)


def at_training_resolution(detector: Any, scene: str | Path, cfg: PredictConfig) -> Any:
    """`detector`, fed `scene`'s windows resampled to the model's training pixel size when
    `cfg.match_resolution` and the pixel sizes differ (pipeline.predict.resolution); else as it is."""
    if not cfg.match_resolution or not detector.info.get("pixel_size_m"):
        return detector  # no header read
    from pipeline.geo.raster import raster_info
    from pipeline.predict.resolution import Resampled

    scale = _resolution_scale(detector.info, raster_info(scene), cfg)
    if scale == 1.0:
        return detector

    model = float(detector.info["pixel_size_m"])
    log.warning("%s: %.3g m pixels, the model was trained at %.3g m: windows resampled x%.3g to match "
                "(predict.match_resolution)", scene, scale * model, model, scale)
    return Resampled(detector, scale)


def _resolution_scale(info: dict[str, Any], header: Any, cfg: PredictConfig) -> float:
    """Scene pixel size / training pixel size for a scene with RasterInfo `header` (1.0: predicted as it
    is; always with match_resolution off)."""
    if not cfg.match_resolution:
        return 1.0
    from pipeline.predict.resolution import scene_scale

    return scene_scale(info, header.crs, header.transform)


def _has_stats(info: dict[str, Any]) -> bool:
    stats = info.get("stats") or {}
    return all(k in stats for k in ("low", "high", "mean", "std"))


def load_for_predict(export_dir: str | Path, cfg: PredictConfig) -> Any:
    """The detector to adapt per scene: the export's Keras model (`SceneAdapter`: exact scene normalisation,
    AdaBN) when `cfg` asks for adaptation and the export has its Keras weights, else the exported model."""
    from pipeline.predict.exported import load_detector

    detector = load_detector(export_dir)
    if not (cfg.adapt_bn or cfg.normalize == "scene"):
        return detector
    weights = keras_weights(detector)
    if weights is None:
        if cfg.adapt_bn:
            raise SatdetError(f"{export_dir}: predict.adapt_bn needs the export's Keras weights (model.weights.h5); "
                              "re-export the model with this version of satdet, or set predict.adapt_bn: false")
        return detector  # scene normalisation by moving the pixels (SceneNormalized)
    return SceneAdapter(detector, weights)
