"""The GPU work pool: its base job template declares and uses container_create_kwargs, so the job a
worker builds for every deployment of prefect.yaml carries the GPU request; a pool without it is caught
by `satdet doctor --pool`."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows import pool as gpu_pool
from pipeline.cli import app
from pipeline.errors import SatdetError

PREFECT_YAML = Path(__file__).resolve().parents[2] / "prefect.yaml"
ALL_GPUS = [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]


def _render(template: dict, job_variables: dict) -> dict:
    """The job configuration a worker builds from the pool template and a deployment's job variables
    (BaseJobConfiguration.from_template_and_values: variable defaults, overridden, applied)."""
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    values = BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    values.update(job_variables)
    return apply_values(copy.deepcopy(template["job_configuration"]), values)


def test_template_is_valid_for_prefect_and_passes_the_gpus():
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.server.schemas.actions import validate_base_job_template

    template = gpu_pool.gpu_job_template()
    validate_base_job_template(template)  # every placeholder is a declared variable
    WorkPoolCreate(name="gpu-docker", type="docker", base_job_template=template)
    assert gpu_pool.template_problems(template) == ([], [])
    job = _render(template, {})  # a deployment that sets no job variables still gets the GPUs
    assert job["container_create_kwargs"]["device_requests"] == ALL_GPUS
    assert job["container_create_kwargs"]["entrypoint"] == ["/usr/bin/env"]
    assert job["auto_remove"] is False


def test_every_prefect_yaml_deployment_renders_to_a_gpu_job():
    project = yaml.safe_load(PREFECT_YAML.read_text())
    template = gpu_pool.gpu_job_template()
    for dep in project["deployments"]:
        variables = dep["work_pool"]["job_variables"]
        assert variables["auto_remove"] is False
        job = _render(template, variables)
        assert job["container_create_kwargs"]["device_requests"] == ALL_GPUS, dep["name"]
        assert job["image"] == variables["image"] and job["auto_remove"] is False
        assert "schedules" in dep  # `schedules: []` where none, so `prefect deploy --all` does not prompt


def test_the_docker_template_without_prefect_docker_lacks_the_variable_and_is_flagged():
    base, source = gpu_pool.docker_default_template()
    if source == "prefect-docker":  # pragma: no cover - depends on what is installed
        pytest.skip("prefect-docker is installed: its own template is used")
    errors, _ = gpu_pool.template_problems(base)
    assert any("declares no `container_create_kwargs`" in e for e in errors)
    # The same template, as `satdet pool create` fixes it, is fine (and the worker then renders the GPUs).
    assert gpu_pool.template_problems(gpu_pool.gpu_job_template(template=base)) == ([], [])


@pytest.mark.parametrize(("gpus", "expected"), [
    ("all", ALL_GPUS), ("none", []), ("2", [{"driver": "nvidia", "count": 2, "capabilities": [["gpu"]]}]),
    ("device=0,1", [{"driver": "nvidia", "device_ids": ["0", "1"], "capabilities": [["gpu"]]}]),
    ("device=0", [{"driver": "nvidia", "device_ids": ["0"], "capabilities": [["gpu"]]}]),
])
def test_gpu_requests(gpus, expected):
    assert gpu_pool.gpu_request(gpus) == expected


def test_bad_gpu_request_is_one_line():
    for bad in ("many", "0", "0,1", "device="):
        with pytest.raises(SatdetError, match="expected all, none"):
            gpu_pool.gpu_request(bad)


def test_template_out_writes_the_template(tmp_path):
    out = tmp_path / "tpl.json"
    result = CliRunner().invoke(app, ["pool", "create", "gpu-docker", "--template-out", str(out), "--gpus", "1"])
    assert result.exit_code == 0, result.output
    import json

    template = json.loads(out.read_text())
    assert template["variables"]["properties"]["container_create_kwargs"]["default"]["device_requests"][0]["count"] == 1


def test_pool_create_and_doctor_against_a_server(prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    runner = CliRunner()
    created = runner.invoke(app, ["pool", "create", "gpu-test"])
    assert created.exit_code == 0, created.output
    assert runner.invoke(app, ["doctor", "--pool", "gpu-test"]).exit_code == 0

    # A pool made the plain way where prefect-docker is missing: doctor fails loudly.
    base, _ = gpu_pool.docker_default_template()
    bare = copy.deepcopy(base)
    bare["variables"]["properties"].pop("container_create_kwargs", None)
    bare["job_configuration"].pop("container_create_kwargs", None)
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="bare-docker", type="docker", base_job_template=bare))
    checked = runner.invoke(app, ["doctor", "--pool", "bare-docker"])
    assert checked.exit_code == 1
    assert "declares no `container_create_kwargs`" in checked.output
    assert "satdet pool create bare-docker --overwrite" in checked.output

    again = runner.invoke(app, ["pool", "create", "bare-docker"])
    assert again.exit_code == 2 and "--overwrite" in again.output
    fixed = runner.invoke(app, ["pool", "create", "bare-docker", "--overwrite"])
    assert fixed.exit_code == 0, fixed.output
    assert runner.invoke(app, ["pool", "check", "bare-docker"]).exit_code == 0
    assert runner.invoke(app, ["doctor", "--pool", "no-such-pool"]).exit_code == 1
