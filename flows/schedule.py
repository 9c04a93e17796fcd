"""Scheduled retraining: serve `train_pipeline` as a deployment on a cron schedule (`satdet schedule`).

Serving needs a real Prefect API (`prefect server start` or the compose stack, with PREFECT_API_URL set):
the ephemeral local API runs flows but has no scheduler. The schedule keeps running when the serving
process stops (`pause_on_shutdown=False`), so a restarted container does not silently stop retraining.
Runs with unchanged inputs are served from the stage cache, so a weekly schedule only retrains when the
imagery, labels or config changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect import serve
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from flows.reporting import slug
from flows.training import train_pipeline
from pipeline.config import Config
from pipeline.errors import SatdetError


def deployment_name(config: Config, name: str | None = None) -> str:
    """Default deployment name: retrain-<run name>."""
    return name or f"retrain-{slug(config.name)}"


def build_deployment(
    config_path: str | Path,
    config: Config,
    cron: str,
    name: str | None = None,
    timezone: str = "UTC",
    overrides: list[str] | None = None,
) -> Any:
    """The RunnerDeployment that `satdet schedule` serves (no API call: safe for --dry-run)."""
    try:
        schedule = Cron(cron, timezone=timezone)
    except Exception as err:  # noqa: BLE001 - pydantic/croniter validation: report as one line
        raise SatdetError(f"--cron {cron!r} / --timezone {timezone!r}: {str(err).splitlines()[0]}") from None
    # The module entrypoint resolves wherever satdet is installed (a container has no source tree).
    return train_pipeline.to_deployment(
        name=deployment_name(config, name),
        schedules=[schedule],
        parameters={
            "config_path": str(Path(config_path).resolve()),
            "overrides": list(overrides or []),
            "force": False,
        },
        description=f"Retrain satdet run {config.name!r} on a schedule ({cron}, {timezone}).",
        tags=["satdet", "retrain"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def describe_deployment(
    config_path: str | Path,
    config: Config,
    cron: str,
    name: str | None = None,
    timezone: str = "UTC",
    overrides: list[str] | None = None,
) -> str:
    """YAML description of the deployment `satdet schedule` would create (for --dry-run)."""
    dep = build_deployment(config_path, config, cron, name, timezone, overrides)
    return yaml.safe_dump(
        {
            "deployment": f"{dep.flow_name}/{dep.name}",
            "name": dep.name,
            "flow": dep.flow_name,
            "entrypoint": dep.entrypoint,
            "schedules": [{"cron": cron, "timezone": timezone}],
            "parameters": dep.parameters,
            "tags": dep.tags,
            "pause_on_shutdown": False,
        },
        sort_keys=False,
    ).rstrip()


def serve_training(
    config_path: str | Path,
    config: Config,
    cron: str,
    name: str | None = None,
    timezone: str = "UTC",
    overrides: list[str] | None = None,
) -> None:
    """Create the deployment and serve it until interrupted (the schedule stays active afterwards)."""
    serve(build_deployment(config_path, config, cron, name, timezone, overrides), pause_on_shutdown=False)
