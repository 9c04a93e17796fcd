"""Fixtures for the study tests: two small synthetic scenes (train, val), tiled once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .studykit import CLASSES, tiny_config

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def study_scenes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """Two 128×128 synthetic UTM scenes (EPSG:4326 labels): one train, one val."""
    from pipeline.geo.synth import make_scene

    folder = tmp_path_factory.mktemp("study-scenes")
    out = []
    for i, split in enumerate(["train", "val"]):
        s = make_scene(folder, f"scene{i}", width=128, height=128, seed=i, n_objects=6, classes=CLASSES)
        out.append({"image": str(s.image), "labels": str(s.labels), "split": split})
    return out


@pytest.fixture(scope="session")
def study_tiles(tmp_path_factory: pytest.TempPathFactory, study_scenes) -> Path:
    """The scenes tiled (64 px) once for every test that trains."""
    from pipeline.config import config_from_dict
    from pipeline.geo.tiling import run_tiling

    runs = tmp_path_factory.mktemp("study-tiles")
    return run_tiling(config_from_dict(tiny_config(runs, study_scenes)))
