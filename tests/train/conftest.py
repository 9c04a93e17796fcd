"""Shared stand-ins for trainer tests: a tiny detector-shaped model and a synthetic dataset."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
