"""`satdet predict` command line."""

from __future__ import annotations

import json

import geopandas as gpd
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.predict import exported

from .fakes import BrightSquareDetector, write_scene


def test_predict_command_writes_geojson_with_options(tmp_path, monkeypatch):
    scene = write_scene(tmp_path / "s.tif", 100, 100, [(10, 10, 20, 20), (60, 60, 70, 70)], class2=[1])
    monkeypatch.setattr(exported, "load_detector", lambda p: BrightSquareDetector(tile_size=64))
    out = tmp_path / "d.geojson"
    result = CliRunner().invoke(app, ["predict", str(tmp_path), str(scene), "--out", str(out),
                                      "--score-threshold", "0.1", "--overlap", "24", "--batch", "2"])
    assert result.exit_code == 0, result.output
    gdf = gpd.read_file(out)
    assert sorted(gdf["label"]) == ["car", "tree"] and set(gdf["scene"]) == {"s"}


def test_predict_command_reports_a_non_export_in_one_line(tmp_path):
    scene = write_scene(tmp_path / "s.tif", 64, 64, [])
    result = CliRunner().invoke(app, ["predict", str(tmp_path), str(scene), "--out", str(tmp_path / "d.geojson")])
    assert result.exit_code == 2
    assert "not a satdet model export" in result.output


def _capture_predict(monkeypatch) -> list:
    from pipeline.predict import scene as scene_module

    seen = []
    monkeypatch.setattr(scene_module, "predict_scenes", lambda model, scenes, out, cfg, **kw: seen.append(cfg) or [])
    return seen


def test_predict_starts_from_the_test_time_settings_stored_with_the_model(tmp_path, monkeypatch):
    (tmp_path / "export").mkdir()
    info = {"classes": ["tree"], "predict": {"normalize": "train", "adapt_bn": False, "tta": True}}
    (tmp_path / "export" / "model_info.json").write_text(json.dumps(info))
    seen = _capture_predict(monkeypatch)
    args = ["predict", str(tmp_path), str(tmp_path / "s.tif"), "--out", str(tmp_path / "d.geojson")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen[-1].tta is True and seen[-1].normalize == "train"
    assert "test-time settings from the model: normalize=train, tta=True" in result.output
    assert CliRunner().invoke(app, [*args, "--no-tta", "--normalize", "scene"]).exit_code == 0
    assert seen[-1].tta is False and seen[-1].normalize == "scene"  # flags win
    config = tmp_path / "c.yaml"
    config.write_text("predict:\n  overlap: 32\n")
    assert CliRunner().invoke(app, [*args, "--config", str(config)]).exit_code == 0
    assert seen[-1].tta is False and seen[-1].overlap == 32  # a config's predict section replaces them
    info.pop("predict")  # an export written before the settings were stored: library defaults
    (tmp_path / "export" / "model_info.json").write_text(json.dumps(info))
    assert CliRunner().invoke(app, args).exit_code == 0
    assert seen[-1].tta is False and seen[-1].normalize == "scene"


def test_predict_names_a_broken_model_info_in_one_line(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model_info.json").write_text("{not json")
    result = CliRunner().invoke(app, ["predict", str(tmp_path), str(tmp_path / "s.tif"), "--out", str(tmp_path / "d.geojson")])
    assert result.exit_code == 2 and "model_info.json: not a JSON object" in result.output
    assert "Traceback" not in result.output


def test_predict_names_the_score_threshold_the_model_brings(tmp_path, monkeypatch):
    (tmp_path / "export").mkdir()
    info = {"classes": ["tree"], "output_threshold": {"score_threshold": 0.4123, "rule": "max_recall_at_precision_0.5",
                                                      "level": "scene", "precision": 0.51, "recall": 0.64}}
    (tmp_path / "export" / "model_info.json").write_text(json.dumps(info))
    _capture_predict(monkeypatch)
    args = ["predict", str(tmp_path), str(tmp_path / "s.tif"), "--out", str(tmp_path / "d.geojson")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert ("score threshold 0.412 from the model (most recall at precision >= 0.5 on its validation blocks, "
            "predicted as satdet predict does: precision 0.51, recall 0.64; --score-threshold overrides)") in result.output
    info["output_threshold"] = {"score_threshold": 0.6, "level": "tile", "precision": 0.7, "recall": 0.5}  # older
    (tmp_path / "export" / "model_info.json").write_text(json.dumps(info))
    assert "0.600 from the model (best F1 on its validation tiles" in CliRunner().invoke(app, args).output
    info["output_threshold"] = None
    (tmp_path / "export" / "model_info.json").write_text(json.dumps(info))
    assert "score threshold 0.3 (the model stores none" in CliRunner().invoke(app, args).output
    quiet = CliRunner().invoke(app, [*args, "--score-threshold", "0.2"]).output
    assert "score threshold" not in quiet  # the user's own: nothing to explain
    (tmp_path / "export" / "model_info.json").write_text(json.dumps({**info, "predict": [1]}))
    broken = CliRunner().invoke(app, args)
    assert broken.exit_code == 2 and "'predict' is not a JSON object" in broken.output
