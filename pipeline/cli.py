"""The `satdet` command line (typer). Heavy imports happen inside commands so `--help` is instant.

Every user-facing problem is raised as `SatdetError` (or `ConfigError`) somewhere in pipeline/ and is
printed here as one line on stderr with a non-zero exit code.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline import __version__
from pipeline.config import Config, ConfigError, load_config
from pipeline.errors import SatdetError
from pipeline.study import plan as study_plan
from pipeline.tf_quiet import import_tensorflow

# TensorFlow's C++ start-up chatter (oneDNN, CUDA stubs) buries the output users need; real errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="satdet: tile GeoTIFFs, train a Faster R-CNN with gradient clipping, evaluate, predict.",
)

ConfigArg = Annotated[Path, typer.Argument(help="YAML config file.", exists=False)]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a config value: section.key=value (repeatable).")
]


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn SatdetError/ConfigError into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (SatdetError, ConfigError) as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


def load(config: Path, overrides: list[str] | None) -> Config:
    """Load a config for a command (errors become one line)."""
    return load_config(config, overrides or [])


def _version(value: bool) -> None:
    if value:
        typer.echo(f"satdet {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """satdet command line."""


@app.command("config")
@friendly_errors
def config_cmd(config: ConfigArg, set_: SetOpt = None) -> None:
    """Print the resolved config (every default filled in) as YAML."""
    import yaml

    cfg = load(config, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


# ------------------------------------------------------------------------------------------- tiling
@app.command("tile")
@friendly_errors
def tile_cmd(
    config: ConfigArg,
    set_: SetOpt = None,
    check: Annotated[bool, typer.Option(
        "--check", help="First read every block of every scene; report each unreadable one and stop (exit 2).")] = False,
) -> None:
    """Tile the configured scenes into TFRecords (run_dir/tiles) and write the resolved config."""
    from pipeline.config import save_config
    from pipeline.geo.tiling import run_tiling, summary_lines

    cfg = load(config, set_)
    if check:
        from pipeline.geo.check import check_rasters

        results = check_rasters([s.image for s in cfg.tiling.scenes])
        bad = [r for r in results if not r.ok]
        for r in bad:
            typer.secho(f"error: {r.error}", fg=typer.colors.RED, err=True)
        if bad:
            typer.secho(f"error: {len(bad)} of {len(results)} scene(s) unreadable; nothing was tiled",
                        fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        typer.echo(f"check: {len(results)} scene(s) read in full, no errors")
    tiles = run_tiling(cfg)
    save_config(cfg, cfg.run_dir / "config.yaml")
    for line in summary_lines(tiles):
        typer.echo(line)
    typer.echo(f"config: {cfg.run_dir / 'config.yaml'}")


@app.command("inspect")
@friendly_errors
def inspect_cmd(
    scenes: Annotated[list[Path], typer.Argument(help="Rasters to check (any GDAL path or URL).")],
) -> None:
    """Print each raster's size, bands, dtype, CRS and nodata, then read every block: OK, or the error (exit 2)."""
    from pipeline.geo.check import check_rasters, describe

    results = check_rasters(scenes)
    for r in results:
        if r.info is not None:
            typer.echo(f"{r.path}: {describe(r.info)}: {'OK' if r.ok else 'UNREADABLE'}")
        if not r.ok:
            typer.secho(f"error: {r.error}", fg=typer.colors.RED, err=True)
    if not all(r.ok for r in results):
        raise typer.Exit(2)


@app.command("synth")
@friendly_errors
def synth_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the scenes (created).")],
    n_scenes: Annotated[int, typer.Option("--n-scenes", min=1, help="Number of scenes.")] = 2,
    size: Annotated[int, typer.Option("--size", min=64, help="Scene width and height in pixels.")] = 512,
    seed: Annotated[int, typer.Option("--seed", help="Seed (same seed, same scenes).")] = 0,
    dtype: Annotated[str, typer.Option("--dtype", help="uint8 or uint16.")] = "uint8",
    bands: Annotated[int, typer.Option("--bands", min=3, help="Bands (≥ 3; extra bands are NIR-like).")] = 3,
    nodata_border: Annotated[int, typer.Option("--nodata-border", min=0, help="Nodata border width (px).")] = 0,
) -> None:
    """Write synthetic UTM GeoTIFF scenes with crowns, roofs and vehicles, labels as EPSG:4326 GeoJSON."""
    from pipeline.geo.synth import make_scenes

    if dtype not in ("uint8", "uint16"):
        raise SatdetError(f"--dtype {dtype}: synthetic scenes are uint8 or uint16")
    scenes = make_scenes(out_dir, n_scenes, size, seed, dtype, bands, nodata_border)
    typer.echo(f"classes: [{', '.join(scenes[0].classes)}]")
    typer.echo("scenes:")
    for s in scenes:
        typer.echo(f"  - image: {s.image}\n    labels: {s.labels}   # {len(s.boxes_px)} objects")


# ----------------------------------------------------------------------------------- input pipeline
@app.command("dataset")
@friendly_errors
def dataset_cmd(
    config: ConfigArg,
    set_: SetOpt = None,
    preview: Annotated[int, typer.Option("--preview", min=0, help="Draw N images with their boxes to a PNG.")] = 0,
    split: Annotated[str, typer.Option("--split", help="Split to preview (train is shown augmented).")] = "train",
) -> None:
    """Check the tiles for training (writes run_dir/tiles/dataset.json); --preview N draws what the model sees."""
    from pipeline.data.check import run_dataset_check

    cfg = load(config, set_)
    import_tensorflow()
    tiles = cfg.run_dir / "tiles"
    typer.echo(run_dataset_check(cfg, tiles))
    if preview:
        from pipeline.data.preview import write_preview

        typer.echo(write_preview(cfg, tiles, n=preview, split=split))


# ----------------------------------------------------------------------------------------- training
@app.command("train")
@friendly_errors
def train_cmd(
    config: ConfigArg,
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in run_dir/model/checkpoints.")
    ] = False,
) -> None:
    """Train on run_dir/tiles with the configured clipping; writes run_dir/model (checkpoints, TensorBoard,
    train_log.jsonl, export). Progress: step, loss, img/s, clip fraction."""
    from pipeline.config import save_config

    cfg = load(config, set_)
    tiles = cfg.run_dir / "tiles"
    if not (tiles / "stats.json").exists():
        raise SatdetError(f"{tiles}: no tiles yet; run `satdet tile {config}` first")
    model_dir = cfg.run_dir / "model"
    if not resume and (model_dir / "checkpoints" / "checkpoint").exists():
        raise SatdetError(
            f"{model_dir}: already holds checkpoints; pass --resume to continue, or remove the folder to start over"
        )
    save_config(cfg, cfg.run_dir / "config.yaml")
    import_tensorflow()  # before pipeline.train.run, which imports TensorFlow at module level
    from pipeline.train.run import run_training

    out = run_training(cfg, tiles, model_dir, resume=resume)
    typer.echo(f"model: {out}")
    typer.echo(f"export: {out / 'export'}")


# ------------------------------------------------------------------------------- evaluate / predict
NormalizeOpt = Annotated[str | None, typer.Option(
    "--normalize", help="train (training statistics) or scene (the scene's own; test-time adaptation).")]
AdaptBnOpt = Annotated[bool | None, typer.Option(
    "--adapt-bn/--no-adapt-bn", help="Re-estimate BatchNorm statistics on each scene before predicting (AdaBN).")]
TtaOpt = Annotated[bool | None, typer.Option("--tta/--no-tta", help="Test-time flips fused by WBF.")]
MatchResOpt = Annotated[bool | None, typer.Option(
    "--match-resolution/--no-match-resolution",
    help="Resample scenes whose pixel size differs from the training one (default on).")]


def _adaptation_updates(normalize: str | None, adapt_bn: bool | None, tta: bool | None,
                        match_resolution: bool | None = None) -> dict[str, Any]:
    if normalize is not None and normalize not in ("train", "scene"):
        raise SatdetError(f"--normalize {normalize!r}: use train or scene")
    given = {"normalize": normalize, "adapt_bn": adapt_bn, "tta": tta, "match_resolution": match_resolution}
    return {k: v for k, v in given.items() if v is not None}


@app.command("evaluate")
@friendly_errors
def evaluate_cmd(
    config: ConfigArg,
    scene: Annotated[list[Path] | None, typer.Option(
        "--scene", help="Also score this labelled scene whole (e.g. another site; repeatable, pairs with --labels).")] = None,
    labels: Annotated[list[Path] | None, typer.Option(
        "--labels", help="Labels of the --scene at the same position (any format tiling reads).")] = None,
    only_scenes: Annotated[bool, typer.Option(
        "--only-scenes", help="Score only the --scene / evaluate.scenes scenes, not the split's blocks and tiles.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default run_dir/eval).")] = None,
    normalize: NormalizeOpt = None,
    adapt_bn: AdaptBnOpt = None,
    tta: TtaOpt = None,
    match_resolution: MatchResOpt = None,
    set_: SetOpt = None,
) -> None:
    """Score run_dir/model/export per scene (stitched, what `predict` delivers) and per tile; writes run_dir/eval/.

    --scene/--labels score the model on labelled scenes outside its training config (other sites, other
    flights) without editing the config: metrics.json and report.md get one row per scene."""
    cfg = load(config, set_)
    import json

    from pipeline.config import SceneConfig
    from pipeline.evaluate.run import run_evaluation

    scene, labels = list(scene or []), list(labels or [])
    if len(scene) != len(labels):
        raise SatdetError(f"{len(scene)} --scene but {len(labels)} --labels: give one --labels per --scene, in order")
    extra = [SceneConfig(image=s, labels=lab) for s, lab in zip(scene, labels)]
    if only_scenes and not (extra or cfg.evaluate.scenes):
        raise SatdetError("--only-scenes needs at least one --scene/--labels pair or evaluate.scenes in the config")
    cfg = cfg.model_copy(update={
        "evaluate": cfg.evaluate.model_copy(update={"scenes": [*cfg.evaluate.scenes, *extra],
                                                    "only_scenes": only_scenes or cfg.evaluate.only_scenes}),
        "predict": cfg.predict.model_copy(update=_adaptation_updates(normalize, adapt_bn, tta, match_resolution)),
    })
    run_dir = cfg.run_dir
    import_tensorflow()
    out = run_evaluation(cfg, run_dir / "model", run_dir / "tiles", out or run_dir / "eval")
    metrics = json.loads((out / "metrics.json").read_text())
    per_scene = metrics.get("per_scene") or {}
    if len(per_scene) > 1:
        for name, m in per_scene.items():
            typer.echo(f"{name[:24]:24s} AP {m['AP']:.3f}  AP50 {m['AP50']:.3f}  AP75 {m['AP75']:.3f}  "
                       f"F1@0.5 {m['prf']['0.5']['f1']:.3f}  ({m['n_gt']} objects)")
    for level in ("scene", "tile"):
        m = metrics.get(level)
        if m:
            typer.echo(f"{level:5s} AP {m['AP']:.3f}  AP50 {m['AP50']:.3f}  AP75 {m['AP75']:.3f}  "
                       f"F1@0.5 {m['prf']['0.5']['f1']:.3f}  ({m['n_gt']} objects)")
    typer.echo(f"report: {out / 'report.md'}")


@app.command("predict")
@friendly_errors
def predict_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Run's model/ folder or its export/ folder.")],
    scenes: Annotated[list[Path], typer.Argument(help="Scene rasters (any size; GDAL paths/URLs work).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file (.geojson/.gpkg) or folder (one file per scene).")],
    score_threshold: Annotated[float | None, typer.Option("--score-threshold", min=0, max=1, help="Minimum score written.")] = None,
    tile: Annotated[int | None, typer.Option("--tile", min=1, help="Window size (px); default: the model's tile size.")] = None,
    overlap: Annotated[int | None, typer.Option("--overlap", min=0, help="Window overlap (px).")] = None,
    batch: Annotated[int | None, typer.Option("--batch", min=1, help="Windows per inference batch.")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="geojson (EPSG:4326) or gpkg (scene CRS).")] = None,
    per_scene: Annotated[bool, typer.Option("--per-scene", help="One file per scene; --out is a folder.")] = False,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Config whose `predict:` section to start from.")] = None,
    normalize: NormalizeOpt = None,
    adapt_bn: AdaptBnOpt = None,
    tta: TtaOpt = None,
    match_resolution: MatchResOpt = None,
    set_: SetOpt = None,
) -> None:
    """Detect objects in whole scenes with an exported model; write GeoJSON / GeoPackage with label, score, scene."""
    from pipeline.config import PredictConfig

    base = load(config, set_).predict if config or set_ else _model_predict_settings(model_dir)
    if fmt is not None and fmt not in ("geojson", "gpkg"):
        raise SatdetError(f"--format {fmt!r}: use geojson or gpkg")
    updates = {k: v for k, v in {"score_threshold": score_threshold, "tile_size": tile, "overlap": overlap,
                                 "batch_size": batch}.items() if v is not None}
    updates.update(_adaptation_updates(normalize, adapt_bn, tta, match_resolution))
    cfg = PredictConfig.model_validate({**base.model_dump(), **updates})
    if cfg.score_threshold is None:
        _name_output_threshold(model_dir)
    import_tensorflow()
    from pipeline.predict.scene import predict_scenes

    for path in predict_scenes(model_dir, list(scenes), out, cfg, fmt=fmt, per_scene=per_scene or None):
        typer.echo(path)


def _model_predict_settings(model_dir: Path) -> Any:
    """Without --config: the library defaults with the test-time settings the model was exported with
    (a NEON model brings its flips), named on stderr when they differ from the library's."""
    from pipeline.config import PredictConfig
    from pipeline.predict.exported import stored_test_time_settings

    defaults, stored = PredictConfig(), stored_test_time_settings(model_dir)
    changed = {k: v for k, v in stored.items() if getattr(defaults, k) != v}
    if changed:
        shown = ", ".join(f"{k}={v}" for k, v in changed.items())
        typer.echo(f"test-time settings from the model: {shown} (--config or --normalize/--[no-]adapt-bn/"
                   "--[no-]tta override them)", err=True)
    return PredictConfig.model_validate(stored)  # validated: the file may have been edited


def _name_output_threshold(model_dir: Path) -> None:
    """Say on stderr which score threshold the model brings and how it was chosen."""
    from pipeline.predict.exported import DEFAULT_OUTPUT_THRESHOLD, stored_output_threshold

    stored = stored_output_threshold(model_dir)
    if stored is None:
        typer.echo(f"score threshold {DEFAULT_OUTPUT_THRESHOLD:g} (the model stores none; --score-threshold sets it)",
                   err=True)
        return
    rule = str(stored.get("rule", "best_f1"))
    where = "blocks, predicted as satdet predict does" if stored.get("level") == "scene" else "tiles"
    how = ("best F1" if rule == "best_f1" else f"most recall at precision >= {rule.rsplit('_', 1)[-1]}")
    how += f" on its validation {where}"
    typer.echo(f"score threshold {float(stored['score_threshold']):.3f} from the model ({how}: precision "
               f"{float(stored.get('precision', -1)):.2f}, recall {float(stored.get('recall', -1)):.2f}; "
               "--score-threshold overrides)", err=True)


# --------------------------------------------------------------------------- orchestration (flows/)
# These commands call into flows/ (Prefect) lazily, inside the command body: pipeline/ itself never
# imports prefect, and `satdet --help` stays instant.


DaskOpt = Annotated[
    bool, typer.Option("--dask", help="Run the per-scene tasks on Dask: a LocalCluster (tiling.workers processes) "
                       "or the cluster at --dask-address (needs the dask extra: pip install satdet\\[dask]).")
]
DaskAddressOpt = Annotated[
    str | None, typer.Option("--dask-address", help="Scheduler of an existing Dask cluster (tcp://host:8786); "
                             "implies --dask.")
]


def _prefect_env() -> None:
    """Quiet defaults for Prefect (before it is imported); a user's own settings win."""
    import os

    # The temporary local server's usage telemetry fights the flow for its SQLite file ("database is
    # locked" tracebacks in the middle of a run) and phones home; off unless the user turns it on.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server's first start creates its database; on a busy machine that can take longer than
    # Prefect's 20 s limit ("Timed out while attempting to connect").
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@app.command("run")
@friendly_errors
def run_cmd(
    config: ConfigArg,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Ignore cached stage results and re-run every stage.")] = False,
    timeout_minutes: Annotated[
        float | None,
        typer.Option("--timeout-minutes", min=0, help="Fail the run (TimedOut) after this long; 0 = no limit. "
                     "Default: 2 × train.time_budget_minutes + 60 when a budget is set."),
    ] = None,
    dask: DaskOpt = False,
    dask_address: DaskAddressOpt = None,
) -> None:
    """Run the training pipeline as a Prefect flow: tile → dataset → train → evaluate (finished stages are cached).

    One run at a time per run folder: a second run of the same folder waits for the first."""
    cfg = load(config, set_)  # fail fast, with one line, before Prefect starts
    _prefect_env()
    from flows.training import train_pipeline

    flow_ = train_pipeline
    if dask or dask_address:
        from flows.scaleout import dask_task_runner, local_workers

        flow_ = train_pipeline.with_options(
            task_runner=dask_task_runner(dask_address, local_workers(cfg.tiling.workers)))
    result = flow_(config_path=str(config), overrides=list(set_ or []), force=force, timeout_minutes=timeout_minutes)
    ap50 = result.get("AP50")
    typer.echo(f"AP50 (scene, {result['eval_split']}): {ap50:.3f}" if ap50 is not None else "AP50: not available")
    typer.echo(f"report: {result['report']}")
    typer.echo(f"run dir: {result['run_dir']}")


@app.command("predict-flow")
@friendly_errors
def predict_flow_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Run's model/ folder (or its export/ SavedModel).")],
    scenes: Annotated[list[Path], typer.Argument(help="Scene rasters to predict.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (one file per scene) or one .geojson/.gpkg file.")
    ],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Config whose `predict:` section to use.")
    ] = None,
    set_: SetOpt = None,
    dask: DaskOpt = False,
    dask_address: DaskAddressOpt = None,
) -> None:
    """Predict whole scenes with an exported model, as a Prefect flow (one task per scene)."""
    cfg = load(config, set_) if config or set_ else None
    _prefect_env()
    from flows.prediction import predict_scenes

    if dask or dask_address:
        from flows.scaleout import dask_task_runner, local_workers

        workers = min(local_workers(cfg.tiling.workers if cfg else 0), max(len(scenes), 1))
        predict_scenes = predict_scenes.with_options(task_runner=dask_task_runner(dask_address, workers))
    written = predict_scenes(
        model_dir=str(model_dir),
        scenes=[str(s) for s in scenes],
        out=str(out),
        predict=cfg.predict.model_dump(mode="json") if cfg else None,
    )
    for path in written:
        typer.echo(path)


@app.command("schedule")
@friendly_errors
def schedule_cmd(
    config: ConfigArg,
    cron: Annotated[str, typer.Option("--cron", help="Cron schedule (UTC unless --timezone).")] = "0 3 * * 0",
    name: Annotated[str | None, typer.Option("--name", help="Deployment name; default retrain-<run name>.")] = None,
    timezone: Annotated[str, typer.Option("--timezone", help="IANA timezone of the cron schedule.")] = "UTC",
    set_: SetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the deployment instead of serving it.")] = False,
) -> None:
    """Serve the training flow as a scheduled deployment (needs a Prefect server: PREFECT_API_URL)."""
    cfg = load(config, set_)
    _prefect_env()
    from flows.schedule import describe_deployment, serve_training

    if dry_run:
        typer.echo(describe_deployment(config, cfg, cron=cron, name=name, timezone=timezone, overrides=set_))
        return
    serve_training(config, cfg, cron=cron, name=name, timezone=timezone, overrides=set_)


# --------------------------------------------------------------------------------------- work pools
pool_app = typer.Typer(no_args_is_help=True, help="Prefect work pools for GPU hosts (needs PREFECT_API_URL).")
app.add_typer(pool_app, name="pool")


def _report_pool(name: str) -> None:
    """Print a pool's problems; exit 1 when it would drop the GPUs."""
    from flows.pool import check_pool

    errors, warnings = check_pool(name)
    for line in warnings:
        typer.secho(f"warning: pool {name}: {line}", fg=typer.colors.YELLOW, err=True)
    for line in errors:
        typer.secho(f"error: pool {name}: {line}", fg=typer.colors.RED, err=True)
    if errors:
        typer.secho(f"fix: satdet pool create {name} --overwrite", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"pool {name}: ok (the job template passes container_create_kwargs: GPUs and entrypoint)")


@pool_app.command("create")
@friendly_errors
def pool_create_cmd(
    name: Annotated[str, typer.Argument(help="Work pool name (prefect.yaml uses gpu-docker).")],
    gpus: Annotated[
        str, typer.Option("--gpus", help="GPUs per flow run, as docker run --gpus: all, none, a count, device=0,1.")
    ] = "all",
    shm_size: Annotated[str, typer.Option("--shm-size", help="Container shared memory (tf.data workers).")] = "2g",
    concurrency_limit: Annotated[
        int | None, typer.Option("--concurrency-limit", min=0, help="Flow runs at once across the whole pool.")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the job template of an existing pool.")]
    = False,
    template_out: Annotated[
        Path | None,
        typer.Option("--template-out", help="Write the base job template here instead of creating the pool "
                     "(for prefect work-pool create NAME --type docker --base-job-template FILE)."),
    ] = None,
) -> None:
    """Create a Docker work pool whose base job template carries container_create_kwargs (GPUs, entrypoint)
    with satdet's GPU request as default, and auto_remove off."""
    import json

    _prefect_env()
    from flows.pool import create_pool, docker_default_template, gpu_job_template

    if template_out is not None:
        base, source = docker_default_template()
        template_out.write_text(json.dumps(gpu_job_template(gpus, shm_size, base), indent=2) + "\n")
        typer.echo(f"{template_out}: Docker base job template (from {source}) with container_create_kwargs")
        return
    pool, source = create_pool(name, gpus=gpus, shm_size=shm_size, overwrite=overwrite,
                               concurrency_limit=concurrency_limit)
    typer.echo(f"work pool {pool.name} ({pool.type}): template from {source} + container_create_kwargs")
    _report_pool(name)


@pool_app.command("check")
@friendly_errors
def pool_check_cmd(name: Annotated[str, typer.Argument(help="Work pool name.")]) -> None:
    """Fail (exit 1) when the pool's job template would drop container_create_kwargs (the GPUs)."""
    _prefect_env()
    _report_pool(name)


# -------------------------------------------------------------------------------------- experiments
experiment_app = typer.Typer(
    no_args_is_help=True, help="Controlled experiments over the trainer (outputs in run_dir/study)."
)
app.add_typer(experiment_app, name="experiment")


def _split_list(text: str, cast: Callable[[str], Any], option: str) -> tuple[Any, ...]:
    """'a,b,c' → cast items; a bad item is a one-line error naming the option."""
    try:
        return tuple(cast(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise SatdetError(f"{option} {text!r}: expected a comma-separated list") from None


@experiment_app.command("clipping")
@friendly_errors
def experiment_clipping_cmd(
    config: ConfigArg,
    set_: SetOpt = None,
    strategies: Annotated[
        str, typer.Option("--strategies", help="Comma-separated clipping strategies to compare.")
    ] = ",".join(study_plan.STRATEGIES),
    lrs: Annotated[str, typer.Option("--lrs", help="Comma-separated peak learning rates (a normal and a high one).")]
    = ",".join(f"{lr:g}" for lr in study_plan.LRS),
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps per run (the same for every run).")]
    = study_plan.STEPS,
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds (several give a spread).")]
    = ",".join(map(str, study_plan.SEEDS)),
    target_fraction: Annotated[
        float, typer.Option("--target-fraction", help="Target loss = this × the initial loss (see report.md).")
    ] = study_plan.TARGET_FRACTION,
    force: Annotated[bool, typer.Option("--force", help="Re-run runs that already have a result.")] = False,
    report_only: Annotated[
        bool, typer.Option("--report-only", help="Train nothing: rewrite the report from the stored runs.")
    ] = False,
    dask: Annotated[
        bool, typer.Option("--dask", help="Train the runs side by side as Prefect tasks on Dask: a LocalCluster "
                           "(tiling.workers processes, at most one per run) or the cluster at --dask-address.")
    ] = False,
    dask_address: DaskAddressOpt = None,
) -> None:
    """Train once per (strategy, learning rate, seed) on the same tiles and step budget; writes run_dir/study/
    (results.csv, report.md, curves.png). Tiles first if run_dir/tiles is missing."""
    from pipeline.study.runner import run_study

    cfg = load(config, set_)
    plan = study_plan.StudyPlan(
        strategies=_split_list(strategies, str, "--strategies"),
        lrs=_split_list(lrs, float, "--lrs"),
        seeds=_split_list(seeds, int, "--seeds"),
        steps=steps,
        target_fraction=target_fraction,
    )
    tiles, study = cfg.run_dir / "tiles", cfg.run_dir / "study"
    if (dask or dask_address) and report_only:
        raise SatdetError("--report-only trains nothing: drop --dask / --dask-address")
    if dask or dask_address:
        typer.echo(f"{len(plan.runs())} runs × {steps} steps on Dask → {study}")
        out = _clipping_study_on_dask(config, set_, plan, force, dask_address, cfg.tiling.workers)
    elif report_only:
        out = run_study(cfg, tiles, study, plan, report_only=True)
    else:
        out = _clipping_study_here(cfg, plan, force)
    for name in ("results.csv", "report.md", "curves.png"):
        typer.echo(f"{name}: {out / name}")


def _clipping_study_here(cfg: Config, plan: Any, force: bool) -> Path:
    """The clipping study in this process, with its progress display (tiles first if there are none); the
    study folder."""
    from pipeline.config import save_config
    from pipeline.study.progress import StudyProgress
    from pipeline.study.runner import run_study

    tiles, study = cfg.run_dir / "tiles", cfg.run_dir / "study"
    if not (tiles / "stats.json").exists():
        from pipeline.geo.tiling import run_tiling

        typer.echo(f"no tiles in {tiles}: tiling first")
        run_tiling(cfg, tiles)
    save_config(cfg, cfg.run_dir / "config.yaml")
    import_tensorflow()
    typer.echo(f"{len(plan.runs())} runs × {plan.steps} steps → {study}")
    with StudyProgress(plan.steps) as progress:
        return run_study(cfg, tiles, study, plan, force=force, on_event=progress)


def _clipping_study_on_dask(config: Path, set_: list[str] | None, plan: Any, force: bool, address: str | None,
                            tiling_workers: int) -> Path:
    """The clipping study as its Prefect flow on a DaskTaskRunner (one task per run); the study folder."""
    _prefect_env()
    from flows.scaleout import dask_task_runner, local_workers
    from flows.study import clipping_study

    workers = min(local_workers(tiling_workers), len(plan.runs()))
    flow_ = clipping_study.with_options(task_runner=dask_task_runner(address, workers))
    result = flow_(config_path=str(config), overrides=list(set_ or []), strategies=list(plan.strategies),
                   lrs=list(plan.lrs), steps=plan.steps, seeds=list(plan.seeds),
                   target_fraction=plan.target_fraction, force=force)
    return Path(result["study"])


# -------------------------------------------------------------------------------------- environment
@app.command("doctor")
def doctor_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print the probe results as JSON.")] = False,
    pool: Annotated[
        str | None,
        typer.Option("--pool", help="Check this Prefect work pool's job template instead (exit 1 if it would "
                     "drop the GPUs); needs PREFECT_API_URL."),
    ] = None,
) -> None:
    """Check the environment: TensorFlow, visible GPUs, CUDA/cuDNN build, rasterio/GDAL, Prefect."""
    import json

    if pool is not None:
        _prefect_env()
        _report_pool(pool)
        return
    from pipeline.doctor import collect, format_report

    info = collect()
    typer.echo(json.dumps(info, indent=2) if as_json else format_report(info))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
