"""The training flow under a Prefect test API: stage files, caching on content, invalidation, retries.

Most tests run the real tiling and dataset stages on synthetic scenes but stand in for training and
evaluation (their own tests live in tests/train and tests/evaluate), so the orchestration is tested in
seconds; `test_pipeline_end_to_end_*` runs every real stage with a tiny model.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

import pipeline.data.check as dataset_stage
import pipeline.evaluate.run as eval_stage
import pipeline.geo.finalize as finalize_stage
import pipeline.geo.plan as plan_stage
import pipeline.geo.scene as scene_stage
import pipeline.train.run as train_stage
from flows import training
from flows.reporting import per_class_rows
from pipeline.errors import SatdetError

from .flowkit import CLASSES, tiny_config, write_config
from .flowkit import count_calls as _count
from .flowkit import fake_evaluation as _fake_evaluation
from .flowkit import fake_training as _fake_training

STAGES = ("tile_scene", "finalize_tiling", "run_dataset_check", "run_training", "run_evaluation")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Count stage calls; real tiling and dataset check, stand-ins for training and evaluation."""
    counter: Counter = Counter()
    _count(monkeypatch, scene_stage, "tile_scene", counter)
    _count(monkeypatch, finalize_stage, "finalize_tiling", counter)
    _count(monkeypatch, dataset_stage, "run_dataset_check", counter)
    _count(monkeypatch, train_stage, "run_training", counter, _fake_training)
    _count(monkeypatch, eval_stage, "run_evaluation", counter, _fake_evaluation)
    return counter


def _run(config_path: Path, **kwargs):
    state = training.train_pipeline(config_path=str(config_path), return_state=True, **kwargs)
    return state


def _delta(before: Counter, after: Counter) -> dict[str, int]:
    return {k: after[k] - before[k] for k in STAGES}


def test_second_run_is_served_from_cache(prefect_api, scenes, tmp_path, calls):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "runs", scenes))
    first = _run(cfg)
    assert first.is_completed()
    assert dict(calls) == {"tile_scene": 3, "finalize_tiling": 1, "run_dataset_check": 1,
                           "run_training": 1, "run_evaluation": 1}
    before = Counter(calls)
    second = _run(cfg)
    assert second.is_completed()
    assert _delta(before, calls) == dict.fromkeys(STAGES, 0)
    assert second.result()["AP50"] == pytest.approx(0.5)
    run_dir = tmp_path / "runs" / "flowtest"
    assert (run_dir / "config.yaml").exists() and (run_dir / "tiles" / "manifest.jsonl").exists()


def test_tiling_change_reruns_tiling_and_everything_after(prefect_api, scenes, tmp_path, calls):
    data = tiny_config(tmp_path / "runs", scenes)
    cfg = write_config(tmp_path / "c.yaml", data)
    assert _run(cfg).is_completed()
    first_manifest = (tmp_path / "runs" / "flowtest" / "tiles" / "manifest.jsonl").read_text()
    before = Counter(calls)
    data["tiling"]["tile_size"] = 96
    write_config(cfg, data)
    assert _run(cfg).is_completed()
    assert _delta(before, calls) == {"tile_scene": 3, "finalize_tiling": 1, "run_dataset_check": 1,
                                     "run_training": 1, "run_evaluation": 1}
    manifest = (tmp_path / "runs" / "flowtest" / "tiles" / "manifest.jsonl").read_text()
    assert manifest != first_manifest
    assert {tuple(json.loads(line)["window"][2:]) for line in manifest.splitlines()} == {(96, 96)}
    # Only the current tiling configuration's work folder is kept.
    assert len(list((tmp_path / "runs" / "flowtest" / "work").glob("tiling-*"))) == 1


def test_training_change_keeps_tiles_and_reruns_training_and_evaluation(prefect_api, scenes, tmp_path, calls):
    data = tiny_config(tmp_path / "runs", scenes)
    cfg = write_config(tmp_path / "c.yaml", data)
    assert _run(cfg).is_completed()
    before = Counter(calls)
    assert _run(cfg, overrides=["train.steps=6"]).is_completed()
    assert _delta(before, calls) == {"tile_scene": 0, "finalize_tiling": 0, "run_dataset_check": 0,
                                     "run_training": 1, "run_evaluation": 1}


def test_force_reruns_every_stage(prefect_api, scenes, tmp_path, calls):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "runs", scenes))
    assert _run(cfg).is_completed()
    before = Counter(calls)
    assert _run(cfg, force=True).is_completed()
    assert _delta(before, calls) == {"tile_scene": 3, "finalize_tiling": 1, "run_dataset_check": 1,
                                     "run_training": 1, "run_evaluation": 1}


def test_deleted_stage_output_is_rebuilt_despite_cache(prefect_api, scenes, tmp_path, calls):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "runs", scenes))
    assert _run(cfg).is_completed()
    shutil.rmtree(tmp_path / "runs" / "flowtest" / "eval")
    before = Counter(calls)
    assert _run(cfg).is_completed()
    assert _delta(before, calls) == {"tile_scene": 0, "finalize_tiling": 0, "run_dataset_check": 0,
                                     "run_training": 0, "run_evaluation": 1}
    assert (tmp_path / "runs" / "flowtest" / "eval" / "metrics.json").exists()


def test_transient_tiling_failure_is_retried(prefect_api, scenes, tmp_path, calls, monkeypatch):
    monkeypatch.setattr(training, "tile_scene", training.tile_scene.with_options(retry_delay_seconds=0))
    real = scene_stage.tile_scene  # the counting wrapper
    failures: Counter = Counter()

    def flaky(config, scene_index, work_dir, *args, **kwargs):
        if scene_index == 1 and failures["scene1"] == 0:
            failures["scene1"] += 1
            raise OSError("simulated network hiccup reading scene1.tif")
        return real(config, scene_index, work_dir, *args, **kwargs)

    monkeypatch.setattr(scene_stage, "tile_scene", flaky)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "runs", scenes))
    assert _run(cfg).is_completed()
    assert failures["scene1"] == 1
    assert calls["tile_scene"] == 3  # the failed attempt raised before reaching the real stage
    assert (tmp_path / "runs" / "flowtest" / "eval" / "metrics.json").exists()


def test_user_error_in_tiling_is_not_retried(prefect_api, scenes, tmp_path, calls, monkeypatch):
    monkeypatch.setattr(training, "tile_scene", training.tile_scene.with_options(retry_delay_seconds=0))
    attempts: Counter = Counter()

    def broken(config, scene_index, work_dir, *args, **kwargs):
        attempts[scene_index] += 1
        raise SatdetError(f"scene{scene_index}.tif: not a raster; fix the path")

    monkeypatch.setattr(scene_stage, "tile_scene", broken)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "runs", scenes))
    state = _run(cfg)
    assert state.is_failed()
    assert set(attempts.values()) == {1}
    assert calls["run_training"] == 0


@pytest.mark.slow
def test_pipeline_end_to_end_writes_every_stage_and_completes(prefect_api, scenes, tmp_path, monkeypatch):
    """Every real stage with a tiny model; then a re-run is served entirely from cache."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    counter: Counter = Counter()
    for module, name in ((scene_stage, "tile_scene"), (finalize_stage, "finalize_tiling"),
                         (dataset_stage, "run_dataset_check"), (train_stage, "run_training"),
                         (eval_stage, "run_evaluation")):
        _count(monkeypatch, module, name, counter)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "runs", scenes, name="e2e"))
    state = _run(cfg)
    assert state.is_completed(), state.message
    result = state.result()
    run = tmp_path / "runs" / "e2e"
    for rel in ("config.yaml", "tiles/manifest.jsonl", "tiles/stats.json", "tiles/qa.json", "tiles/splits.json",
                "tiles/dataset.json", "model/train_log.jsonl", "model/export/model_info.json",
                "eval/metrics.json"):
        assert (run / rel).exists(), rel
    assert list((run / "tiles").glob("train-*.tfrecord")) and list((run / "tiles").glob("test-*.tfrecord"))
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert result["AP50"] == metrics["scene"]["AP50"]
    info = json.loads((run / "model" / "export" / "model_info.json").read_text())
    assert info["pixel_size_m"] == pytest.approx(0.3)  # the synthetic scenes' ground pixel size
    assert Path(result["report"]).exists()
    assert sum(counter.values()) == 3 + 1 + 1 + 1 + 1

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["e2e-report", "e2e-per-class-ap", "e2e-progress"]))
        )}
    assert {"e2e-report", "e2e-progress"} <= keys
    if any(m.get("per_class") for m in metrics.values() if isinstance(m, dict)):
        assert "e2e-per-class-ap" in keys
        assert {r["class"] for r in per_class_rows(metrics)} <= set(CLASSES)

    before = Counter(counter)
    again = _run(cfg)
    assert again.is_completed()
    assert counter == before  # nothing re-executed
    assert again.result()["AP50"] == result["AP50"]


def test_tensorflow_stages_import_it_quietly_first_whoever_starts_the_flow(scenes, tmp_path, monkeypatch):
    """A Prefect worker runs the tasks without the CLI: each TensorFlow stage imports TF through
    pipeline.tf_quiet (no native start-up notices) before the stage module can import it noisily."""
    from flows import prediction
    from pipeline.config import config_from_dict
    from pipeline.predict import scene as predict_stage

    order: list[str] = []
    for module in (training, prediction):
        monkeypatch.setattr(module, "import_tensorflow", lambda: order.append("quiet-import"))
    for module, name in ((dataset_stage, "run_dataset_check"), (train_stage, "run_training"),
                         (eval_stage, "run_evaluation"), (predict_stage, "predict_scenes")):
        result = [] if name == "predict_scenes" else "out"
        monkeypatch.setattr(module, name, lambda *a, _n=name, _r=result, **k: order.append(_n) or _r)
    config = config_from_dict(tiny_config(tmp_path / "runs", scenes))
    training.build_dataset.fn(config, tmp_path)
    training.train.fn(config, tmp_path, tmp_path / "model")
    training.evaluate.fn(config, tmp_path, tmp_path, tmp_path / "eval")
    prediction.predict_task.fn(config, tmp_path, [], tmp_path / "out", "x")
    assert order == ["quiet-import", "run_dataset_check", "quiet-import", "run_training",
                     "quiet-import", "run_evaluation", "quiet-import", "predict_scenes"]


def test_code_upgrade_reruns_the_stages_whose_code_changed(prefect_api, scenes, tmp_path, calls, monkeypatch):
    """Same package version, new trainer source (a `pip install` of newer code): training and, through
    its new model, evaluation re-run; tiles and the dataset check come from the cache."""
    from flows import caching

    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "runs", scenes))
    assert _run(cfg).is_completed()
    before = Counter(calls)
    real = caching._read_source
    monkeypatch.setattr(caching, "_read_source",
                        lambda path: real(path) + (b"\n# new\n" if path.as_posix().endswith("train/fit.py") else b""))
    caching.code_fingerprint.cache_clear()
    try:
        assert _run(cfg).is_completed()
    finally:
        caching.code_fingerprint.cache_clear()
    assert _delta(before, calls) == {"tile_scene": 0, "finalize_tiling": 0, "run_dataset_check": 0,
                                     "run_training": 1, "run_evaluation": 1}


def test_scenes_are_planned_once_and_tiled_at_most_tiling_workers_at_a_time(prefect_api, scenes, tmp_path, calls,
                                                                            monkeypatch):
    import threading
    import time

    plans: Counter = Counter()
    real_plan = plan_stage.plan_tiling
    monkeypatch.setattr(plan_stage, "plan_tiling", lambda config: plans.update(["plan"]) or real_plan(config))
    busy = {"now": 0, "most": 0}
    guard = threading.Lock()
    real_tile = scene_stage.tile_scene  # the counting wrapper

    def slow_tile(*args, **kwargs):
        with guard:
            busy["now"] += 1
            busy["most"] = max(busy["most"], busy["now"])
        try:
            time.sleep(1.0)
            return real_tile(*args, **kwargs)
        finally:
            with guard:
                busy["now"] -= 1

    monkeypatch.setattr(scene_stage, "tile_scene", slow_tile)
    data = tiny_config(tmp_path / "runs", scenes)
    data["tiling"]["workers"] = 2
    cfg = write_config(tmp_path / "c.yaml", data)
    assert _run(cfg).is_completed()
    assert plans["plan"] == 1  # by plan-tiling, before the scene tasks; none of them planned again
    assert calls["tile_scene"] == 3
    assert busy["most"] == 2  # three scenes, two at a time


def test_plan_is_redone_when_a_scene_file_is_replaced(tmp_path, monkeypatch):
    from pipeline.config import config_from_dict
    from pipeline.geo.synth import make_scene

    made = [make_scene(tmp_path, f"s{i}", width=96, height=96, seed=i, n_objects=2, classes=CLASSES) for i in range(2)]
    data = tiny_config(tmp_path / "runs", [{"image": str(s.image), "labels": str(s.labels)} for s in made])
    data["tiling"]["split"] = {"method": "scene"}
    config = config_from_dict(data)
    plans: Counter = Counter()
    real_plan = plan_stage.plan_tiling
    monkeypatch.setattr(plan_stage, "plan_tiling", lambda c: plans.update(["plan"]) or real_plan(c))
    work = tmp_path / "work"
    plan_file = training.plan_tiling.fn(config, work)
    training.plan_tiling.fn(config, work)
    assert plans["plan"] == 1
    make_scene(tmp_path, "s1", width=160, height=128, seed=5, n_objects=2, classes=CLASSES)  # bigger, same path
    training.plan_tiling.fn(config, work)
    assert plans["plan"] == 2
    assert json.loads(plan_file.read_text())["scenes"][1]["width"] == 160
