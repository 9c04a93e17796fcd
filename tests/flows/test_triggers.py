"""`retrain-on-imagery`: the event's payload reaches the flow's parameters. The trigger in prefect.yaml is
turned into an automation the way `prefect deploy` does it, and its run-deployment action is rendered
by Prefect's own server models against a received event; the rendered parameters then drive the flow's
config (scenes appended to tiling.scenes, overrides applied)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

import pytest
import yaml

from flows.training import add_scenes, train_pipeline
from pipeline.config import load_config
from pipeline.errors import SatdetError

PREFECT_YAML = Path(__file__).resolve().parents[2] / "prefect.yaml"


def _deployment(name: str) -> dict:
    project = yaml.safe_load(PREFECT_YAML.read_text())
    (dep,) = [d for d in project["deployments"] if d["name"] == name]
    return dep


def _server_automation():
    """The automation `prefect deploy` creates for the retrain-on-imagery trigger, as the server holds it."""
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers
    from prefect.server.events.schemas.automations import Automation

    dep = _deployment("retrain-on-imagery")
    (trigger,) = _initialize_deployment_triggers(dep["name"], dep["triggers"])
    trigger.set_deployment_id(uuid4())
    core = trigger.as_automation()
    return Automation.model_validate({**core.model_dump(mode="json"), "id": str(uuid4())})


def _event(payload: dict):
    from prefect.server.events.schemas.events import ReceivedEvent

    now = datetime.now(UTC)
    return ReceivedEvent(event="satdet.imagery.landed", resource={"prefect.resource.id": "satdet.imagery.neon"},
                         payload=payload, occurred=now, received=now, id=uuid4())


def _render(payload: dict) -> dict:
    from prefect.server.events.schemas.automations import TriggeredAction

    automation = _server_automation()
    event = _event(payload)
    assert automation.trigger.covers(event)  # the trigger matches the documented event
    (action,) = automation.actions
    triggered = TriggeredAction(automation=automation, triggered=event.occurred, triggering_labels={},
                                triggering_event=event, action=action)
    return asyncio.run(action.render_parameters(triggered))


def test_event_files_and_overrides_become_flow_parameters_with_their_types():
    files = ["data/neon-trees/OSBS_029.tif", {"image": "data/new/b.tif", "labels": "data/new/b.geojson"}]
    params = _render({"files": files, "overrides": ["train.steps=50"]})
    assert params == {"scenes": files, "overrides": ["train.steps=50"]}  # lists stay lists, dicts stay dicts
    # What the server passes to the run: the deployment's parameters, updated by the rendered ones.
    merged = {**_deployment("retrain-on-imagery")["parameters"], **params}
    train_pipeline.validate_parameters(merged)


def test_an_event_without_payload_runs_the_deployment_as_configured():
    params = _render({})
    assert params == {"scenes": [], "overrides": []}
    train_pipeline.validate_parameters({**_deployment("retrain-on-imagery")["parameters"], **params})


def test_event_scenes_are_appended_to_the_config(tmp_path, monkeypatch):
    cfg = tmp_path / "configs" / "c.yaml"
    cfg.parent.mkdir()
    cfg.write_text(yaml.safe_dump({"name": "t", "tiling": {"scenes": [{"image": "../data/a.tif",
                                                                      "labels": "../data/a.geojson"}]}}))
    monkeypatch.chdir(tmp_path)  # a run's working directory (/work in the container)
    params = _render({"files": ["data/b.tif", {"image": "data/c.tif", "labels": "data/c.geojson", "split": "val"},
                                str(tmp_path / "data" / "a.tif")],
                      "overrides": ["train.steps=7"]})
    config = add_scenes(load_config(cfg, params["overrides"]), params["scenes"])
    assert config.train.steps == 7
    def resolved(p):
        return p and p.resolve()

    assert [(resolved(s.image), resolved(s.labels), s.split) for s in config.tiling.scenes] == [
        (tmp_path / "data" / "a.tif", tmp_path / "data" / "a.geojson", None),  # listed already: not repeated
        (tmp_path / "data" / "b.tif", None, None),
        (tmp_path / "data" / "c.tif", tmp_path / "data" / "c.geojson", "val"),
    ]


def test_a_scene_without_image_is_a_one_line_error(tmp_path):
    with pytest.raises(SatdetError, match="has no image"):
        add_scenes(load_config(None, []), [{"labels": "x.geojson"}])
