"""Prediction as a Prefect flow: scenes through an exported model, written as detection files.

Tasks run one after another on the flow's main thread (the model and GPU memory live there); each is
retried on transient IO errors and cached on the content of the model, the scenes, the `predict:`
settings and the prediction code. With an output folder every scene is its own task, so re-running over
a folder of imagery only predicts what is new or changed; the SavedModel is loaded once per process (at
the first scene that is not served from cache), not once per scene task.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from flows.alerts import on_run_failure
from flows.caching import fingerprint, key_fn
from flows.retries import io_retries
from flows.scaleout import on_dask
from pipeline.config import Config, PredictConfig
from pipeline.errors import SatdetError
from pipeline.predict.exported import stored_test_time_settings
from pipeline.tf_quiet import import_tensorflow


@task(
    name="predict-scenes",
    task_run_name="predict-{label}",
    **io_retries(2),
    cache_key_fn=key_fn(
        "predict-scenes", lambda p: {"model": p["export_dir"], **dict(enumerate(map(str, p["scenes"])))}, "out"
    ),
    persist_result=True,
)
def predict_task(config: Config, export_dir: Path, scenes: list[Path], out: Path, label: str) -> list[Path]:
    """Stream scenes through the model and write their detections to `out` (a file or a folder)."""
    import_tensorflow()  # quietly, also when a Prefect worker (not the CLI) runs the flow
    from pipeline.predict import scene as scene_stage

    out = Path(out)
    if out.suffix.lower() in _FILE_SUFFIXES or len(scenes) != 1:  # one file for all: one task, one load
        return [Path(p) for p in scene_stage.predict_scenes(Path(export_dir), list(scenes), out, config.predict)]
    return [predict_one(config, Path(export_dir), scenes[0], out)]


# One loaded model per process (a Prefect worker's flow run, or a Dask worker): scene tasks share it.
_LOADED: dict[str, Any] = {}
_LOAD_LOCK = threading.Lock()


def loaded_detector(export_dir: Path, cfg: PredictConfig) -> Any:
    """The detector for `export_dir` under `cfg`, loaded at the first call and kept for the next ones
    (reloaded when the export's files or the predict settings change)."""
    from pipeline.predict.adapt import load_for_predict

    key = json.dumps([str(export_dir), fingerprint(export_dir), cfg.model_dump(mode="json")], default=str)
    with _LOAD_LOCK:
        if _LOADED.get("key") != key:
            _LOADED.clear()  # at most one model in memory
            _LOADED.update(key=key, detector=load_for_predict(export_dir, cfg))
        return _LOADED["detector"]


def predict_one(config: Config, export_dir: Path, scene: Path, out_dir: Path) -> Path:
    """One scene with the shared detector, written as out_dir/<scene>.<geojson|gpkg> (what
    pipeline.predict.scene.predict_scenes writes per scene into a folder)."""
    from pipeline.geo.raster import exists_or_remote
    from pipeline.predict import scene as scene_stage
    from pipeline.predict.adapt import scene_detector
    from pipeline.predict.vectors import write_results

    cfg = config.predict
    if not exists_or_remote(scene):
        raise SatdetError(f"{scene}: scene file not found")
    detector = scene_detector(loaded_detector(export_dir, cfg), scene, cfg)
    result = scene_stage.predict_region(detector, scene, cfg)
    return Path(write_results([result], Path(out_dir), cfg.format, per_scene=True)[0])


_FILE_SUFFIXES = (".geojson", ".json", ".gpkg")


def _export_dir(model_dir: Path) -> Path:
    """Accept a run's model/ folder or its export/ SavedModel."""
    if (model_dir / "export").is_dir():
        return model_dir / "export"
    if (model_dir / "model_info.json").exists() or (model_dir / "saved_model.pb").exists():
        return model_dir
    raise SatdetError(f"{model_dir}: no exported model here; pass a run's model/ folder (with export/) or export/ itself")


@flow(name="satdet-predict", on_failure=[on_run_failure], on_crashed=[on_run_failure])
def predict_scenes(
    model_dir: str, scenes: list[str], out: str, predict: dict[str, Any] | None = None, force: bool = False
) -> list[str]:
    """Predict every scene with the exported model in `model_dir`; returns the files written.

    Args:
        model_dir: a run's model/ folder or its export/ folder.
        scenes: raster paths (or GDAL URLs) to predict.
        out: output folder (one file per scene) or a .geojson/.gpkg file (all scenes in one file).
        predict: the `predict:` config section as a dict (omitted: the defaults with the test-time settings
            stored with the model, as `satdet predict` without --config).
        force: re-predict scenes even when a cached result matches.
    """
    logger = get_run_logger()
    export_dir = _export_dir(Path(model_dir).resolve())
    settings = predict if predict is not None else stored_test_time_settings(export_dir)
    config = Config(predict=PredictConfig.model_validate(settings))
    out_path = Path(out).resolve()
    paths = [Path(s) if "://" in s or s.startswith("/vsi") else Path(s).resolve() for s in scenes]
    # One output file holds every scene, so it is written by one task; an output folder gets one task
    # (and one cache entry) per scene, so only new or changed scenes are predicted again.
    if out_path.suffix.lower() in _FILE_SUFFIXES:
        batches = [(out_path.stem, paths)]
    else:
        batches = [(p.stem, [p]) for p in paths]
    written: list[Path] = []
    rows = []
    task_ = predict_task.with_options(refresh_cache=True) if force else predict_task
    if on_dask():  # every scene on a Dask worker (each worker loads the model once), collected in order
        futures = [task_.submit(config, export_dir, batch, out_path, label) for label, batch in batches]
        outputs = [f.result() for f in futures]
    else:  # one after another on this thread, which holds the model (and the GPU)
        outputs = [task_(config, export_dir, batch, out_path, label) for label, batch in batches]
    for (label, batch), files in zip(batches, outputs, strict=True):
        if not all(f.exists() for f in files):  # a cache hit whose files were deleted since: predict again
            files = predict_task.with_options(refresh_cache=True)(config, export_dir, batch, out_path, label)
        written += files
        rows += [{"scenes": ", ".join(p.name for p in batch), "output": str(f)} for f in files]
        logger.info("%s → %s", ", ".join(p.name for p in batch), ", ".join(str(f) for f in files))
    create_table_artifact(rows, key="satdet-predictions", description=f"Detections from {export_dir}")
    return [str(p) for p in written]
