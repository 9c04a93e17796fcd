"""`satdet schedule --dry-run` describes the deployment it would serve, without a server."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "retrain.yaml"
    path.write_text("name: Weekly Trees\ntiling:\n  scenes:\n    - {image: a.tif, labels: a.geojson}\n")
    return path


def test_dry_run_prints_cron_entrypoint_and_parameters(config_file):
    result = CliRunner().invoke(app, ["schedule", str(config_file), "--cron", "0 3 * * 0", "--dry-run",
                                      "--set", "train.steps=50"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["schedules"] == [{"cron": "0 3 * * 0", "timezone": "UTC"}]
    assert shown["name"] == "retrain-weekly-trees"
    assert shown["flow"] == "satdet-train"
    assert shown["entrypoint"] == "flows.training.train_pipeline"
    assert shown["parameters"] == {"config_path": str(config_file.resolve()), "overrides": ["train.steps=50"],
                                   "force": False}
    assert shown["pause_on_shutdown"] is False
    # one run at a time: the deployment queues runs that fall due meanwhile, the server runs one at once
    assert (shown["concurrency_limit"], shown["collision_strategy"], shown["serve_limit"]) == (1, "ENQUEUE", 1)


def test_served_deployment_has_a_concurrency_limit_of_one_and_serve_a_limit_of_one(config_file, monkeypatch):
    from flows import schedule
    from pipeline.config import load_config

    served = {}
    monkeypatch.setattr(schedule, "serve", lambda *deps, **kwargs: served.update(deps=deps, **kwargs))
    schedule.serve_training(config_file, load_config(config_file), cron="* * * * *")
    (dep,) = served["deps"]
    assert dep.concurrency_limit == 1 and dep.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert served["limit"] == 1 and served["pause_on_shutdown"] is False


def test_dry_run_entrypoint_loads_the_training_flow(config_file):
    from prefect.flows import load_flow_from_entrypoint

    from flows.training import train_pipeline

    result = CliRunner().invoke(app, ["schedule", str(config_file), "--dry-run", "--name", "nightly"])
    shown = yaml.safe_load(result.output)
    assert shown["name"] == "nightly"
    assert load_flow_from_entrypoint(shown["entrypoint"], use_placeholder_flow=False).name == train_pipeline.name


def test_invalid_cron_is_one_line_error(config_file):
    result = CliRunner().invoke(app, ["schedule", str(config_file), "--cron", "every sunday", "--dry-run"])
    assert result.exit_code == 2
    assert "--cron 'every sunday'" in result.output
    assert "Traceback" not in result.output
