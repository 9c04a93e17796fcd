"""What a run shows in Prefect: the trainer's progress and the `pipeline.*` log lines in the flow run's
logs; a run past its time limit ends TimedOut and its failure hook reports it."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

import pipeline.evaluate.run as eval_stage
import pipeline.train.run as train_stage
from flows import alerts, training
from flows.runlog import _LogTail, progress_line

from .flowkit import fake_evaluation, fake_training, tiny_config, write_config


def _run_logs(flow_run_id, expect: list[str], wait_s: float = 30.0) -> list[str]:
    """Messages of a flow run's logs (task runs included) as stored by the API, once `expect` are in."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    deadline = time.monotonic() + wait_s
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                    limit=200)
        messages = [log.message for log in logs]
        if all(any(e in m for m in messages) for e in expect) or time.monotonic() > deadline:
            return messages
        time.sleep(1.0)


def test_training_progress_and_pipeline_logs_reach_the_flow_run(prefect_api, scenes, tmp_path, monkeypatch):
    def trainer(config, tiles_dir, model_dir, resume=False):
        """Writes telemetry like the real trainer (a fresh log, one line per log_every steps) and logs."""
        log = logging.getLogger("pipeline.train.run")
        fake_training(config, tiles_dir, model_dir)  # the export the flow expects
        path = Path(model_dir) / "train_log.jsonl"
        path.unlink()
        with path.open("w") as fh:
            for step in range(1, config.train.steps + 1):
                fh.write(json.dumps({"step": step, "loss": 2.0 / step, "images_per_s": 12.5, "steps_per_s": 2.0,
                                     "clip_fraction": 0.5, "clip_fraction_total": 0.25, "lr": 0.005}) + "\n")
                fh.flush()
                time.sleep(0.8)  # the progress follower polls every 2 s: lines come in during and after
        log.info("trainer: exported the model")
        thread = threading.Thread(target=lambda: logging.getLogger("pipeline.data.dataset").warning(
            "a worker thread of the stage: no run context here"))
        thread.start()
        thread.join()
        return Path(model_dir)

    monkeypatch.setattr(train_stage, "run_training", trainer)
    monkeypatch.setattr(eval_stage, "run_evaluation", fake_evaluation)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "runs", scenes, name="logs"))
    state = training.train_pipeline(config_path=str(cfg), return_state=True)
    assert state.is_completed(), state.message
    expect = ["train step 1/4  loss 2.0000  12.5 img/s  clip 50% (25% overall)  lr 0.005  ETA 2s",
              "train step 4/4  loss 0.5000",
              "trainer: exported the model",
              "a worker thread of the stage: no run context here"]
    messages = _run_logs(state.state_details.flow_run_id, expect)
    for line in expect:
        assert any(line in m for m in messages), (line, messages)
    assert sum("train step" in m for m in messages) == 4  # one per telemetry record (train.log_every)


def test_a_run_past_its_time_limit_ends_timed_out_and_the_hook_reports_it(prefect_api, scenes, tmp_path,
                                                                          monkeypatch):
    def stuck(config, tiles_dir, model_dir, resume=False):
        for _ in range(600):  # a hung stage (e.g. a stalled network mount)
            time.sleep(0.1)
        return fake_training(config, tiles_dir, model_dir)

    sent: list[dict] = []
    monkeypatch.setattr(alerts, "emit_event", lambda **kw: sent.append(kw))
    monkeypatch.setattr(train_stage, "run_training", stuck)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "runs", scenes, name="slow"))
    start = time.monotonic()
    state = training.train_pipeline(config_path=str(cfg), timeout_minutes=0.25, return_state=True)
    assert state.is_failed() and state.name == "TimedOut", (state.name, state.message)
    assert time.monotonic() - start < 55
    (event,) = sent
    assert event["event"] == "satdet.run.timedout"
    assert event["payload"]["state"] == "TimedOut"
    assert event["payload"]["run_dir"] == str((tmp_path / "runs" / "slow").resolve())
    assert event["payload"]["parameters"]["config_path"] == str(cfg)


def test_time_limit_defaults_from_the_training_time_budget():
    from pipeline.config import config_from_dict

    budget = config_from_dict({"train": {"time_budget_minutes": 30}})
    assert training.run_timeout_s(budget, None) == (2 * 30 + 60) * 60
    assert training.run_timeout_s(budget, 10) == 600
    assert training.run_timeout_s(budget, 0) is None
    assert training.run_timeout_s(config_from_dict({}), None) is None


def test_progress_line_and_tail(tmp_path):
    assert progress_line({"step": 10, "loss": float("nan")}, 100) == "train step 10/100  loss nan"
    assert progress_line({"step": 4, "val_ap50": 0.25}, 4) == "validation at step 4: AP50 0.250"
    assert progress_line({"step": 50, "loss": 1.0, "steps_per_s": 0.5, "schedule_steps": 80}, 100).endswith(
        "ETA 1m00s")
    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"step": 99}) + "\n")  # an earlier run's log: not this run's progress
    tail = _LogTail(log)
    assert tail.read() == []
    tmp = tmp_path / "new.jsonl"
    tmp.write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2')  # the trainer's fresh file, a line half-written
    tmp.replace(log)
    assert tail.read() == [{"step": 1}]
    with log.open("a") as fh:
        fh.write("}\n")
    assert tail.read() == [{"step": 2}]


def test_failure_automations_validate_as_prefect_automations():
    from prefect.events.schemas.automations import AutomationCore

    failed, zombie = (AutomationCore.model_validate(a) for a in alerts.automations("8f2d4a1e-0000-4000-8000-000000000001"))
    assert failed.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut"}
    assert failed.actions[0].type == "send-notification"
    assert zombie.trigger.posture == "Proactive" and zombie.actions[0].type == "change-flow-run-state"


@pytest.mark.parametrize("flow_name", ["satdet-train", "satdet-predict", "satdet-clipping-study"])
def test_every_flow_has_the_failure_hooks(flow_name):
    from flows.prediction import predict_scenes
    from flows.study import clipping_study

    flow = {"satdet-train": training.train_pipeline, "satdet-predict": predict_scenes,
            "satdet-clipping-study": clipping_study}[flow_name]
    assert alerts.on_run_failure in flow.on_failure_hooks and alerts.on_run_failure in flow.on_crashed_hooks
    assert flow_name in alerts.FLOW_NAMES
