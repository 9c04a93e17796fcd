"""One retry policy for the flows' file-reading tasks: transient failures (a flaky network mount, a
worker lost) are retried with exponential backoff; a user-fixable error (bad config or input) is not,
because retrying cannot fix it."""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

from pipeline.config import ConfigError
from pipeline.errors import SatdetError


def is_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry unless the failure is a SatdetError or ConfigError."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return not isinstance(exc, (SatdetError, ConfigError))


def io_retries(retries: int, *, jitter: bool = False) -> dict[str, Any]:
    """`@task(**io_retries(3, jitter=True))`: `retries` tries with backoff 5 s, 10 s, 20 s ... (jittered by
    half when many tasks of one map may fail together)."""
    options: dict[str, Any] = {"retries": retries, "retry_delay_seconds": exponential_backoff(backoff_factor=5),
                               "retry_condition_fn": is_transient}
    if jitter:
        options["retry_jitter_factor"] = 0.5
    return options
