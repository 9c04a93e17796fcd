"""The clipping study as a Prefect flow: tile if needed → one task per (strategy, learning rate, seed) run →
report, with the results as a table artifact and the report as a markdown artifact.

Runs are called one after another on the flow's main thread (TensorFlow wants it, and they share the
machine); on a Dask task runner (`satdet experiment clipping --dask`) they are submitted instead, one task
per run, and train side by side in the workers (each run has its own folder; the report waits for all).
A run that diverges or fails is a *result*, not a failed task: the study goes on. Finished runs
whose config and tiles are unchanged are reused (`force=True` re-runs them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.alerts import on_run_failure
from flows.locking import run_folder_lock
from flows.reporting import slug
from flows.runlog import pipeline_logs_to_run
from flows.scaleout import on_dask
from pipeline.config import Config, load_config, save_config
from pipeline.study.plan import LRS, SEEDS, STEPS, STRATEGIES, TARGET_FRACTION, StudyPlan


@task(name="study-tile")
def tile(config: Config, tiles_dir: Path) -> Path:
    """Tile the configured scenes (only called when the run has no tiles yet)."""
    from pipeline.geo import tiling

    return Path(tiling.run_tiling(config, Path(tiles_dir)))


@task(name="study-run", task_run_name="study-run-{run_id}")
def study_run(config: Config, plan: Any, spec: Any, tiles_dir: Path, out_dir: Path, force: bool,
              run_id: str) -> dict[str, Any]:
    """Train one run of the study (or reuse its stored result); returns its result record."""
    from pipeline.study import runner

    return runner.run_or_reuse(config, plan, spec, Path(tiles_dir), Path(out_dir), force)


@task(name="study-report")
def study_report(config: Config, plan: Any, out_dir: Path) -> Path:
    """results.csv, report.md, curves.png from the runs' results and telemetry."""
    from pipeline.study import report

    return Path(report.write_report(config, plan, Path(out_dir)))


@flow(name="satdet-clipping-study", on_failure=[on_run_failure], on_crashed=[on_run_failure])
def clipping_study(
    config_path: str,
    overrides: list[str] | None = None,
    strategies: list[str] | None = None,
    lrs: list[float] | None = None,
    steps: int = STEPS,
    seeds: list[int] | None = None,
    target_fraction: float = TARGET_FRACTION,
    force: bool = False,
) -> dict[str, Any]:
    """Compare clipping strategies on one config: same tiles, model, seeds and step budget for every run.

    Args:
        config_path: YAML config; its `train.clip` block supplies every strategy's thresholds.
        overrides: `section.key=value` overrides applied on top of the file.
        strategies: clipping strategies (default: pipeline.study.plan.STRATEGIES).
        lrs: peak learning rates (default: pipeline.study.plan.LRS, a normal and a high one).
        steps: optimizer steps per run.
        seeds: seeds (several give a spread across runs; default: pipeline.study.plan.SEEDS).
        target_fraction: target loss = this × the initial loss.
        force: re-run runs that already have a stored result.
    """
    logger = get_run_logger()
    config = load_config(config_path, overrides or [])
    plan = StudyPlan(strategies=tuple(strategies or STRATEGIES), lrs=tuple(lrs or LRS),
                     seeds=tuple(seeds if seeds is not None else SEEDS), steps=steps, target_fraction=target_fraction)
    run_dir = config.run_dir.resolve()
    # The study trains on the run folder's tiles: it holds the folder like a training run does.
    with run_folder_lock(run_dir, logger), pipeline_logs_to_run():
        return _clipping_study(config, plan, run_dir, force, logger)


def _run_all(config: Config, plan: Any, runs: list[Any], tiles_dir: Path, out_dir: Path, force: bool
             ) -> list[dict[str, Any]]:
    """Every run's result, in plan order: submitted to the Dask workers all at once, or else called one
    after another on the main thread (TensorFlow wants it, and the runs share the machine)."""
    if on_dask():
        futures = [study_run.submit(config, plan, spec, tiles_dir, out_dir, force, run_id=spec.run_id)
                   for spec in runs]
        return [f.result() for f in futures]
    return [study_run(config, plan, spec, tiles_dir, out_dir, force, run_id=spec.run_id) for spec in runs]


def _clipping_study(config: Config, plan: Any, run_dir: Path, force: bool, logger: Any) -> dict[str, Any]:
    from pipeline.study.report import read_results
    from pipeline.study.runner import check_tiles

    tiles_dir, out_dir = run_dir / "tiles", run_dir / "study"
    if not (tiles_dir / "stats.json").exists():
        tile(config, tiles_dir)
    check_tiles(tiles_dir)
    save_config(config, run_dir / "config.yaml")

    runs = plan.runs()
    logger.info("%d runs × %d steps → %s%s", len(runs), plan.steps, out_dir, " (on Dask)" if on_dask() else "")
    for spec, result in zip(runs, _run_all(config, plan, runs, tiles_dir, out_dir, force), strict=True):
        logger.info("%s: %s", spec.run_id, result.get("status"))
    out = study_report(config, plan, out_dir)

    rows = read_results(out)
    key = slug(f"{config.name}-clipping-study")
    create_table_artifact(key=key, table=rows, description=f"Clipping study {config.name}: one row per run")
    create_markdown_artifact(
        key=f"{key}-report",
        markdown=(out / "report.md").read_text() + f"\n\nCurves: `{out / 'curves.png'}`\n",
        description=f"Clipping study {config.name}: ranking per learning rate",
    )
    return {
        "study": str(out),
        "results": str(out / "results.csv"),
        "report": str(out / "report.md"),
        "curves": str(out / "curves.png"),
        "runs": len(rows),
        "diverged": sum(r["status"] == "diverged" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
    }
