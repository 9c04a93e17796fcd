"""Scale-out on Dask (prefect-dask) on a real LocalCluster of 2 worker processes: the per-scene tiling and
prediction tasks run on the workers, and what they write is byte-identical to the local run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import distributed
import prefect_dask  # noqa: F401
import pytest
from flowkit import fake_evaluation, fake_training, tiny_config, write_config

import pipeline.evaluate.run as eval_stage
import pipeline.train.run as train_stage
from flows import training


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
