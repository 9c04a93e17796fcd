"""pipeline/predict/vectors.py: GeoJSON/GeoPackage outputs are valid and round-trip to the same boxes."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest

from pipeline.config import PredictConfig
from pipeline.errors import SatdetError
from pipeline.predict import exported
from pipeline.predict.scene import SceneDetections, predict_scenes
from pipeline.predict.vectors import write_detections

from .fakes import ORIGIN, PIXEL, BrightSquareDetector, write_scene


def _dets(name="a", crs="EPSG:32617"):
    return SceneDetections(
        scene=name, path=f"{name}.tif", boxes=np.array([[10.0, 20.0, 30.0, 50.0], [0.0, 0.0, 5.0, 5.0]]),
        scores=np.array([0.9, 0.4]), labels=np.array([1, 2]), class_names=["tree", "car"], crs=crs,
        transform=(PIXEL, 0.0, ORIGIN[0], 0.0, -PIXEL, ORIGIN[1]), region=(0, 0, 64, 64))


def _map_box(b):
    x0, y0, x1, y1 = b
    return [ORIGIN[0] + x0 * PIXEL, ORIGIN[1] - y1 * PIXEL, ORIGIN[0] + x1 * PIXEL, ORIGIN[1] - y0 * PIXEL]


def test_geojson_is_rfc7946_and_round_trips_to_the_same_boxes(tmp_path):
    out = write_detections([_dets("a"), _dets("b")], tmp_path / "d.geojson", "geojson")
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection" and "crs" not in doc  # RFC 7946: WGS84 implied, no crs member
    assert len(doc["features"]) == 4
    lon, lat = doc["features"][0]["geometry"]["coordinates"][0][0]
    assert -82 < lon < -80 and 29 < lat < 30.5  # UTM 17N near OSBS, Florida
    gdf = gpd.read_file(out)
    assert gdf.crs.to_epsg() == 4326
    assert list(gdf["label"]) == ["tree", "car", "tree", "car"] and list(gdf["scene"]) == ["a", "a", "b", "b"]
    np.testing.assert_allclose(gdf["score"], [0.9, 0.4, 0.9, 0.4])
    back = gdf.to_crs(32617).geometry.bounds.to_numpy()
    # RFC 7946 writes 7 decimals of degrees (~1 cm), so the round trip is exact to a couple of cm
    np.testing.assert_allclose(back[0], _map_box([10, 20, 30, 50]), atol=0.03)
    np.testing.assert_allclose(back[1], _map_box([0, 0, 5, 5]), atol=0.03)


def test_gpkg_keeps_the_scene_crs_with_one_layer_per_scene(tmp_path):
    import pyogrio

    out = write_detections([_dets("a"), _dets("b")], tmp_path / "d.gpkg", "gpkg")
    assert sorted(name for name, _ in pyogrio.list_layers(out)) == ["a", "b"]
    gdf = gpd.read_file(out, layer="a")
    assert gdf.crs.to_epsg() == 32617
    np.testing.assert_allclose(gdf.geometry.bounds.to_numpy()[0], _map_box([10, 20, 30, 50]), atol=1e-6)


def test_gpkg_of_a_scene_in_pixel_coordinates_writes_quietly(tmp_path):
    import warnings

    import pyogrio

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no driver warning about the temp file's name, none about the CRS
        out = write_detections([_dets("plain", crs=None)], tmp_path / "d.gpkg", "gpkg")
    assert [name for name, _ in pyogrio.list_layers(out)] == ["plain"]
    assert gpd.read_file(out).crs is None and len(gpd.read_file(out)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.gpkg"]  # no temp file left beside it


def test_empty_result_is_a_valid_empty_collection(tmp_path):
    d = _dets()
    d.boxes, d.scores, d.labels = np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
    out = write_detections([d], tmp_path / "e.geojson")
    assert json.loads(out.read_text()) == {"type": "FeatureCollection", "features": []}


def test_geojson_of_a_scene_without_crs_is_an_error(tmp_path):
    with pytest.raises(SatdetError, match="no CRS"):
        write_detections([_dets(crs=None)], tmp_path / "x.geojson")
    assert not (tmp_path / "x.geojson").exists()


def test_predict_scenes_writes_per_run_and_per_scene_files(tmp_path, monkeypatch):
    a = write_scene(tmp_path / "a.tif", 100, 100, [(55, 10, 70, 25)])
    b = write_scene(tmp_path / "b.tif", 80, 80, [(5, 5, 15, 15), (40, 40, 50, 50)])
    monkeypatch.setattr(exported, "load_detector", lambda path: BrightSquareDetector())
    cfg = PredictConfig(overlap=24, score_threshold=0.1)
    [one] = predict_scenes(tmp_path / "model", [a, b], tmp_path / "all.geojson", cfg, show_progress=False)
    gdf = gpd.read_file(one)
    assert sorted(gdf["scene"]) == ["a", "b", "b"]
    files = predict_scenes(tmp_path / "model", [a, b], tmp_path / "per", cfg, fmt="gpkg", per_scene=True,
                           show_progress=False)
    assert [f.name for f in files] == ["a.gpkg", "b.gpkg"]
    back = gpd.read_file(files[0]).geometry.bounds.to_numpy()
    np.testing.assert_allclose(back[0], _map_box([55, 10, 70, 25]), atol=1e-6)
