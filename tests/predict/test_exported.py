"""pipeline/predict/exported.py: finding the export before TensorFlow is imported."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import SatdetError
from pipeline.predict.exported import resolve_export_dir


def test_model_dir_that_is_not_an_export_is_an_error(tmp_path):
    with pytest.raises(SatdetError, match="not a satdet model export"):
        resolve_export_dir(tmp_path)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model_info.json").write_text(json.dumps({"tile_size": 64}))
    assert resolve_export_dir(tmp_path) == tmp_path / "export"


def test_missing_model_folder_is_an_error(tmp_path):
    with pytest.raises(SatdetError, match="model folder not found"):
        resolve_export_dir(tmp_path / "gone")
