"""TensorFlow's native start-up notices are filtered from stderr; everything else still reaches the user."""

import os
import subprocess
import sys
from pathlib import Path

from pipeline.tf_quiet import STARTUP_NOISE, drop_startup_noise

ROOT = Path(__file__).resolve().parents[1]
NATIVE_STARTUP = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1795755375.139344   12726 port.cc:153] oneDNN custom operations are on. You may see ...\n"
    "I0000 00:00:1795755375.139843   12726 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU "
    "will not be used.\n"
    "E0000 00:00:1795755380.526838   12726 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n"
)


def _python(code: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if k != "SATDET_TF_STARTUP_LOG"}, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          check=check, timeout=300)


def test_only_the_known_notices_are_dropped():
    real = "E0000 00:00:1.0 op_kernel.cc:1] OOM when allocating tensor\nUserWarning: something real\n"
    assert drop_startup_noise(NATIVE_STARTUP + real, gpu_present=True) == real
    assert drop_startup_noise(NATIVE_STARTUP + real, gpu_present=False) == real


def test_a_cuinit_failure_shows_only_on_a_host_with_a_gpu():
    # a GPU host with a broken driver: the cuInit line is the only hint that training will run on the CPU
    broken = "E0000 cuda_platform.cc:52] failed call to cuInit: CUDA_ERROR_SYSTEM_DRIVER_MISMATCH\n"
    assert drop_startup_noise(broken, gpu_present=True) == broken
    assert drop_startup_noise(broken, gpu_present=False) == ""


def test_a_crash_inside_the_block_still_reaches_the_terminal(tmp_path):
    code = (
        "import os\n"
        "from pipeline.tf_quiet import quiet_native_stderr\n"
        "with quiet_native_stderr():\n"
        "    os.write(2, b'F0000 Check failed: something fatal\\n')\n"
        "    os.abort()\n"
    )
    res = _python(code, check=False, TMPDIR=str(tmp_path))
    assert res.returncode != 0
    assert "Fatal Python error: Aborted" in res.stderr  # faulthandler, on the real stderr
    logs = list(tmp_path.glob("satdet-tf-startup-*.log"))
    assert len(logs) == 1 and "Check failed: something fatal" in logs[0].read_text()


def test_without_a_temporary_file_nothing_is_filtered_and_nothing_breaks(monkeypatch):
    import tempfile

    from pipeline import tf_quiet

    def no_file(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_file)
    before = os.fstat(2)
    with tf_quiet.quiet_native_stderr():
        during = os.fstat(2)
    assert (during.st_ino, during.st_dev) == (before.st_ino, before.st_dev) == (os.fstat(2).st_ino, os.fstat(2).st_dev)


def test_native_writes_to_fd_2_are_filtered_and_the_rest_replayed(tmp_path):
    code = (
        "import os\n"
        "from pipeline.tf_quiet import quiet_native_stderr\n"
        "with quiet_native_stderr():\n"
        f"    os.write(2, {NATIVE_STARTUP.encode()!r})\n"
        "    os.write(2, b'a real native error\\n')\n"
        "os.write(2, b'after\\n')\n"
    )
    assert _python(code, TMPDIR=str(tmp_path)).stderr == "a real native error\nafter\n"
    assert not list(tmp_path.glob("satdet-tf-startup-*.log"))  # removed once replayed


def test_importing_tensorflow_through_it_prints_no_startup_notice():
    res = _python("from pipeline.tf_quiet import import_tensorflow; print(import_tensorflow().__version__)")
    assert res.stdout.strip().startswith("2.")
    assert not [n for n in STARTUP_NOISE if n in res.stderr], res.stderr
