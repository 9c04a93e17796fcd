"""Shared stand-ins for trainer tests: a tiny detector-shaped model and a synthetic dataset."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_collection_finish(session):
    """Modules here that define `start_in_background()` (subprocess tests) get it called once, as soon as the
    run is known to include them: their subprocess then works alongside the tests that run first."""
    if session.config.option.collectonly:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    started = set()
    for item in session.items:
        module = getattr(item, "module", None)
        start = getattr(module, "start_in_background", None)
        if start is None or module in started or os.path.dirname(os.path.abspath(module.__file__)) != here:
            continue
        started.add(module)
        start()
