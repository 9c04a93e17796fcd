"""One writer per run folder: a lock that the training flow, and its train and evaluate tasks, hold while
they write `runs/<name>/`, so overlapping runs (a cron run, an imagery event, a click on "Run") queue
instead of training into the same model folder at once.

Two layers, because each covers what the other cannot:

- **An OS file lock** (`flock` on `<run folder>/.satdet-run.lock`). The kernel drops it the moment the
  holding process dies (crash, OOM kill, SIGKILL), so a crashed run can never leave it held. It works
  with no Prefect server at all (`satdet run` on its temporary local API, where every process has its
  own API) and between containers of one host that mount the same runs folder.
- **A Prefect global concurrency limit** `satdet-run-<name>-<hash of the folder path>` (limit 1, created
  on first use), taken when a Prefect server is configured (`PREFECT_API_URL`). Runs on *other hosts*
  that share the runs folder over network storage (where `flock` is not dependable) queue on it, and the
  UI shows who holds the folder (Concurrency → Global). The slot is held with a lease that the run renews
  every 45 s; the server's repossessor frees the slot of a run that died within about a minute.

The lock is re-entrant within one flow run: the flow takes it first and the train and evaluate tasks it
calls find it held (a task called on its own, outside the flow, takes it itself).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.errors import SatdetError

try:  # POSIX only (the container and every supported host); elsewhere the server limit alone guards
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".satdet-run.lock"
LEASE_SECONDS = 60.0  # the server's minimum; renewed every 45 s by Prefect's lease thread
POLL_SECONDS = 2.0

# Run folders this context (flow run → the tasks it calls) already holds.
_HELD: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("satdet_run_locks", default=frozenset())


def limit_name(run_dir: str | Path) -> str:
    """The global concurrency limit of a run folder: its name plus a hash of its absolute path."""
    run_dir = Path(run_dir).resolve()
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in run_dir.name.lower()).strip("-") or "run"
    return f"satdet-run-{name[:40]}-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:10]}"


def holder_info(path: Path) -> dict[str, Any]:
    """Who holds (or last held) a run folder's file lock, as written by the holder ({} if unknown)."""
    try:
        return json.loads((path / LOCK_FILE if path.is_dir() else path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _run_ids() -> dict[str, str]:
    """Ids of the current Prefect flow run / task run (empty outside a run)."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext

        ids = {}
        if (flow_ctx := FlowRunContext.get()) and flow_ctx.flow_run:
            ids["flow_run_id"] = str(flow_ctx.flow_run.id)
            ids["flow_run_name"] = str(flow_ctx.flow_run.name)
        if (task_ctx := TaskRunContext.get()) and task_ctx.task_run:
            ids.setdefault("flow_run_id", str(task_ctx.task_run.flow_run_id))
        return ids
    except Exception:  # noqa: BLE001 - informative only
        return {}


def _logger(logger: Any) -> Any:
    if logger is not None:
        return logger
    from flows.runlog import run_logger

    return run_logger()


# ------------------------------------------------------------------------------------------------ file lock
@contextlib.contextmanager
def file_lock(run_dir: Path, logger: Any = None, timeout_s: float | None = None,
              poll_s: float = POLL_SECONDS) -> Iterator[None]:
    """Hold `flock` on run_dir/.satdet-run.lock (waiting, with one log line, while another process does)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        start = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    held = holder_info(path)
                    who = ", ".join(f"{k} {v}" for k, v in held.items()) or "another process"
                    _logger(logger).info("run folder %s is busy (%s); waiting for it", run_dir, who)
                    told = True
                if timeout_s is not None and time.monotonic() - start > timeout_s:
                    raise SatdetError(f"{run_dir}: still busy after {timeout_s:.0f} s (held by {holder_info(path)})")
                time.sleep(poll_s)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.now(UTC).isoformat(timespec="seconds"), **_run_ids()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        if told:
            _logger(logger).info("run folder %s is free: going on (waited %.0f s)", run_dir, time.monotonic() - start)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock (the kernel does the same if we die)


# ------------------------------------------------------------------------------------------------ server slot
def server_configured() -> bool:
    """True when a Prefect API URL is set (a server or test harness); False on the temporary local API,
    whose per-process servers run no lease repossessor (a crashed run's slot would stay taken)."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def ensure_limit(name: str) -> Any:
    """Create the global concurrency limit `name` (limit 1) unless it exists; returns it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):  # another run created it first
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        return client.read_global_concurrency_limit_by_name(name)


@contextlib.contextmanager
def server_slot(run_dir: Path, logger: Any = None, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the run folder's global concurrency slot (when a server is configured)."""
    if not server_configured():
        yield
        return
    from prefect.concurrency.sync import concurrency

    name = limit_name(run_dir)
    limit = ensure_limit(name)
    if limit.active_slots >= max(limit.limit, 1):
        _logger(logger).info("run folder %s is busy (global concurrency limit %s taken); queued", run_dir, name)
    holder = None
    if flow_run_id := _run_ids().get("flow_run_id"):
        from prefect.client.schemas.objects import ConcurrencyLeaseHolder

        holder = ConcurrencyLeaseHolder(type="flow_run", id=flow_run_id)
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, lease_duration=LEASE_SECONDS, strict=True,
                     holder=holder, raise_on_lease_renewal_failure=False):
        yield


# ------------------------------------------------------------------------------------------------ both
@contextlib.contextmanager
def run_folder_lock(run_dir: str | Path, logger: Any = None, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the run folder exclusively (server slot, then file lock); re-entrant within one run context."""
    key = str(Path(run_dir).resolve())
    if key in _HELD.get():
        yield
        return
    with server_slot(Path(key), logger, timeout_s), file_lock(Path(key), logger, timeout_s):
        token = _HELD.set(_HELD.get() | {key})
        try:
            yield
        finally:
            _HELD.reset(token)
