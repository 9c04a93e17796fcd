"""Scheduled retraining: serve `train_pipeline` as a deployment on a cron schedule (`satdet schedule`).

Serving needs a real Prefect API (`prefect server start` or the compose stack, with PREFECT_API_URL set):
the ephemeral local API runs flows but has no scheduler. The schedule keeps running when the serving
process stops (`pause_on_shutdown=False`), so a restarted container does not silently stop retraining.
Runs with unchanged inputs are served from the stage cache, so a weekly schedule only retrains when the
imagery, labels, config or code changed.

One run at a time: the deployment has a concurrency limit of 1 (runs that fall due while one is still
going wait in AwaitingConcurrencySlot, then run) and the serving process runs at most one flow run at
once (`serve(limit=1)`); the run folder's own lock (flows/locking.py) covers runs started elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from flows.reporting import slug
from flows.training import train_pipeline
from pipeline.config import Config
from pipeline.errors import SatdetError

# Runs of one deployment at once, and what happens to a run that falls due meanwhile: it queues.
CONCURRENCY = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
SERVE_LIMIT = 1  # flow runs the serving process executes at once


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
        concurrency_limit=CONCURRENCY,
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
            "concurrency_limit": dep.concurrency_limit,
            "collision_strategy": dep.concurrency_options.collision_strategy.value,
            "serve_limit": SERVE_LIMIT,
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
    serve(build_deployment(config_path, config, cron, name, timezone, overrides), pause_on_shutdown=False,
          limit=SERVE_LIMIT)
