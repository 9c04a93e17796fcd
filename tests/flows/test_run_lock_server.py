"""The server half of the run-folder lock on a real Prefect server (`prefect server start` on loopback,
with its services): a run that is killed while it holds the run folder's global concurrency slot cannot
keep it, because the server's repossessor frees the slot once the dead run's lease expires."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PREFECT = Path(sys.executable).parent / "prefect"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db"}
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("w")
    proc = subprocess.Popen([str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(1)
        yield api
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _client(api: str, code: str) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_killed_run_cannot_keep_the_run_folders_global_slot(server, tmp_path):
    run_dir = tmp_path / "runs" / "crashy"
    holder = _client(server, f"""
        import time
        from pathlib import Path
        from flows.locking import server_slot
        with server_slot(Path({str(run_dir)!r})):
            print("held", flush=True)
            time.sleep(600)
    """)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        waiter = f"""
            import time
            from pathlib import Path
            from flows.locking import server_slot
            start = time.monotonic()
            try:
                with server_slot(Path({str(run_dir)!r}), timeout_s={{timeout}}):
                    print(f"got {{{{time.monotonic() - start:.0f}}}}", flush=True)
            except TimeoutError:
                print("busy", flush=True)
        """
        busy = _client(server, waiter.format(timeout=5))
        out, err = busy.communicate(timeout=120)
        assert out.strip() == "busy", (out, err)  # held by the live run: a second one queues

        holder.send_signal(signal.SIGKILL)  # no release, no cleanup: as an OOM kill
        holder.wait(10)
        after = _client(server, waiter.format(timeout=240))
        out, err = after.communicate(timeout=300)
        assert out.startswith("got"), (out, err)
        waited = int(out.split()[1])
        assert waited <= 150  # the 60 s lease ran out and the repossessor freed the slot
    finally:
        holder.kill()
