"""Prediction as a Prefect flow: one task per scene through an exported model, written as detection files.

Scenes run one after another on the flow's main thread (the model and GPU memory live there); each is
retried on transient IO errors and cached on the content of the model, the scene and the `predict:`
settings, so re-running over a folder of imagery only predicts what is new or changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.tasks import exponential_backoff

from flows.caching import key_fn
from flows.training import _transient
from pipeline.config import Config, PredictConfig
from pipeline.errors import SatdetError


@task(
    name="predict-scene",
    task_run_name="predict-{scene.name}",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_condition_fn=_transient,
    cache_key_fn=key_fn("predict-scene", ["predict"], lambda p: {"model": p["export_dir"], "scene": p["scene"]}, "out"),
    persist_result=True,
)
def predict_scene(config: Config, export_dir: Path, scene: Path, out: Path) -> list[Path]:
    """Stream one scene through the model and write its detections under `out`."""
    from pipeline.predict import scene as scene_stage

    return [Path(p) for p in scene_stage.predict_scenes(Path(export_dir), [Path(scene)], Path(out), config.predict)]


def _export_dir(model_dir: Path) -> Path:
    """Accept a run's model/ folder or its export/ SavedModel."""
    if (model_dir / "export").is_dir():
        return model_dir / "export"
    if (model_dir / "model_info.json").exists() or (model_dir / "saved_model.pb").exists():
        return model_dir
    raise SatdetError(f"{model_dir}: no exported model here; pass a run's model/ folder (with export/) or export/ itself")


@flow(name="satdet-predict", log_prints=True)
def predict_scenes(
    model_dir: str, scenes: list[str], out: str, predict: dict[str, Any] | None = None, force: bool = False
) -> list[str]:
    """Predict every scene with the exported model in `model_dir`; returns the files written.

    Args:
        model_dir: a run's model/ folder or its export/ folder.
        scenes: raster paths (or GDAL URLs) to predict.
        out: output folder.
        predict: the `predict:` config section as a dict (defaults when omitted).
        force: re-predict scenes even when a cached result matches.
    """
    logger = get_run_logger()
    export_dir = _export_dir(Path(model_dir).resolve())
    config = Config(predict=PredictConfig.model_validate(predict or {}))
    out_dir = Path(out).resolve()
    written: list[Path] = []
    rows = []
    for scene in scenes:
        scene_path = Path(scene) if "://" in scene or scene.startswith("/vsi") else Path(scene).resolve()
        task_ = predict_scene.with_options(refresh_cache=True) if force else predict_scene
        files = task_(config, export_dir, scene_path, out_dir)
        missing = [f for f in files if not f.exists()]
        if missing:  # a cache hit whose files were deleted since: predict again
            files = predict_scene.with_options(refresh_cache=True)(config, export_dir, scene_path, out_dir)
        written += files
        rows.append({"scene": str(scene), "outputs": ", ".join(str(f) for f in files)})
        logger.info("%s → %s", scene, ", ".join(str(f) for f in files))
    create_table_artifact(rows, key="satdet-predictions", description=f"Detections from {export_dir}")
    return [str(p) for p in written]
