"""Scale-out on Dask (prefect-dask) on a real LocalCluster of 2 worker processes: the per-scene tiling and
prediction tasks run on the workers, and what they write is byte-identical to the local run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import distributed
import prefect_dask  # noqa: F401
import pytest

import pipeline.evaluate.run as eval_stage
import pipeline.train.run as train_stage
from flows import training

from .flowkit import fake_evaluation, fake_training, tiny_config, write_config


@pytest.fixture(scope="module")
def cluster():
    """2 single-threaded worker processes, as `satdet run --dask` makes for tiling.workers: 2."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c


def _digests(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".") and p.name not in skip}


def _executed(cluster) -> dict[str, int]:
    """Tasks each worker process has executed so far."""
    with distributed.Client(cluster) as client:
        return client.run(lambda dask_worker: dask_worker.state.executed_count)


def test_tiling_on_dask_workers_writes_the_same_tiles(prefect_api, scenes, tmp_path, monkeypatch, cluster):
    from flows.scaleout import dask_task_runner

    monkeypatch.setattr(train_stage, "run_training", fake_training)
    monkeypatch.setattr(eval_stage, "run_evaluation", fake_evaluation)
    # Same run folder for both runs (the tiles record their own paths), one after the other.
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "runs", scenes, name="scale"))
    tiles = tmp_path / "runs" / "scale" / "tiles"

    local = training.train_pipeline(config_path=str(cfg), force=True, return_state=True)
    assert local.is_completed(), local.message
    expected = _digests(tiles)
    assert any(k.endswith(".tfrecord") for k in expected) and "manifest.jsonl" in expected

    before = sum(_executed(cluster).values())
    on_dask = training.train_pipeline.with_options(task_runner=dask_task_runner(cluster.scheduler_address))
    state = on_dask(config_path=str(cfg), force=True, return_state=True)
    assert state.is_completed(), state.message
    assert _digests(tiles) == expected

    # The three scene tasks ran in the worker processes (two of them at least, one each or more).
    assert sum(_executed(cluster).values()) - before >= 3


def test_one_scene_in_row_blocks_on_dask_workers_writes_the_same_tiles(prefect_api, scenes, tmp_path, monkeypatch,
                                                                       cluster):
    """tiling.row_block_windows: 2 splits each 128 px scene (2 × 2 windows of 64 px) into two row blocks, tiled on
    the workers and merged there: the tiles of the local run (whole scenes, one task each), byte for byte."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.scaleout import dask_task_runner

    monkeypatch.setattr(train_stage, "run_training", fake_training)
    monkeypatch.setattr(eval_stage, "run_evaluation", fake_evaluation)
    data = tiny_config(tmp_path / "runs", scenes, name="blocks")
    data["tiling"]["shard_size"] = 1  # the merge re-cuts the blocks' records into parts: every record counts
    cfg = write_config(tmp_path / "c.yaml", data)
    tiles = tmp_path / "runs" / "blocks" / "tiles"
    local = training.train_pipeline(config_path=str(cfg), force=True, return_state=True)
    assert local.is_completed(), local.message
    expected = _digests(tiles)

    before = sum(_executed(cluster).values())
    on_dask = training.train_pipeline.with_options(task_runner=dask_task_runner(cluster.scheduler_address))
    state = on_dask(config_path=str(cfg), overrides=["tiling.row_block_windows=2"], force=True, return_state=True)
    assert state.is_completed(), state.message
    assert _digests(tiles) == expected
    assert sum(_executed(cluster).values()) - before >= 3 * 2 + 3  # 2 blocks and a merge per scene

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    names = {r.name for r in runs}
    assert {f"tile-scene-{i}-rows-{a}-{b}" for i in range(3) for a, b in ((0, 1), (1, 2))} <= names
    assert {"merge-row-blocks-0", "merge-row-blocks-1", "merge-row-blocks-2"} <= names
    assert not any(n.startswith("tile-scene-") and "rows" not in n for n in names)  # no whole-scene task


@pytest.mark.slow
def test_prediction_on_dask_workers_writes_the_same_detections(prefect_api, scenes, tmp_path, cluster):
    """A real (tiny, untrained) detector exported as a SavedModel; three scenes predicted in the flow's
    process, then on the two workers (each loads the SavedModel once): the same GeoJSON bytes."""
    import tensorflow as tf

    from flows.prediction import predict_scenes
    from flows.scaleout import dask_task_runner
    from pipeline.config import config_from_dict
    from pipeline.geo.tiling import run_tiling
    from pipeline.model.detector import build_detector
    from pipeline.model.export import export_model

    config = config_from_dict(tiny_config(tmp_path / "runs", scenes, name="pred"))
    stats = json.loads((run_tiling(config, tmp_path / "tiles") / "stats.json").read_text())
    tf.keras.utils.set_random_seed(0)
    detector = build_detector(config.model.model_copy(update={"score_threshold": 0.0}),
                              num_classes=len(config.classes), bands=int(stats["channels"]))
    model = export_model(detector, stats, list(config.classes), tmp_path / "model" / "export", tile_size=64)
    images = [s["image"] for s in scenes]

    local = predict_scenes(str(model), images, str(tmp_path / "local"), predict={"score_threshold": 0.0})
    before = sum(_executed(cluster).values())
    on_dask = predict_scenes.with_options(task_runner=dask_task_runner(cluster.scheduler_address))
    remote = on_dask(str(model), images, str(tmp_path / "dask"), predict={"score_threshold": 0.0})
    assert sum(_executed(cluster).values()) - before >= 3
    assert [Path(p).name for p in remote] == [Path(p).name for p in local] == ["scene0.geojson", "scene1.geojson",
                                                                               "scene2.geojson"]
    assert _digests(tmp_path / "dask") == _digests(tmp_path / "local")
    assert any(json.loads(Path(p).read_text())["features"] for p in local)  # boxes to compare, not empty files


def test_cli_dask_options_pick_the_task_runner(tmp_path, monkeypatch):
    """`satdet run --dask`: a LocalCluster of tiling.workers processes; `--dask-address`: that cluster."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    used: list = []

    class FakeFlow:
        def with_options(self, task_runner=None):
            used.append(task_runner)
            return self

        def __call__(self, **kwargs):
            return {"AP50": None, "eval_split": "test", "report": "r", "run_dir": "d"}

    monkeypatch.setattr(training, "train_pipeline", FakeFlow())
    data = tiny_config(tmp_path / "runs", [{"image": "a.tif", "labels": "a.geojson"}])
    data["tiling"]["workers"] = 3
    cfg = write_config(tmp_path / "c.yaml", data)
    runner = CliRunner()
    assert runner.invoke(app, ["run", str(cfg), "--dask"]).exit_code == 0
    assert runner.invoke(app, ["run", str(cfg), "--dask-address", "tcp://scheduler:8786"]).exit_code == 0
    assert runner.invoke(app, ["run", str(cfg)]).exit_code == 0
    local, remote = used
    assert local.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 1, "processes": True,
                                    "dashboard_address": None}
    assert remote.address == "tcp://scheduler:8786"


@pytest.mark.slow
def test_clipping_study_trains_its_runs_on_dask_workers(prefect_api, scenes, tmp_path, cluster):
    """`satdet experiment clipping --dask-address`: each run of the study is a task that trains for real (tiny
    detector, 10 steps) in a worker process; results.csv and the report come out as on the default runner.
    (About 2 minutes on 2 busy cores: each worker imports TensorFlow and traces the detector.)"""
    import csv

    from typer.testing import CliRunner

    from pipeline.cli import app

    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "runs", scenes, name="study"))
    before = _executed(cluster)
    result = CliRunner().invoke(app, ["experiment", "clipping", str(cfg), "--strategies", "none,global_norm",
                                      "--lrs", "0.01", "--steps", "10", "--dask-address", cluster.scheduler_address])
    assert result.exit_code == 0, result.output
    after = _executed(cluster)
    assert sum(after.values()) - sum(before.values()) >= 2  # the two runs (tiling and report stay in the flow)
    study = tmp_path / "runs" / "study" / "study"
    assert f"report.md: {study / 'report.md'}" in result.output
    with (study / "results.csv").open(newline="") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert sorted(rows) == ["global_norm-lr0.01-s0", "none-lr0.01-s0"]
    assert {r["status"] for r in rows.values()} == {"ok"}, rows
    assert all(int(r["steps_done"]) == 10 for r in rows.values())
    for run in rows:
        log = (study / "runs" / run / "train_log.jsonl").read_text().splitlines()
        assert json.loads(log[-1])["step"] == 10


def test_clipping_study_report_only_on_dask_is_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "runs", [{"image": "a.tif", "labels": None}]))
    result = CliRunner().invoke(app, ["experiment", "clipping", str(cfg), "--report-only", "--dask"])
    assert result.exit_code != 0
    assert "--report-only trains nothing: drop --dask" in result.output
    assert "Traceback" not in result.output


def test_cli_clipping_study_dask_sizes_the_local_cluster_by_runs(tmp_path, monkeypatch):
    """`experiment clipping --dask`: a LocalCluster of tiling.workers processes, at most one per run, and
    the study's options reach the flow."""
    from typer.testing import CliRunner

    import flows.study as study_flow
    from pipeline.cli import app

    calls: list = []

    class FakeFlow:
        def with_options(self, task_runner=None):
            calls.append(task_runner)
            return self

        def __call__(self, **kwargs):
            calls.append(kwargs)
            return {"study": str(tmp_path / "study")}

    monkeypatch.setattr(study_flow, "clipping_study", FakeFlow())
    data = tiny_config(tmp_path / "runs", [{"image": "a.tif", "labels": "a.geojson"}])
    data["tiling"]["workers"] = 8
    cfg = write_config(tmp_path / "c.yaml", data)
    result = CliRunner().invoke(app, ["experiment", "clipping", str(cfg), "--strategies", "none,agc,value",
                                      "--lrs", "0.01", "--steps", "12", "--dask", "--set", "train.steps=3"])
    assert result.exit_code == 0, result.output
    runner, kwargs = calls
    assert runner.cluster_kwargs["n_workers"] == 3  # three runs, not eight workers
    assert kwargs["strategies"] == ["none", "agc", "value"] and kwargs["steps"] == 12
    assert kwargs["overrides"] == ["train.steps=3"] and kwargs["config_path"] == str(cfg)
