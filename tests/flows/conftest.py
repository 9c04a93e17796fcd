"""Fixtures for the Prefect flow tests: ONE session-scoped Prefect test harness (a temporary SQLite API
server; nesting harnesses breaks them), a private result store, and small synthetic scenes."""

from __future__ import annotations

import os

import pytest

from .flowkit import CLASSES, SPLITS

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory):
    """Run flows against a temporary Prefect API; cached results go to a temp folder, not ~/.prefect."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with (
        temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(storage)}),
        prefect_test_harness(server_startup_timeout=120),
    ):
        yield storage


@pytest.fixture(scope="session")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """Three 128×128 synthetic UTM scenes (labels in EPSG:4326), one per split."""
    from pipeline.geo.synth import make_scene

    folder = tmp_path_factory.mktemp("scenes")
    out = []
    for i, split in enumerate(SPLITS):
        s = make_scene(folder, f"scene{i}", width=128, height=128, seed=i, n_objects=6, classes=CLASSES)
        out.append({"image": str(s.image), "labels": str(s.labels), "split": split})
    return out
