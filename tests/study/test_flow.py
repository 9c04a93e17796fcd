"""The `clipping_study` Prefect flow: one task per run, a failed run does not fail the flow, and the
results land in a table artifact. Training is stood in for (see test_study.py for the real thing)."""

from __future__ import annotations

import json

import pytest

from pipeline.study import runner

from .studykit import fake_train_run, tiny_config, write_config


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A temporary Prefect API for this module only. If one is already up (tests/flows keeps a
    session-scoped harness), use it: harnesses must not nest."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with (
        temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(storage)}),
        prefect_test_harness(server_startup_timeout=120),
    ):
        yield


def test_clipping_study_flow_runs_each_run_as_a_task_and_publishes_the_table(
    prefect_api, tmp_path, study_scenes, monkeypatch
):
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    from flows.study import clipping_study

    monkeypatch.setattr(runner, "train_run", fake_train_run)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "runs", study_scenes, name="Flow Study"))
    state = clipping_study(config_path=str(cfg), strategies=["none", "agc"], lrs=[0.01], steps=10,
                           return_state=True)
    assert state.is_completed(), state.message  # the failing agc run is a result, not a flow failure
    result = state.result()
    assert (result["runs"], result["failed"], result["diverged"]) == (2, 1, 0)
    for key in ("results", "report", "curves"):
        assert (tmp_path / "runs" / "Flow Study" / "study").joinpath(result[key].rsplit("/", 1)[1]).exists()

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        names = sorted(r.name for r in runs)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["flow-study-clipping-study"])))
    assert "study-run-none-lr0.01-s0" in names and "study-run-agc-lr0.01-s0" in names
    assert any(n.startswith("study-tile") for n in names) and any(n.startswith("study-report") for n in names)
    table = json.loads(artifacts[0].data)
    assert sorted((r["run"], r["status"]) for r in table) == [("agc-lr0.01-s0", "failed"), ("none-lr0.01-s0", "ok")]
