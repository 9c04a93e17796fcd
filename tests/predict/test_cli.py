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
