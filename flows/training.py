"""The training pipeline as a Prefect flow: plan tiling → tile (one task per scene, or per row block of a
large scene: flows/row_blocks.py; at most `tiling.workers` at a time) → finalize → build_dataset → train →
evaluate.

Tasks are thin: each calls one `pipeline` stage function and passes paths on. Every task caches on the
*content* of its inputs, the config sections it reads and the source of the code it runs
(flows/caching.py), so re-running with nothing changed skips straight to the report, and changing e.g.
`tiling.tile_size` re-runs tiling and everything after it. `force=True` (`satdet run --force`) refreshes
every stage. A stage whose output folder has gone missing is re-run even on a cache hit.

One run at a time per run folder: the flow holds the folder's lock (flows/locking.py) from the moment it
knows the folder until the report is written, and the train and evaluate tasks take it too when called
on their own, so overlapping runs queue. The `pipeline.*` log lines and the trainer's progress go to the
run's Prefect log (flows/runlog.py); a failed, crashed or timed-out run calls flows/alerts.py.

Stage modules are imported inside the tasks: importing this module stays light (no TensorFlow), which
keeps `satdet schedule` quick and lets tests swap a stage function on its module.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.utilities.timeout import timeout

from flows.alerts import on_run_failure
from flows.caching import config_digest, fingerprint, key_fn, stage_code, stage_key
from flows.locking import run_folder_lock
from flows.reporting import publish_artifacts, slug
from flows.retries import io_retries
from flows.row_blocks import merged_outputs, scene_inputs, tile_row_block, tiling_units
from flows.runlog import follow_training, pipeline_logs_to_run, run_logger
from flows.scaleout import on_dask
from pipeline.config import Config, config_from_dict, load_config, save_config
from pipeline.errors import SatdetError
from pipeline.files import atomic_write_json, atomic_write_text
from pipeline.tf_quiet import import_tensorflow

# Share of the progress bar each stage completes (training dominates the wall time).
_PROGRESS = {"tiled": 10.0, "dataset": 15.0, "trained": 90.0, "evaluated": 100.0}


# ------------------------------------------------------------------------------------------------ tasks
PLAN_KEY_FILE = "plan.key"


@task(
    name="plan-tiling",
    **io_retries(2),
)
def plan_tiling(config: Config, work_dir: Path, force: bool = False) -> Path:
    """Read every scene's header once and write the tiling plan (windows, blocks, splits) to
    work_dir/plan.json, before the scene tasks start: they all read this one file. The plan is kept while
    the scenes (and the tiling config, which names work_dir) are unchanged, and redone when a scene file
    is replaced (its size may differ)."""
    from pipeline.geo import plan as geo_plan
    from pipeline.geo.workdir import PLAN_FILE

    work_dir = Path(work_dir)
    scenes = {i: [fingerprint(s.image), fingerprint(s.labels) if s.labels else None]
              for i, s in enumerate(config.tiling.scenes)}
    key = stage_key("plan-tiling", config, ["tiling"], scenes, work_dir, code=stage_code("tile-scene"))
    plan_file, key_file = work_dir / PLAN_FILE, work_dir / PLAN_KEY_FILE
    if not force and plan_file.exists() and key_file.exists() and key_file.read_text() == key:
        return plan_file
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_file, geo_plan.plan_tiling(config))
    atomic_write_text(key_file, key)
    return plan_file


@task(
    name="tile-scene",
    task_run_name="tile-scene-{scene_index}",
    **io_retries(3, jitter=True),
    cache_key_fn=key_fn("tile-scene", scene_inputs, output="work_dir"),
    persist_result=True,
)
def tile_scene(config: Config, scene_index: int, work_dir: Path) -> Path:
    """Cut one scene into tiles (IO-bound: retried with backoff, e.g. for a flaky network mount)."""
    from pipeline.geo import scene

    return Path(scene.tile_scene(config, scene_index, Path(work_dir)))


@task(
    name="finalize-tiling",
    **io_retries(2),
    cache_key_fn=key_fn("finalize-tiling", lambda p: dict(enumerate(map(str, p["scene_outputs"]))), "out_dir"),
    persist_result=True,
)
def finalize_tiling(config: Config, scene_outputs: list[Path], out_dir: Path) -> Path:
    """Merge the per-scene tiles into shards, stats.json, qa.json, splits.json and manifest.jsonl."""
    from pipeline.geo import finalize

    return Path(finalize.finalize_tiling(config, [Path(p) for p in scene_outputs], Path(out_dir)))


@task(
    name="build-dataset",
    cache_key_fn=key_fn("build-dataset", lambda p: {"tiles": p["tiles_dir"]}, "tiles_dir"),
    persist_result=True,
)
def build_dataset(config: Config, tiles_dir: Path) -> Path:
    """Check the tiles make a usable tf.data input (writes tiles/dataset.json)."""
    import_tensorflow()  # quietly, also when a Prefect worker (not the CLI) runs the flow
    from pipeline.data import check

    return Path(check.run_dataset_check(config, Path(tiles_dir)))


@task(
    name="train",
    cache_key_fn=key_fn(
        "train", lambda p: {"tiles": p["tiles_dir"]}, "model_dir"
    ),
    persist_result=True,
)
def train(config: Config, tiles_dir: Path, model_dir: Path, progress_id: Any = None) -> Path:
    """Train the detector (called directly from the flow, so it runs on the flow's main thread).

    Holds the run folder (model_dir's parent) while it trains; logs the trainer's telemetry (one line per
    `train.log_every` steps: step, loss, img/s, clip fraction, LR, ETA) to the run's Prefect log."""
    import_tensorflow()  # quietly, also when a Prefect worker (not the CLI) runs the flow
    from pipeline.train import run

    logger = run_logger()
    model_dir = Path(model_dir)
    on_step = None
    if progress_id is not None:
        start, span = _PROGRESS["dataset"], _PROGRESS["trained"] - _PROGRESS["dataset"]
        total = max(config.train.steps, 1)

        def on_step(step: int) -> None:
            update_progress_artifact(progress_id, start + span * min(step / total, 1.0))

    with (run_folder_lock(model_dir.parent, logger), pipeline_logs_to_run(),
          follow_training(model_dir, config.train.steps, logger, on_step)):
        return Path(run.run_training(config, Path(tiles_dir), model_dir))


@task(
    name="evaluate",
    cache_key_fn=key_fn(
        "evaluate",
        lambda p: {"model": p["model_dir"], "tiles": p["tiles_dir"]},
        "out_dir",
    ),
    persist_result=True,
)
def evaluate(config: Config, model_dir: Path, tiles_dir: Path, out_dir: Path) -> Path:
    """Score the exported model per tile and per scene (metrics.json, report.md, pr_curve.png).

    Holds the run folder (out_dir's parent) while it writes."""
    import_tensorflow()  # quietly, also when a Prefect worker (not the CLI) runs the flow
    from pipeline.evaluate import run

    with run_folder_lock(Path(out_dir).parent, run_logger()), pipeline_logs_to_run():
        return Path(run.run_evaluation(config, Path(model_dir), Path(tiles_dir), Path(out_dir)))


# ------------------------------------------------------------------------------------------------ flow
class RunTimeout(TimeoutError):
    """The run went past its time limit (a TimeoutError: Prefect marks the run TimedOut)."""


def add_scenes(config: Config, scenes: list[str | dict[str, Any]] | None) -> Config:
    """`config` with `scenes` appended to tiling.scenes (the payload of an imagery event).

    Each item is an image path or a mapping {image, labels, split}; relative paths are taken from the
    working directory (where the run executes: /work in the container). A scene whose image the config
    already lists is not added again (its new content is picked up by the cache keys anyway).
    """
    if not scenes:
        return config

    def fix(value: Any) -> Any:
        if value is None or "://" in str(value) or str(value).startswith("/vsi"):
            return value
        return str(Path(os.path.expanduser(str(value))).resolve())

    data = config.model_dump(mode="json")
    listed = {fix(s["image"]) for s in data["tiling"]["scenes"]}
    for item in scenes:
        spec = {"image": item} if isinstance(item, str) else dict(item)
        if "image" not in spec:
            raise SatdetError(f"scenes: {item!r} has no image; give a path or a mapping with image (and labels)")
        spec.update({k: fix(spec[k]) for k in ("image", "labels") if spec.get(k) is not None})
        if spec["image"] not in listed:
            data["tiling"]["scenes"].append(spec)
            listed.add(spec["image"])
    return config_from_dict(data, "scenes")


def run_timeout_s(config: Config, timeout_minutes: float | None) -> float | None:
    """The run's time limit in seconds: `timeout_minutes` when given (0 = none); otherwise, with
    `train.time_budget_minutes` set, twice the budget plus an hour (tiling and evaluation come on top of
    the budgeted training); otherwise none."""
    if timeout_minutes is not None:
        return timeout_minutes * 60 if timeout_minutes > 0 else None
    budget = config.train.time_budget_minutes
    return (2 * budget + 60) * 60 if budget else None


@flow(name="satdet-train", on_failure=[on_run_failure], on_crashed=[on_run_failure])
def train_pipeline(
    config_path: str,
    overrides: list[str] | None = None,
    force: bool = False,
    scenes: list[str | dict[str, Any]] | None = None,
    timeout_minutes: float | None = None,
) -> dict[str, Any]:
    """Tile → dataset check → train → evaluate for one config; returns paths and the headline metrics.

    Args:
        config_path: YAML config (scene paths are relative to its folder, runs_dir to the working dir).
        overrides: `section.key=value` overrides applied on top of the file.
        force: re-run every stage even when a cached result matches.
        scenes: extra scenes appended to tiling.scenes: image paths or {image, labels, split} mappings
            (relative paths from the working directory). Filled from the event by `retrain-on-imagery`.
        timeout_minutes: fail the run (state TimedOut) after this long holding the run folder; 0 = no
            limit; default: 2 × train.time_budget_minutes + 60 when a budget is set, else no limit.
    """
    logger = get_run_logger()
    config = add_scenes(load_config(config_path, overrides or []), scenes)
    if not config.tiling.scenes:
        raise SatdetError(f"{config_path}: tiling.scenes is empty; list at least one scene (image + labels)")
    run_dir = config.run_dir.resolve()
    limit_s = run_timeout_s(config, timeout_minutes)
    # Overlapping runs of this folder wait here; the time limit starts once the folder is ours.
    with run_folder_lock(run_dir, logger), timeout(limit_s, timeout_exc_type=RunTimeout), pipeline_logs_to_run():
        return _train_pipeline(config, run_dir, force, logger)


def _train_pipeline(config: Config, run_dir: Path, force: bool, logger: Any) -> dict[str, Any]:
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
    plan_tiling(config, work_dir, force=force)  # once, before the scene tasks (they all read it)
    scene_outputs = tile_all_scenes(config, work_dir, force or not tiles_done.exists())
    tiles = fresh(finalize_tiling, tiles_done)(config, scene_outputs, tiles_dir)
    _prune_siblings(work_dir)
    update_progress_artifact(progress_id, _PROGRESS["tiled"])

    fresh(build_dataset, tiles_dir / "dataset.json")(config, tiles)
    update_progress_artifact(progress_id, _PROGRESS["dataset"])

    # Called, not submitted: a direct call runs in this (the main) thread, which TensorFlow and the GPU
    # want, and the flow's time limit can interrupt it there.
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
def tile_all_scenes(config: Config, work_dir: Path, refresh: bool = False) -> list[Path]:
    """Tile every scene of the plan in `work_dir`: a tile-scene task per scene, or a tile-row-block task per
    row block of a large one (then merge-row-blocks). On the default runner at most tiling.workers tasks at
    a time; on Dask all are submitted and the cluster decides. The scene folders, in scene order."""
    dask = on_dask()
    units = tiling_units(config, work_dir, dask)
    limit = len(units) if dask else max(1, min(config.tiling.workers or os.cpu_count() or 1, len(units)))
    scene_task, block_task = (t.with_options(refresh_cache=True) if refresh else t for t in (tile_scene, tile_row_block))

    def submit(unit: Any) -> Any:
        index, rows = unit
        return scene_task.submit(config, index, work_dir) if rows is None else \
            block_task.submit(config, index, rows[0], rows[1], work_dir)

    outputs = _bounded_map(submit, units, limit)
    return merged_outputs(config, units, outputs, work_dir, refresh)


def _bounded_map(submit: Any, items: list[Any], limit: int) -> list[Path]:
    """submit(item) for every item with at most `limit` runs in flight (tiling.workers): item k + limit is
    submitted once item k is done. Results in item order; the first failure raises."""
    futures: list[Any] = []
    for k, item in enumerate(items):
        if k >= limit:
            futures[k - limit].result()  # wait for a free slot (raises if that task failed)
        futures.append(submit(item))
    return [f.result() for f in futures]


def _prune_siblings(work_dir: Path) -> None:
    """Delete the work folders of earlier tiling configurations (their tiles were replaced)."""
    for other in work_dir.parent.glob("tiling-*"):
        if other != work_dir and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
