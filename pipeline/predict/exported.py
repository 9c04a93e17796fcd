"""The exported model as scene inference sees it: find and load it, its output threshold, and a
scene checked against the bands and pixel type it was trained on.

The export itself (SavedModel with normalisation inside, model_info.json) is written and loaded by
pipeline.model.export; this module only resolves the folder first, so that a wrong path is a clear
error before TensorFlow is even imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.config import PredictConfig
from pipeline.errors import SatdetError

DEFAULT_OUTPUT_THRESHOLD = 0.3  # for exports without a validation-calibrated threshold


class Detector(Protocol):
    """What scene inference needs from a model: `.info` (model_info.json) and batch prediction on raw pixels."""

    info: dict[str, Any]

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


TEST_TIME_KEYS = ("normalize", "adapt_bn", "tta")  # the predict settings an export stores for itself


def _find_export_dir(path: Path) -> Path | None:
    """`path` or `path/export`, whichever holds model_info.json; None when neither does."""
    return next((c for c in (path, path / "export") if (c / "model_info.json").is_file()), None)


def resolve_export_dir(path: str | Path) -> Path:
    """Accept an export folder or a model folder holding `export/`; anything else is a SatdetError."""
    path = Path(path)
    found = _find_export_dir(path)
    if found is not None:
        return found
    if not path.exists():
        raise SatdetError(f"{path}: model folder not found; pass runs/<name>/model/export (or runs/<name>/model)")
    raise SatdetError(f"{path}: not a satdet model export (no model_info.json); pass the export/ folder written "
                      "by training (runs/<name>/model/export)")


def _stored_info(path: Path) -> dict[str, Any]:
    """model_info.json of the export at `path` (or `path/export`); {} where there is none (loading it names
    that error)."""
    found = _find_export_dir(path)
    if found is None:
        return {}
    info_path = found / "model_info.json"
    try:
        info = json.loads(info_path.read_text())
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise SatdetError(f"{info_path}: not a JSON object; re-export the model (satdet train)")
    return info


def stored_test_time_settings(path: str | Path) -> dict[str, Any]:
    """The test-time settings (normalize, adapt_bn, tta) the export at `path` (or `path/export`) was written
    with; {} for older exports, and where there is no export (loading it names that error)."""
    stored = _stored_info(Path(path)).get("predict") or {}
    if not isinstance(stored, dict):
        raise SatdetError(f"{_find_export_dir(Path(path))}/model_info.json: 'predict' is not a JSON object; "
                          "re-export the model (satdet train)")
    return {k: stored[k] for k in TEST_TIME_KEYS if k in stored}


def stored_output_threshold(path: str | Path) -> dict[str, Any] | None:
    """The output threshold the export at `path` was calibrated with (model_info.json), or None."""
    stored = _stored_info(Path(path)).get("output_threshold")
    return stored if isinstance(stored, dict) and "score_threshold" in stored else None


def load_detector(export_dir: str | Path) -> Detector:
    """Load an exported model (pipeline.model.export.load_exported) after checking it is an export."""
    export_dir = resolve_export_dir(export_dir)  # a clear error before TensorFlow is even imported
    from pipeline.model.export import load_exported

    return load_exported(export_dir)


def output_threshold(cfg: PredictConfig, info: dict[str, Any]) -> float:
    """predict.score_threshold, or when unset the export's calibrated threshold (model_info.json), else 0.3."""
    if cfg.score_threshold is not None:
        return float(cfg.score_threshold)
    calibrated = (info.get("output_threshold") or {}).get("score_threshold")
    return float(calibrated) if calibrated is not None else DEFAULT_OUTPUT_THRESHOLD


def model_bands(info: dict[str, Any]) -> list[int]:
    """1-based source band indices the model was trained on."""
    bands = info.get("bands") or (info.get("stats") or {}).get("bands")
    return [int(b) for b in bands] if bands else list(range(1, int(info["channels"]) + 1))


def check_scene(ds: Any, path: str | Path, info: dict[str, Any]) -> list[int]:
    """Band count and dtype of the scene against the model; returns the bands to read."""
    bands = model_bands(info)
    want_dtype = str(info.get("dtype") or (info.get("stats") or {}).get("dtype"))
    if max(bands) > ds.count:
        raise SatdetError(f"{path}: scene has {ds.count} band(s) but the model was trained on bands {bands} "
                          f"({len(bands)} channels); predict on imagery with the training bands")
    if ds.dtypes[0] != want_dtype:
        raise SatdetError(f"{path}: scene dtype is {ds.dtypes[0]} but the model was trained on {want_dtype} "
                          "pixels; convert the scene (e.g. gdal_translate -ot) or retrain on this dtype")
    return bands
