"""Export a trained detector as a self-contained SavedModel, and load it back for inference.

Layout of an export directory::

    saved_model.pb, variables/   SavedModel; signature ``serve``: raw pixels [B, h, w, C] of stats["dtype"]
                                 (h, w <= tile_size; smaller windows are padded inside) -> boxes [B, N, 4]
                                 xyxy px, scores [B, N], classes [B, N] int32 (1-based), num_detections [B]
    model.weights.h5             keras weights (rebuild with build_detector(model_config, ...) + load_weights)
    labels.json                  {"1": "tree", ...}
    model_info.json              {format, bands, channels, dtype, tile_size, classes, stats, model_config,
                                  max_detections, output_threshold: {score_threshold, precision, recall,
                                  f1, iou, split, level, rule} or null, predict: {normalize, adapt_bn, tta}
                                  (the run's test-time settings, `satdet predict`'s defaults) or null,
                                  pixel_size_m: ground pixel size of the training tiles in metres or null}

Normalisation (pipeline.data.stats.normalize) runs inside the signature, so callers pass source pixels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from pipeline.data.stats import normalize
from pipeline.errors import SatdetError
from pipeline.files import atomic_dir, atomic_write_json

EXPORT_FORMAT = "satdet-faster-rcnn/1"
INFO_FILE = "model_info.json"
LABELS_FILE = "labels.json"
WEIGHTS_FILE = "model.weights.h5"


class _Serving(tf.Module):
    """The ``serve`` signature: normalisation, padding to the static tile size, the detector."""

    def __init__(self, model: Any, stats: dict[str, Any], tile_size: int) -> None:
        super().__init__()
        # Keras 3 variables wrap tf.Variables; track the raw ones so the SavedModel holds the weights. The
        # model and stats are captured by the closure rather than stored (tf.Module would wrap them).
        self.model_variables = [getattr(v, "value", v) for v in model.variables]
        stats = json.loads(json.dumps(stats))
        tile = int(tile_size)
        dtype = tf.as_dtype(np.dtype(stats["dtype"]).name)

        def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
            height, width = tf.shape(images)[1], tf.shape(images)[2]
            x = normalize(images, stats)
            # Windows smaller than the tile (scene edges) are zero-padded after normalisation (the mean
            # pixel); pad_to_bounding_box fails loudly for windows larger than the tile.
            x = tf.image.pad_to_bounding_box(x, 0, 0, tile, tile)
            out = model(x, training=False)
            limit = tf.cast(tf.stack([width, height, width, height]), tf.float32)
            return {
                "boxes": tf.minimum(out["boxes"], limit),
                "scores": out["scores"],
                "classes": out["classes"],
                "num_detections": out["num_detections"],
            }

        self.serve = tf.function(serve, input_signature=[tf.TensorSpec([None, None, None, int(stats["channels"])], dtype)])


def export_model(model: Any, stats: dict[str, Any], classes: list[str], out_dir: Path, tile_size: int,
                 predict: dict[str, Any] | None = None, pixel_size_m: float | None = None,
                 training_normalize: str = "global") -> Path:
    """Write the export directory ``out_dir`` atomically (see the module docstring); returns it.

    ``predict`` (the run's ``predict.normalize``, ``adapt_bn`` and ``tta``) is stored as ``predict``, its
    default test-time settings; ``pixel_size_m`` the training tiles' ground pixel size, to which scene
    inference resamples other scenes (pipeline.predict.resolution); ``training_normalize`` the run's
    ``data.normalize`` (``scene``: trained on each scene's own stretch). ``output_threshold`` starts null: `set_output_threshold` stores the one the
    train stage calibrates with the export (pipeline.train.calibrate)."""
    out_dir = Path(out_dir)
    if int(stats["channels"]) != model.bands:
        raise SatdetError(f"stats.json has {stats['channels']} channels but the model was built for {model.bands} bands")
    module = _Serving(model, stats, tile_size)
    info = {
        "format": EXPORT_FORMAT,
        "bands": stats.get("bands"),
        "channels": int(stats["channels"]),
        "dtype": str(stats["dtype"]),
        "tile_size": int(tile_size),
        "classes": list(classes),
        "stats": stats,
        "model_config": model.cfg.model_dump(mode="json"),
        "max_detections": model.cfg.max_detections,
        "output_threshold": None,
        "predict": predict,
        "pixel_size_m": pixel_size_m,
        "training_normalize": training_normalize,
    }
    with atomic_dir(out_dir) as tmp:
        tf.saved_model.save(module, str(tmp), signatures={"serve": module.serve})
        model.save_weights(str(tmp / WEIGHTS_FILE))
        (tmp / LABELS_FILE).write_text(json.dumps({str(i + 1): c for i, c in enumerate(classes)}, indent=2) + "\n")
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def set_output_threshold(export_dir: Path, calibration: dict[str, Any]) -> None:
    """Replace the stored ``output_threshold`` of an export (model_info.json, written atomically)."""
    path = Path(export_dir) / INFO_FILE
    info = json.loads(path.read_text())
    info["output_threshold"] = calibration
    atomic_write_json(path, info)


class ExportedDetector:
    """A loaded export: ``.info`` (model_info.json) and ``.predict(raw images) -> dict of numpy arrays``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.info: dict[str, Any] = json.loads((self.path / INFO_FILE).read_text())
        self._loaded = tf.saved_model.load(str(self.path))
        self._serve = self._loaded.signatures["serve"]
        self.classes: list[str] = list(self.info["classes"])
        self.tile_size: int = int(self.info["tile_size"])

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Detections for raw images [B, h, w, C] (or one [h, w, C]) of the export's dtype, h, w <= tile_size."""
        images = np.asarray(images)
        single = images.ndim == 3
        if single:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != self.info["channels"]:
            raise SatdetError(
                f"{self.path}: expects images [B, h, w, {self.info['channels']}], got shape {images.shape}"
            )
        if images.shape[1] > self.tile_size or images.shape[2] > self.tile_size:
            raise SatdetError(
                f"{self.path}: window {images.shape[1]}x{images.shape[2]} exceeds the exported tile size "
                f"{self.tile_size}; set predict.tile_size <= {self.tile_size}"
            )
        dtype = np.dtype(self.info["dtype"])
        out = self._serve(images=tf.constant(images.astype(dtype, copy=False)))
        result = {k: v.numpy() for k, v in out.items()}
        return {k: v[0] for k, v in result.items()} if single else result


def load_exported(path: str | Path) -> ExportedDetector:
    """Load an export directory written by ``export_model``; anything else is a SatdetError."""
    path = Path(path)
    missing = [n for n in ("saved_model.pb", INFO_FILE) if not (path / n).is_file()]
    if missing:
        raise SatdetError(
            f"{path}: not a satdet model export (missing {', '.join(missing)}); point to runs/<name>/model/export"
        )
    try:
        info = json.loads((path / INFO_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SatdetError(f"{path / INFO_FILE}: unreadable ({err.__class__.__name__}); re-export the model") from None
    if info.get("format") != EXPORT_FORMAT:
        raise SatdetError(f"{path / INFO_FILE}: format {info.get('format')!r} is not {EXPORT_FORMAT!r}; re-export")
    return ExportedDetector(path)
