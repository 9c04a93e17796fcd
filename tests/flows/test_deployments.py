"""prefect.yaml: it parses as Prefect reads it, every entrypoint imports, parameters fit the flows, the
GPU work pool requests GPUs the way prefect-docker needs, and the event trigger is valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

PREFECT_YAML = Path(__file__).resolve().parents[2] / "prefect.yaml"


@pytest.fixture(scope="module")
def project():
    from prefect.cli.deploy._models import PrefectYamlModel

    return PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_YAML.read_text()))


def test_every_entrypoint_imports_and_its_parameters_validate(project):
    from prefect.flows import load_flow_from_entrypoint

    assert project.deployments
    for dep in project.deployments:
        flow = load_flow_from_entrypoint(dep.entrypoint, use_placeholder_flow=False)
        flow.validate_parameters(dict(dep.parameters))  # raises on unknown/mistyped parameters


def test_training_deployments_schedule_and_trigger(project):
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    by_name = {d.name: d for d in project.deployments}
    weekly = by_name["retrain-weekly"]
    assert [s.cron for s in weekly.schedules] == ["0 3 * * 0"]
    CronSchedule(cron=weekly.schedules[0].cron, timezone=weekly.schedules[0].timezone)  # valid cron
    triggers = [DeploymentEventTrigger.model_validate(t) for t in by_name["retrain-on-imagery"].triggers]
    assert [t.expect for t in triggers] == [{"satdet.imagery.landed"}]
    assert triggers[0].enabled


def test_docker_work_pool_requests_all_gpus_and_mounts_data_and_runs(project):
    for dep in project.deployments:
        jv = dep.work_pool.job_variables
        assert dep.work_pool.name == "gpu-docker"
        cck = jv["container_create_kwargs"]
        assert cck["device_requests"] == [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
        assert "volumes" not in cck  # prefect-docker ignores volumes there
        targets = {v.split(":")[1] for v in jv["volumes"]}
        assert {"/work/data", "/work/runs"} <= targets
        assert jv["image"].startswith("satdet:")


def test_gpu_config_used_by_the_deployments_is_valid_and_its_scenes_exist():
    from pipeline.config import load_config

    cfg = load_config(PREFECT_YAML.parent / "configs" / "gpu-r50.yaml")
    assert (cfg.model.backbone, cfg.model.mixed_precision, cfg.train.jit_compile, cfg.data.batch_size) == (
        "resnet50", "mixed_float16", True, 8)
    for scene in cfg.tiling.scenes:
        assert scene.image.exists() and scene.labels.exists()
