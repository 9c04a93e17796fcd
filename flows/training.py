"""The training pipeline as a Prefect flow: tile (one task per scene) → build_dataset → train → evaluate.

Tasks are thin: each calls one `pipeline` stage function and passes paths on. Every task caches on the
*content* of its inputs plus the config sections it reads (flows/caching.py), so re-running with nothing
changed skips straight to the report, and changing e.g. `tiling.tile_size` re-runs tiling and everything
after it. `force=True` (`satdet run --force`) refreshes every stage. A stage whose output folder has gone
missing is re-run even on a cache hit.

Stage modules are imported inside the tasks: importing this module stays light (no TensorFlow), which
keeps `satdet schedule` quick and lets tests swap a stage function on its module.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.tasks import exponential_backoff

from flows.caching import config_digest, key_fn
from flows.reporting import publish_artifacts, slug
from pipeline.config import Config, ConfigError, load_config, save_config
from pipeline.errors import SatdetError
from pipeline.tf_quiet import import_tensorflow

# Share of the progress bar each stage completes (training dominates the wall time).
_PROGRESS = {"tiled": 10.0, "dataset": 15.0, "trained": 90.0, "evaluated": 100.0}


def _transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry unless the failure is a user-fixable one (bad config or input): retrying cannot fix those."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return not isinstance(exc, (SatdetError, ConfigError))


# ------------------------------------------------------------------------------------------------ tasks
@task(
    name="tile-scene",
    task_run_name="tile-scene-{scene_index}",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_jitter_factor=0.5,
    retry_condition_fn=_transient,
    cache_key_fn=key_fn(
        "tile-scene",
        ["tiling"],
        lambda p: {
            "image": p["config"].tiling.scenes[p["scene_index"]].image,
            "labels": p["config"].tiling.scenes[p["scene_index"]].labels,
            "scene_index": p["scene_index"],
        },
        output="work_dir",
    ),
    persist_result=True,
)
def tile_scene(config: Config, scene_index: int, work_dir: Path) -> Path:
    """Cut one scene into tiles (IO-bound: retried with backoff, e.g. for a flaky network mount)."""
    from pipeline.geo import tiling

    return Path(tiling.tile_scene(config, scene_index, Path(work_dir)))


@task(
    name="finalize-tiling",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_condition_fn=_transient,
    cache_key_fn=key_fn("finalize-tiling", ["tiling"], lambda p: dict(enumerate(map(str, p["scene_outputs"]))), "out_dir"),
    persist_result=True,
)
def finalize_tiling(config: Config, scene_outputs: list[Path], out_dir: Path) -> Path:
    """Merge the per-scene tiles into shards, stats.json, qa.json, splits.json and manifest.jsonl."""
    from pipeline.geo import tiling

    return Path(tiling.finalize_tiling(config, [Path(p) for p in scene_outputs], Path(out_dir)))


@task(
    name="build-dataset",
    cache_key_fn=key_fn("build-dataset", ["data", "tiling"], lambda p: {"tiles": p["tiles_dir"]}, "tiles_dir"),
    persist_result=True,
)
def build_dataset(config: Config, tiles_dir: Path) -> Path:
    """Check the tiles make a usable tf.data input (writes tiles/dataset.json)."""
    import_tensorflow()  # quietly, also when a Prefect worker (not the CLI) runs the flow
    from pipeline.data import dataset

    return Path(dataset.run_dataset_check(config, Path(tiles_dir)))


@task(
    name="train",
    cache_key_fn=key_fn(
        "train", ["data", "model", "train"], lambda p: {"tiles": p["tiles_dir"]}, "model_dir"
    ),
    persist_result=True,
)
def train(config: Config, tiles_dir: Path, model_dir: Path, progress_id: Any = None) -> Path:
    """Train the detector (called directly from the flow, so it runs on the flow's main thread)."""
    import_tensorflow()  # quietly, also when a Prefect worker (not the CLI) runs the flow
    from pipeline.train import loop

    with _training_progress(Path(model_dir), config.train.steps, progress_id):
        return Path(loop.run_training(config, Path(tiles_dir), Path(model_dir)))


@task(
    name="evaluate",
    cache_key_fn=key_fn(
        "evaluate",
        ["evaluate", "predict", "tiling"],
        lambda p: {"model": p["model_dir"], "tiles": p["tiles_dir"]},
        "out_dir",
    ),
    persist_result=True,
)
def evaluate(config: Config, model_dir: Path, tiles_dir: Path, out_dir: Path) -> Path:
    """Score the exported model per tile and per scene (metrics.json, report.md, pr_curve.png)."""
    import_tensorflow()  # quietly, also when a Prefect worker (not the CLI) runs the flow
    from pipeline.evaluate import run

    return Path(run.run_evaluation(config, Path(model_dir), Path(tiles_dir), Path(out_dir)))


# ------------------------------------------------------------------------------------------------ flow
@flow(name="satdet-train")
def train_pipeline(config_path: str, overrides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Tile → dataset check → train → evaluate for one config; returns paths and the headline metrics.

    Args:
        config_path: YAML config (scene paths are relative to its folder, runs_dir to the working dir).
        overrides: `section.key=value` overrides applied on top of the file.
        force: re-run every stage even when a cached result matches.
    """
    logger = get_run_logger()
    config = load_config(config_path, overrides or [])
    if not config.tiling.scenes:
        raise SatdetError(f"{config_path}: tiling.scenes is empty; list at least one scene (image + labels)")
    run_dir = config.run_dir.resolve()
    tiles_dir, model_dir, eval_dir = run_dir / "tiles", run_dir / "model", run_dir / "eval"
    # The tiler keeps its plan in the work folder, so each tiling configuration gets its own folder.
    work_dir = run_dir / "work" / f"tiling-{config_digest(config, ['tiling'])}"
    save_config(config, run_dir / "config.yaml")
    logger.info("run %s → %s", config.name, run_dir)

    progress_id = create_progress_artifact(
        progress=0.0, key=f"{slug(config.name)}-progress", description=f"satdet run {config.name}: stages done"
    )

    # A stage re-runs when forced or when its output is gone (a cache hit would point at nothing).
    def fresh(t: Any, *outputs: Path) -> Any:
        return t.with_options(refresh_cache=True) if force or not all(o.exists() for o in outputs) else t

    tiles_done = tiles_dir / "manifest.jsonl"
    scene_futures = fresh(tile_scene, work_dir, tiles_done).map(
        unmapped(config), list(range(len(config.tiling.scenes))), unmapped(work_dir)
    )
    scene_outputs = [f.result() for f in scene_futures]
    tiles = fresh(finalize_tiling, tiles_done)(config, scene_outputs, tiles_dir)
    _prune_siblings(work_dir)
    update_progress_artifact(progress_id, _PROGRESS["tiled"])

    fresh(build_dataset, tiles_dir / "dataset.json")(config, tiles)
    update_progress_artifact(progress_id, _PROGRESS["dataset"])

    # Called, not submitted: a direct call runs in this (the main) thread, which TensorFlow and the GPU
    # want, and Prefect timeouts could not interrupt a worker thread anyway.
    model = fresh(train, model_dir / "export")(config, tiles, model_dir, progress_id)
    update_progress_artifact(progress_id, _PROGRESS["trained"])

    evaluated = fresh(evaluate, eval_dir / "metrics.json")(config, model, tiles, eval_dir)
    update_progress_artifact(progress_id, _PROGRESS["evaluated"])

    metrics = json.loads((Path(evaluated) / "metrics.json").read_text())
    report = publish_artifacts(config, run_dir, Path(evaluated), metrics)
    scene = metrics.get("scene") or {}
    return {
        "run_dir": str(run_dir),
        "tiles": str(tiles),
        "model": str(model),
        "eval": str(evaluated),
        "report": str(report),
        "eval_split": config.evaluate.split,
        "AP": scene.get("AP"),
        "AP50": scene.get("AP50"),
        "AP75": scene.get("AP75"),
    }


# ------------------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def _training_progress(model_dir: Path, total_steps: int, progress_id: Any, every_s: float = 5.0) -> Iterator[None]:
    """Move the flow's progress artifact while training runs, by following model_dir/train_log.jsonl
    (the trainer appends one complete JSON line per logged step)."""
    if progress_id is None:
        yield
        return
    stop = threading.Event()
    start, span = _PROGRESS["dataset"], _PROGRESS["trained"] - _PROGRESS["dataset"]
    log = model_dir / "train_log.jsonl"

    def follow() -> None:
        last = -1
        while not stop.wait(every_s):
            step = _last_step(log)
            if step is not None and step != last:
                last = step
                with contextlib.suppress(Exception):  # progress is cosmetic: never fail training over it
                    update_progress_artifact(progress_id, start + span * min(step / max(total_steps, 1), 1.0))

    # Copy the context so the thread talks to the same Prefect API (ephemeral server or test harness).
    thread = threading.Thread(target=contextvars.copy_context().run, args=(follow,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def _prune_siblings(work_dir: Path) -> None:
    """Delete the work folders of earlier tiling configurations (their tiles were replaced)."""
    for other in work_dir.parent.glob("tiling-*"):
        if other != work_dir and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


def _last_step(log: Path) -> int | None:
    """Step of the last complete line of the training log (None before the first one)."""
    try:
        with log.open("rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(fh.tell() - 4096, 0))
            lines = [ln for ln in fh.read().splitlines() if ln.strip()]
        return int(json.loads(lines[-1])["step"]) if lines else None
    except (OSError, ValueError, KeyError):
        return None
