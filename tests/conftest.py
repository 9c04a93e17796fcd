"""Session-wide test settings, applied before anything imports TensorFlow."""

from __future__ import annotations

import os

# XLA's CPU backend spends much of a jit compile in LLVM's optimisation passes. The tests that compile
# with XLA (tests/model/test_detector.py, tests/train/test_step.py) check that the graph compiles and
# what it computes, not how fast the machine code runs, so they compile at LLVM -O0: the same HLO graph
# and op semantics, only less-optimised machine code, for about a third less compile time. XLA parses
# XLA_FLAGS once, at its first compile, so this must happen at import time; a caller's setting wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
