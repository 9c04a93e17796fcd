"""One training per run folder: overlapping flow runs of one run folder queue (the run folder's global
concurrency limit on a server, an OS file lock always), and a crashed holder cannot keep the lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import pipeline.evaluate.run as eval_stage
import pipeline.train.run as train_stage
from flows import locking, training
from pipeline.errors import SatdetError

from .flowkit import fake_evaluation, fake_training, tiny_config, write_config

REPO = Path(__file__).resolve().parents[2]


class Writers:
    """Wraps stages that write the run folder: records (run, stage, start, end) and the most that ran at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0
        self.spans: list[tuple[int, str, float, float]] = []
        self.training = threading.Event()
        self.slots_seen: list[int] = []

    def wrap(self, stage: str, impl, hold_s: float = 0.0):
        def wrapped(config, *args, **kwargs):
            with self.lock:
                self.active += 1
                self.most = max(self.most, self.active)
            start = time.monotonic()
            try:
                if stage == "train":
                    self.training.set()
                    if locking.server_configured():  # what the server says about the folder meanwhile
                        self.slots_seen.append(locking.ensure_limit(locking.limit_name(config.run_dir)).active_slots)
                    time.sleep(hold_s)
                return impl(config, *args, **kwargs)
            finally:
                with self.lock:
                    self.active -= 1
                    self.spans.append((config.train.steps, stage, start, time.monotonic()))

        return wrapped

    def span(self, steps: int, stage: str) -> tuple[float, float]:
        (found,) = [(s, e) for n, st, s, e in self.spans if (n, st) == (steps, stage)]
        return found


@pytest.mark.parametrize("layers", ["server+file", "file"])
def test_overlapping_runs_of_one_run_folder_queue(prefect_api, scenes, tmp_path, monkeypatch, layers):
    """Run B starts while run A trains, on the same run folder with a different train.steps (so B must
    retrain): B's stages only start once A has evaluated; never two writers at once."""
    if layers == "file":  # as on the temporary local API: the file lock alone
        monkeypatch.setattr(locking, "server_configured", lambda: False)
    writers = Writers()
    monkeypatch.setattr(train_stage, "run_training", writers.wrap("train", fake_training, hold_s=4.0))
    monkeypatch.setattr(eval_stage, "run_evaluation", writers.wrap("evaluate", fake_evaluation))
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "runs", scenes, name=f"lock-{layers}"))
    states: dict[str, object] = {}

    def run(tag: str, steps: int) -> None:
        states[tag] = training.train_pipeline(config_path=str(cfg), overrides=[f"train.steps={steps}"],
                                              return_state=True)

    a = threading.Thread(target=run, args=("a", 4))
    a.start()
    assert writers.training.wait(300), "run A never reached training"
    b = threading.Thread(target=run, args=("b", 6))
    b.start()
    a.join(600)
    b.join(600)
    assert states["a"].is_completed() and states["b"].is_completed(), (states["a"], states["b"])
    assert writers.most == 1
    a_train, a_eval, b_train = writers.span(4, "train"), writers.span(4, "evaluate"), writers.span(6, "train")
    assert b_train[0] >= a_eval[1] > a_train[1]
    if layers == "server+file":
        assert writers.slots_seen == [1, 1]  # the folder's global concurrency slot, held by each in turn
    # The lock file names its last holder.
    assert locking.holder_info(tmp_path / "runs" / f"lock-{layers}")["pid"] == os.getpid()


def test_lock_is_reentrant_within_a_run_and_exclusive_across(tmp_path, monkeypatch):
    """The flow holds the folder and its train/evaluate tasks take it again: no deadlock; another thread
    (another run) waits."""
    monkeypatch.setattr(locking, "server_configured", lambda: False)
    got: list[str] = []
    with locking.run_folder_lock(tmp_path), locking.run_folder_lock(tmp_path):
        t = threading.Thread(target=_take, args=(tmp_path, got))  # a new thread: a new context, another run
        t.start()
        time.sleep(1.0)
        assert got == []  # still waiting
    t.join(10)
    assert got == ["taken"]


def _take(run_dir: Path, got: list[str]) -> None:
    with locking.run_folder_lock(run_dir):
        got.append("taken")


def test_a_killed_holder_cannot_keep_the_run_folder(tmp_path, monkeypatch):
    """SIGKILL (an OOM kill) runs no cleanup, yet the next run gets the folder at once: the kernel drops
    a dead process's flock."""
    monkeypatch.setattr(locking, "server_configured", lambda: False)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from flows.locking import file_lock
            with file_lock(Path({str(tmp_path)!r})):
                print("held", flush=True)
                time.sleep(600)
        """)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SatdetError, match="still busy"), locking.file_lock(tmp_path, timeout_s=1, poll_s=0.2):
            pass
        assert locking.holder_info(tmp_path)["pid"] == holder.pid
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        start = time.monotonic()
        with locking.file_lock(tmp_path, timeout_s=5, poll_s=0.2):
            assert time.monotonic() - start < 2
    finally:
        holder.kill()


def test_limit_name_is_per_folder_and_valid_for_prefect(tmp_path):
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    a, b = locking.limit_name(tmp_path / "runs" / "Demo Run"), locking.limit_name(tmp_path / "other" / "Demo Run")
    assert a != b and a.startswith("satdet-run-demo-run-")
    assert locking.limit_name(tmp_path / "runs" / "x" / ".." / "Demo Run") == a
    GlobalConcurrencyLimitCreate(name=a, limit=1)  # a name the API accepts
