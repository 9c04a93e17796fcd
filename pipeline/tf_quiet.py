"""Import TensorFlow without its native start-up chatter on the terminal.

TensorFlow 2.21 writes a few lines from C++ before its logging is set up ("All log messages before
absl::InitializeLog()...", the oneDNN notice, "Could not find cuda drivers", and on a machine without a GPU
an `E... failed call to cuInit` that looks like a failure but is not). TF_CPP_MIN_LOG_LEVEL does not reach
them. `import_tensorflow()` runs the import and the first device enumeration with file descriptor 2
pointed at a temporary file, then writes back every line except those known start-up notices, so real
errors and warnings still reach the user. A cuInit failure is dropped only where there is no GPU (no
/dev/nvidia* device, or "Could not find cuda drivers"); on a GPU host with a broken driver it is the
message that explains a CPU run, and it shows. Set SATDET_TF_STARTUP_LOG=1 to see everything.

Should the process die during the import (a fatal TensorFlow check, an unsupported CPU), faulthandler
prints the Python traceback to the real stderr, and the captured lines stay in
`$TMPDIR/satdet-tf-startup-<pid>.log`.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

# Substrings of native start-up lines that carry no information for a user of this tool.
STARTUP_NOISE = (
    "All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on",
    "Could not find cuda drivers on your machine",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions",
)
NO_DRIVER = "Could not find cuda drivers on your machine"
CUINIT_FAILED = "failed call to cuInit"  # noise only where there is no driver at all

_imported = False
_lock = threading.Lock()


def gpu_device_present() -> bool:
    """Whether the host exposes an NVIDIA device node (a driver is installed and a GPU is visible)."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def drop_startup_noise(text: str, gpu_present: bool | None = None) -> str:
    """`text` without the lines that are known TensorFlow start-up notices (a cuInit failure is one only
    where there is no GPU device or no driver)."""
    if gpu_present is None:
        gpu_present = gpu_device_present()
    noise = STARTUP_NOISE + ((CUINIT_FAILED,) if NO_DRIVER in text or not gpu_present else ())
    return "".join(line for line in text.splitlines(keepends=True) if not any(n in line for n in noise))


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Point file descriptor 2 at a temporary file for the block, then write back all but the start-up
    notices (C++ libraries write to the descriptor, not to sys.stderr). Unfiltered if no file can be made."""
    try:
        capture = tempfile.NamedTemporaryFile(prefix=f"satdet-tf-startup-{os.getpid()}-", suffix=".log",  # noqa: SIM115
                                              delete=False)
    except OSError:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    fault_handler_was_on = faulthandler.is_enabled()
    real_stderr = os.dup(saved)
    faulthandler.enable(file=real_stderr)  # a fatal signal inside the block still reaches the terminal
    os.dup2(capture.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        faulthandler.disable()
        if fault_handler_was_on:  # back on the real descriptor 2 (sys.stderr may have no fileno, e.g. in tests)
            faulthandler.enable(file=2)
        os.close(real_stderr)
        capture.seek(0)
        rest = drop_startup_noise(capture.read().decode(errors="replace"))
        capture.close()
        Path(capture.name).unlink(missing_ok=True)
        if rest:
            sys.stderr.write(rest)
            sys.stderr.flush()


def import_tensorflow() -> ModuleType:
    """`import tensorflow` and enumerate devices once, filtering the native start-up notices from stderr."""
    global _imported
    with _lock:  # fd 2 is process-wide: two threads must not swap it at once
        if _imported or os.environ.get("SATDET_TF_STARTUP_LOG") == "1":
            import tensorflow as tf

            return tf
        with quiet_native_stderr():
            import tensorflow as tf

            tf.config.list_physical_devices()  # the CUDA probe (cuInit) happens here, not at import
        _imported = True
        return tf
