"""`satdet predict` command line."""

from __future__ import annotations

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
