"""Failure alerts for the satdet flows.

Two parts:

- `on_run_failure`, the `on_failure` / `on_crashed` hook of every satdet flow: it logs one line naming the
  run, its parameters and what went wrong, and emits a Prefect event `satdet.run.failed` /
  `satdet.run.crashed` / `satdet.run.timedout` whose payload carries them (for your own automations).
  Hooks run in the flow's own process, so a process killed outright (OOM, SIGKILL) runs none: the
  automation below therefore listens to Prefect's own state events, which the server or worker emits.
- `failure_automation()`, a Prefect automation that sends a notification (through any notification
  block: Slack, e-mail, Teams, a webhook...) whenever a satdet flow run ends Failed, Crashed or TimedOut,
  and `zombie_automation()`, which marks a run Crashed when its heartbeats stop (its container or host
  died without a word: nothing else would ever move it out of Running). Write both as a file and create
  them with the Prefect CLI::

      python -m flows.alerts --block slack-webhook/satdet-ops --out satdet-alerts.yaml
      prefect automation create --from-file satdet-alerts.yaml

  (or `python -m flows.alerts --block slack-webhook/satdet-ops --create`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

FLOW_NAMES = ("satdet-train", "satdet-predict", "satdet-clipping-study")
FAILURE_STATES = ("Failed", "Crashed", "TimedOut")
AUTOMATION_NAME = "satdet-run-failed"
ZOMBIE_NAME = "satdet-crash-silent-runs"
HEARTBEAT_SECONDS = 60  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY in prefect.yaml's job env


def emit_event(*args: Any, **kwargs: Any) -> Any:
    """prefect.events.emit_event (looked up at call time, so tests can capture what is sent)."""
    from prefect.events import emit_event as _emit

    return _emit(*args, **kwargs)


def _run_folder(flow_name: str, parameters: dict[str, Any]) -> str | None:
    """The run folder of a training or study run, from its parameters (None when it cannot be known)."""
    if flow_name == "satdet-predict":
        return parameters.get("out")
    try:
        from pipeline.config import load_config

        config = load_config(parameters["config_path"], parameters.get("overrides") or [])
        return str(config.run_dir.resolve())
    except Exception:  # noqa: BLE001 - the config itself may be what failed
        return None


def on_run_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """`on_failure` / `on_crashed` hook: one error line in the run's log and a `satdet.run.<state>` event."""
    from prefect.logging.loggers import flow_run_logger

    parameters = dict(getattr(flow_run, "parameters", None) or {})
    state_name = getattr(state, "name", None) or "Failed"
    message = (getattr(state, "message", None) or "").strip()
    run_dir = _run_folder(flow.name, parameters)
    logger = flow_run_logger(flow_run, flow)
    logger.error("satdet %s run %r ended %s: %s (run folder: %s; parameters: %s)", flow.name, flow_run.name,
                 state_name, message or "no message", run_dir or "unknown", parameters)
    try:
        emit_event(
            event=f"satdet.run.{state_name.lower()}",
            resource={"prefect.resource.id": f"satdet.run.{flow_run.id}",
                      "prefect.resource.name": str(flow_run.name)},
            related=[{"prefect.resource.id": f"prefect.flow-run.{flow_run.id}", "prefect.resource.role": "flow-run",
                      "prefect.resource.name": str(flow_run.name)}],
            payload={"flow": flow.name, "flow_run": str(flow_run.name), "flow_run_id": str(flow_run.id),
                     "state": state_name, "message": message, "run_dir": run_dir,
                     "parameters": {k: v for k, v in parameters.items() if isinstance(v, (str, int, float, bool, list,
                                                                                           type(None)))}},
        )
    except Exception as err:  # noqa: BLE001 - a hook must not mask the run's own failure
        logger.warning("could not emit the satdet.run.%s event: %s", state_name.lower(), err)


# ------------------------------------------------------------------------------------------------ automation
BODY = """satdet flow run {{ flow_run.name }} ({{ flow.name }}) ended {{ flow_run.state.name }}.
{{ flow_run.state.message }}

Parameters: {{ flow_run.parameters }}
Flow run: {{ flow_run|ui_url }}"""


def failure_automation(block_document_id: str) -> dict[str, Any]:
    """The automation (as `prefect automation create --from-file` reads it) that notifies through the
    notification block `block_document_id` when a satdet flow run fails, crashes or times out."""
    return {
        "name": AUTOMATION_NAME,
        "description": "Notify when a satdet flow run (train, predict, clipping study) fails, crashes or times out.",
        "enabled": True,
        "trigger": {
            "type": "event",
            "posture": "Reactive",
            "match": {"prefect.resource.id": "prefect.flow-run.*"},
            "match_related": {"prefect.resource.role": "flow", "prefect.resource.name": list(FLOW_NAMES)},
            "expect": [f"prefect.flow-run.{s}" for s in FAILURE_STATES],
            "for_each": ["prefect.resource.id"],
            "threshold": 1,
            "within": 0,
        },
        "actions": [
            {
                "type": "send-notification",
                "block_document_id": str(block_document_id),
                "subject": "satdet: {{ flow.name }} run {{ flow_run.name }} {{ flow_run.state.name }}",
                "body": BODY,
            }
        ],
    }


def zombie_automation(heartbeat_s: int = HEARTBEAT_SECONDS, missed: int = 4) -> dict[str, Any]:
    """The automation that marks a satdet flow run Crashed after `missed` heartbeats did not arrive (and
    no final state either): Prefect's recipe for runs whose infrastructure vanished."""
    return {
        "name": ZOMBIE_NAME,
        "description": f"Mark satdet flow runs Crashed when no heartbeat arrived for {heartbeat_s * missed} s.",
        "enabled": True,
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "after": ["prefect.flow-run.heartbeat"],
            "expect": ["prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                       "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"],
            "match": {"prefect.resource.id": ["prefect.flow-run.*"]},
            "match_related": {"prefect.resource.role": "flow", "prefect.resource.name": list(FLOW_NAMES)},
            "for_each": ["prefect.resource.id"],
            "threshold": 1,
            "within": heartbeat_s * missed,
        },
        "actions": [
            {"type": "change-flow-run-state", "state": "CRASHED",
             "message": f"No heartbeat for {heartbeat_s * missed} s: the run's process or container died."}
        ],
    }


def automations(block_document_id: str) -> list[dict[str, Any]]:
    """Every satdet automation: failure notifications and crash detection."""
    return [failure_automation(block_document_id), zombie_automation()]


def _block_id(slug: str) -> str:
    """Document id of the notification block `type/name` (e.g. slack-webhook/satdet-ops)."""
    from prefect.client.orchestration import get_client

    if "/" not in slug:
        raise SystemExit(f"--block {slug!r}: expected BLOCK_TYPE/BLOCK_NAME, e.g. slack-webhook/satdet-ops")
    type_slug, name = slug.split("/", 1)
    with get_client(sync_client=True) as client:
        return str(client.read_block_document_by_name(name=name, block_type_slug=type_slug).id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.alerts", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--block", help="notification block as BLOCK_TYPE/BLOCK_NAME (needs PREFECT_API_URL)")
    which.add_argument("--block-id", help="notification block document id")
    parser.add_argument("--out", type=Path, help="write the automation YAML here (for prefect automation create)")
    parser.add_argument("--create", action="store_true", help="create the automation on the server now")
    args = parser.parse_args(argv)
    specs = automations(args.block_id or _block_id(args.block))
    from prefect.events.schemas.automations import AutomationCore

    models = [AutomationCore.model_validate(s) for s in specs]  # fail here, not on the server, on a bad spec
    text = yaml.safe_dump({"automations": specs}, sort_keys=False)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}: prefect automation create --from-file {args.out}")
    if args.create:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            for model in models:
                print(f"created automation {model.name}: {client.create_automation(model)}")
    if not args.out and not args.create:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
