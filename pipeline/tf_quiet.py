"""Import TensorFlow without its native start-up chatter on the terminal.

TensorFlow 2.21 writes a few lines from C++ before its logging is set up ("All log messages before
absl::InitializeLog()...", the oneDNN notice, "Could not find cuda drivers", and on a machine without a GPU
an `E... failed call to cuInit` that looks like a failure but is not). TF_CPP_MIN_LOG_LEVEL does not reach
them. `import_tensorflow()` runs the import and the first device enumeration with file descriptor 2
pointed at a temporary file, then writes back every line except those known start-up notices, so real
errors and warnings still reach the user. Set SATDET_TF_STARTUP_LOG=1 to see everything.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType

# Substrings of native start-up lines that carry no information for a user of this tool.
STARTUP_NOISE = (
    "All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on",
    "Could not find cuda drivers on your machine",
    "failed call to cuInit",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions",
)

_imported = False


def drop_startup_noise(text: str) -> str:
    """`text` without the lines that are known TensorFlow start-up notices."""
    return "".join(line for line in text.splitlines(keepends=True) if not any(n in line for n in STARTUP_NOISE))


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Point file descriptor 2 at a temporary file for the block, then write back all but the start-up
    notices (C++ libraries write to the descriptor, not to sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            rest = drop_startup_noise(capture.read().decode(errors="replace"))
            if rest:
                sys.stderr.write(rest)
                sys.stderr.flush()


def import_tensorflow() -> ModuleType:
    """`import tensorflow` and enumerate devices once, filtering the native start-up notices from stderr."""
    global _imported
    if _imported or os.environ.get("SATDET_TF_STARTUP_LOG") == "1":
        import tensorflow as tf

        return tf
    with quiet_native_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices()  # the CUDA probe (cuInit) happens here, not at import
    _imported = True
    return tf
