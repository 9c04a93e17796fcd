"""pipeline/evaluate/run.py with the bright-square test double (fast; the trained-model run is in test_end_to_end)."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import shapely
import tensorflow as tf

from pipeline.config import Config
from pipeline.data.records import encode_tile
from pipeline.errors import SatdetError
from pipeline.predict import exported
from tests.predict.fakes import ORIGIN, PIXEL, BrightSquareDetector, write_scene

SQUARES = [(10, 10, 24, 24), (40, 30, 52, 42), (90, 50, 106, 64), (58, 90, 72, 104), (120, 120, 134, 134)]


def _tiles_dir(tmp_path, scene_path, labels_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    splits = {"method": "block", "scenes": [{
        "scene": "s", "image": str(scene_path), "labels": str(labels_path), "width": 160, "height": 160,
        "crs": "EPSG:32617", "blocks": [{"window": [0, 0, 80, 160], "split": "train"},
                                        {"window": [80, 0, 80, 160], "split": "test"}]}]}
    (tiles / "splits.json").write_text(json.dumps(splits))
    import rasterio

    with rasterio.open(scene_path) as ds:  # one test tile at rows 40..104, cols 80..144
        img = np.moveaxis(ds.read(window=((40, 104), (80, 144))), 0, -1)
    with tf.io.TFRecordWriter(str(tiles / "test-00000-of-00001.tfrecord")) as w:
        w.write(encode_tile(img, np.array([[10.0, 10.0, 26.0, 24.0]]), np.array([1]), "t0", "s"))
    return tiles


def _labels(tmp_path, squares=SQUARES):
    polys = [shapely.box(ORIGIN[0] + x0 * PIXEL, ORIGIN[1] - y1 * PIXEL, ORIGIN[0] + x1 * PIXEL, ORIGIN[1] - y0 * PIXEL)
             for x0, y0, x1, y1 in squares]
    gdf = gpd.GeoDataFrame({"label": ["tree"] * len(polys)}, geometry=polys, crs=32617).to_crs(4326)
    path = tmp_path / "s.geojson"
    gdf.to_file(path, driver="GeoJSON")
    return path


def test_scene_level_evaluation_of_a_perfect_detector(tmp_path, monkeypatch):
    from pipeline.evaluate.run import run_evaluation

    scene = write_scene(tmp_path / "s.tif", 160, 160, SQUARES)
    tiles = _tiles_dir(tmp_path, scene, _labels(tmp_path))
    monkeypatch.setattr(exported, "resolve_export_dir", lambda p: p)
    monkeypatch.setattr(exported, "load_detector", lambda p: BrightSquareDetector(tile_size=64))
    cfg = Config(classes=["tree", "car"], predict={"overlap": 16}, evaluate={"split": "test", "examples": 2})
    out = run_evaluation(cfg, tmp_path / "model", tiles, tmp_path / "eval")
    for name in ("metrics.json", "report.md", "pr_curve.png", "examples.png", "detections.geojson"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    # test block x in [80, 160): squares 3 and 5 whole, none cut (square 2 at x 40..52 is in train)
    assert metrics["n_blocks"] == 1 and metrics["scene"]["n_gt"] == 2
    assert metrics["scene"]["AP50"] == pytest.approx(1.0) and metrics["scene"]["AP"] == pytest.approx(1.0)
    assert metrics["scene"]["prf"]["0.5"]["f1"] == pytest.approx(1.0)
    assert metrics["n_tiles"] == 1 and metrics["tile"]["AP50"] == pytest.approx(1.0)
    dets = gpd.read_file(out / "detections.geojson").to_crs(32617)
    assert len(dets) == 2
    assert "| AP50 | 1.000 |" in (out / "report.md").read_text()


def test_block_edge_uses_the_tiling_edge_policy(tmp_path, monkeypatch):
    from pipeline.evaluate.run import evaluate_scenes

    # a square cut 4/14 by the block edge at x = 80: 10/14 inside the test block -> kept, clipped
    squares = [(70, 10, 84, 24), (76, 40, 90, 54)]
    scene = write_scene(tmp_path / "s.tif", 160, 160, squares)
    tiles = _tiles_dir(tmp_path, scene, _labels(tmp_path, squares))
    cfg = Config(classes=["tree", "car"], predict={"overlap": 16}, tiling={"min_visibility": 0.6})
    [block] = evaluate_scenes(cfg, BrightSquareDetector(tile_size=64), tiles)
    # (70..84): 4/14 inside -> dropped at 0.6; (76..90): 10/14 inside -> kept as 80..90
    np.testing.assert_allclose(block.gt_boxes, [[80, 40, 90, 54]])
    np.testing.assert_allclose(np.sort(block.detections.boxes, 0), [[80, 10, 84, 24], [80, 40, 90, 54]])


def test_blocks_are_normalised_with_the_whole_scene_statistics(tmp_path, monkeypatch):
    """A validation block is scored as `satdet predict` on its scene delivers it: scene normalisation measures
    the whole scene once, not the block alone (whose stretch can differ a lot from the scene's)."""
    from pipeline.evaluate.run import evaluate_scenes
    from pipeline.predict import adapt

    scene = write_scene(tmp_path / "s.tif", 160, 160, SQUARES)
    tiles = _tiles_dir(tmp_path, scene, _labels(tmp_path))
    measured = []
    real_stats = adapt.scene_stats

    def spy(path, bands, percentiles, max_pixels=200_000, region=None, **kwargs):
        measured.append(region)
        return real_stats(path, bands, percentiles, max_pixels, region=region, **kwargs)

    monkeypatch.setattr(adapt, "scene_stats", spy)
    detector = BrightSquareDetector(tile_size=64)
    detector.info["stats"] = {"dtype": "uint8", "channels": 3, "percentiles": [1.0, 99.0], "low": [0.0] * 3,
                              "high": [255.0] * 3, "mean": [128.0] * 3, "std": [64.0] * 3}
    cfg = Config(classes=["tree", "car"], predict={"overlap": 16, "normalize": "scene"}, evaluate={"split": "test"})
    [block] = evaluate_scenes(cfg, detector, tiles)
    assert block.window == (80, 0, 80, 160)
    assert measured == [None]  # one measurement, over the whole scene


def test_nothing_to_evaluate_is_an_error(tmp_path, monkeypatch):
    from pipeline.evaluate.run import run_evaluation

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    (tiles / "splits.json").write_text(json.dumps({"method": "scene", "scenes": []}))
    monkeypatch.setattr(exported, "resolve_export_dir", lambda p: p)
    monkeypatch.setattr(exported, "load_detector", lambda p: BrightSquareDetector())
    with pytest.raises(SatdetError, match="no labelled test blocks"):
        run_evaluation(Config(classes=["tree", "car"]), tmp_path, tiles, tmp_path / "eval")


def _other_site(tmp_path, squares):
    """A second labelled scene outside the tiling config (another 'site'), labels as pixel CSV."""
    scene = write_scene(tmp_path / "other.tif", 120, 100, squares)
    csv = tmp_path / "other.csv"
    csv.write_text("image_path,xmin,ymin,xmax,ymax,label\n" + "".join(
        f"other.tif,{x0},{y0},{x1},{y1},tree\n" for x0, y0, x1, y1 in squares))
    return scene, csv


def test_extra_scenes_are_scored_whole_with_a_per_scene_table(tmp_path, monkeypatch):
    from pipeline.evaluate.run import run_evaluation

    scene = write_scene(tmp_path / "s.tif", 160, 160, SQUARES)
    tiles = _tiles_dir(tmp_path, scene, _labels(tmp_path))
    # the detector finds 3 of the 4 labelled objects of the other scene (one label has no square)
    other, labels = _other_site(tmp_path, [(5, 5, 20, 20), (40, 60, 55, 75), (90, 10, 110, 30)])
    csv_text = labels.read_text() + "other.tif,60,5,75,20,tree\n"
    labels.write_text(csv_text)
    monkeypatch.setattr(exported, "resolve_export_dir", lambda p: p)
    monkeypatch.setattr(exported, "load_detector", lambda p: BrightSquareDetector(tile_size=64))
    cfg = Config(classes=["tree", "car"], predict={"overlap": 16, "score_threshold": 0.5},
                 evaluate={"split": "test", "scenes": [{"image": str(other), "labels": str(labels)}]})
    out = run_evaluation(cfg, tmp_path / "model", tiles, tmp_path / "eval")
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_scene"]) == {"s", "other"}
    o = metrics["per_scene"]["other"]
    assert o["n_gt"] == 4 and o["AP50"] == pytest.approx(0.75, abs=0.01)
    assert o["at_output_threshold"]["0.5"]["recall"] == pytest.approx(0.75)
    assert o["at_output_threshold"]["0.5"]["precision"] == pytest.approx(1.0)
    assert metrics["per_scene"]["s"]["AP50"] == pytest.approx(1.0)
    assert metrics["scene"]["n_gt"] == 2 + 4  # pooled over both
    report = (out / "report.md").read_text()
    assert "## Per scene" in report and "| other | 4 |" in report and "**pooled**" in report


def test_evaluate_command_scores_only_the_given_scene(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app

    squares = [(5, 5, 20, 20), (40, 60, 55, 75)]
    other, labels = _other_site(tmp_path, squares)
    monkeypatch.setattr(exported, "resolve_export_dir", lambda p: p)
    monkeypatch.setattr(exported, "load_detector", lambda p: BrightSquareDetector(tile_size=64))
    config = tmp_path / "c.yaml"
    config.write_text(f"name: r\nruns_dir: {tmp_path}\nclasses: [tree, car]\n")
    out = tmp_path / "eval-other"
    result = CliRunner().invoke(app, ["evaluate", str(config), "--scene", str(other), "--labels", str(labels),
                                      "--only-scenes", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["per_scene"]) == ["other"] and metrics["tile"] is None
    assert metrics["scene"]["AP50"] == pytest.approx(1.0)


def test_evaluate_command_matches_the_training_pixel_size_unless_told_not_to(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from tests.predict.fakes import SizedSquareDetector, write_scene_at

    squares = [(10, 10, 20, 20), (40, 70, 50, 80)]  # 2 m: 10 px at 0.2 m, 20 px at the model's 0.1 m
    scene = write_scene_at(tmp_path / "coarse.tif", 100, 0.2, squares)
    labels = tmp_path / "coarse.csv"
    labels.write_text("image_path,xmin,ymin,xmax,ymax,label\n" + "".join(
        f"coarse.tif,{x0},{y0},{x1},{y1},tree\n" for x0, y0, x1, y1 in squares))

    def detector(_path):
        det = SizedSquareDetector(tile_size=64)
        det.info["pixel_size_m"] = 0.1
        return det

    monkeypatch.setattr(exported, "resolve_export_dir", lambda p: p)
    monkeypatch.setattr(exported, "load_detector", detector)
    config = tmp_path / "c.yaml"
    config.write_text(f"name: r\nruns_dir: {tmp_path}\nclasses: [tree, car]\npredict: {{normalize: train}}\n")
    found = {}
    for flag in ("--match-resolution", "--no-match-resolution"):
        out = tmp_path / flag
        result = CliRunner().invoke(app, ["evaluate", str(config), "--scene", str(scene), "--labels", str(labels),
                                          "--only-scenes", "--out", str(out), flag])
        assert result.exit_code == 0, result.output
        metrics = json.loads((out / "metrics.json").read_text())
        found[flag] = (metrics["scene"]["AP50"], metrics["adaptation"]["match_resolution"])
        assert f"resolution matching `{flag == '--match-resolution'}`" in (out / "report.md").read_text()
    assert found["--match-resolution"] == (pytest.approx(1.0), True)
    assert found["--no-match-resolution"] == (pytest.approx(0.0), False)  # 10 px squares: too small for it


def test_evaluate_command_needs_one_labels_per_scene(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    other, _ = _other_site(tmp_path, [(5, 5, 20, 20)])
    config = tmp_path / "c.yaml"
    config.write_text("name: r\n")
    result = CliRunner().invoke(app, ["evaluate", str(config), "--scene", str(other)])
    assert result.exit_code == 2 and "one --labels per --scene" in result.output


def test_missing_evaluation_scene_is_a_one_line_error(tmp_path, monkeypatch):
    from pipeline.evaluate.run import evaluate_scenes

    cfg = Config(classes=["tree"], evaluate={"only_scenes": True,
                                             "scenes": [{"image": str(tmp_path / "gone.tif"), "labels": "x.csv"}]})
    with pytest.raises(SatdetError, match="gone.tif: evaluation scene not found"):
        evaluate_scenes(cfg, BrightSquareDetector(), tmp_path)


class _Recorder:
    """A raw-pixel detector that records what it is given and finds nothing."""

    def __init__(self, info):
        self.info, self.seen = info, []

    def predict(self, images):
        self.seen.append(np.asarray(images).copy())
        b = len(images)
        return {"boxes": np.zeros((b, 1, 4), np.float32), "scores": np.zeros((b, 1), np.float32),
                "classes": np.zeros((b, 1), np.int32), "num_detections": np.zeros(b, np.int32)}


@pytest.mark.parametrize("training_normalize", ["global", "scene"])
def test_tile_evaluation_feeds_each_tile_the_stretch_the_model_trained_with(tmp_path, training_normalize):
    from pipeline.data.stats import normalize_numpy, scene_stats_of
    from pipeline.evaluate.run import evaluate_tiles

    pooled = {"dtype": "uint8", "bands": [1, 2, 3], "channels": 3, "percentiles": [1, 99],
              "low": [0.0] * 3, "high": [255.0] * 3, "mean": [120.0] * 3, "std": [50.0] * 3,
              "scenes": {"s": {"low": [20.0] * 3, "high": [120.0] * 3, "mean": [60.0] * 3, "std": [25.0] * 3}}}
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    (tiles / "stats.json").write_text(json.dumps(pooled))
    img = np.random.default_rng(0).integers(10, 130, (64, 64, 3), dtype=np.uint8)
    with tf.io.TFRecordWriter(str(tiles / "test-00000-of-00001.tfrecord")) as w:
        w.write(encode_tile(img, np.array([[10.0, 10.0, 26.0, 24.0]]), np.array([1]), "t0", "s"))
    det = _Recorder({"stats": pooled, "training_normalize": training_normalize, "dtype": "uint8"})
    cfg = Config.model_validate({"name": "x", "classes": ["tree"], "evaluate": {"split": "test"}})
    _, n = evaluate_tiles(cfg, det, tiles)
    assert n == 1 and len(det.seen) == 1
    given = normalize_numpy(det.seen[0][0], pooled)  # what the export's own (pooled) normalisation makes of it
    own = normalize_numpy(img, scene_stats_of(pooled, "s"))
    if training_normalize == "scene":  # the scene's stretch, up to the uint8 rounding of the moved pixels
        assert np.abs(given - own).max() < 0.05
    else:
        np.testing.assert_array_equal(det.seen[0][0], img)
        assert np.abs(given - own).max() > 0.5
