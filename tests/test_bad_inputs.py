"""The bad-input matrix (issue 16): what `satdet tile` and `satdet predict` do with broken or unusual inputs.

Each case states the exit status, the message and that a failing command leaves nothing behind (no run
folder, no tiles, no temp folders, no detections file). Cases that are fine (empty labels, 1-band uint16,
float32 with a NaN block) must succeed, with the warning the docs promise where there is one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from shapely.geometry import Point, box
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.geo.synth import make_scene
from pipeline.predict import exported
from tests.predict.fakes import BrightSquareDetector

CLASSES = ["crown", "roof", "vehicle"]
EPSG = "EPSG:32633"
TRANSFORM = from_origin(500_000.0, 5_000_000.0, 0.3, 0.3)


# ------------------------------------------------------------------------------------------ inputs
def write_raster(path: Path, data: np.ndarray, crs: str | None = EPSG, nodata: float | None = None,
                 **profile: object) -> Path:
    """A GeoTIFF of `data` (C, H, W) on the synthetic scenes' UTM grid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    c, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c, dtype=data.dtype, crs=crs,
                       transform=TRANSFORM, nodata=nodata, **profile) as ds:
        ds.write(data)
    return path


def truncate(path: Path, fraction: float = 0.6) -> Path:
    """Cut a file short, as a partial download does (the header stays readable)."""
    with open(path, "r+b") as fh:
        fh.truncate(int(os.path.getsize(path) * fraction))
    return path


def pixels(bands: int = 3, dtype: str = "uint8", h: int = 128, w: int = 160, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, 200, (bands, h, w)).astype(dtype)


def labels_at(path: Path, boxes_px: list[tuple[int, int, int, int]], names: list[str], crs: str | None = EPSG,
              points: bool = False) -> Path:
    """Vector labels at pixel boxes of the UTM grid (points at their centres with `points`)."""
    a, _, x0, _, e, y0 = TRANSFORM[:6]
    geoms = [box(x0 + c0 * a, y0 + r1 * e, x0 + c1 * a, y0 + r0 * e) for c0, r0, c1, r1 in boxes_px]
    if points:
        geoms = [Point(g.centroid) for g in geoms]
    gpd.GeoDataFrame({"label": names}, geometry=geoms, crs=crs).to_file(path)
    return path


BOXES = [(10, 10, 30, 30), (90, 60, 110, 84)]


def case_inputs(name: str, d: Path) -> tuple[Path, Path | None]:
    """(image, labels) for one row of the matrix, written under `d`."""
    d.mkdir(parents=True, exist_ok=True)
    good_labels = d / "labels.geojson"
    if name in ("truncated_tiled", "truncated_striped", "no_crs", "uint16_1band", "float32_nan", "non_raster",
                "missing_file", "labels_no_crs", "labels_off_scene", "empty_labels", "points_only",
                "unknown_class"):
        labels_at(good_labels, BOXES, ["crown", "roof"])
    image = d / "scene.tif"
    if name == "truncated_tiled":
        truncate(write_raster(image, pixels(), tiled=True, blockxsize=32, blockysize=32))
    elif name == "truncated_striped":
        truncate(write_raster(image, pixels(), compress="deflate"))
    elif name == "non_raster":
        image.write_text("this is not a GeoTIFF\n")
    elif name == "missing_file":
        image = d / "nowhere.tif"
    elif name == "no_crs":
        write_raster(image, pixels(), crs=None)
    elif name == "uint16_1band":
        write_raster(image, pixels(1, "uint16") * 40)
    elif name == "float32_nan":
        image = write_nan_scene(image)
    else:
        write_raster(image, pixels())
    labels: Path | None = good_labels
    if name == "labels_no_crs":
        labels = labels_at(d / "nocrs.gpkg", BOXES, ["crown", "roof"], crs=None)
    elif name == "labels_off_scene":
        labels = labels_at(d / "off.geojson", [(5000, 5000, 5020, 5020)], ["crown"])
    elif name == "empty_labels":
        labels = d / "empty.geojson"
        labels.write_text('{"type": "FeatureCollection", "features": []}\n')
    elif name == "points_only":
        labels = labels_at(d / "points.geojson", BOXES, ["crown", "roof"], points=True)
    elif name == "unknown_class":
        labels = labels_at(d / "boat.geojson", BOXES, ["crown", "boat"])
    return image, labels


def write_nan_scene(path: Path) -> Path:
    """A float32 3-band scene with NaN as nodata and a 40x40 NaN block (touching 6 of its 9 64-px tiles)."""
    data = (0.1 + pixels(dtype="float32") / 2000).astype("float32")  # dark: the fake detector sees no blob
    data[:, 50:90, 40:80] = np.nan
    data[0, 10:30, 10:30] = 0.9  # a bright square for the fake detector
    return write_raster(path, data, nodata=float("nan"))


def write_config(d: Path, image: Path, labels: Path | None, **tiling: object) -> Path:
    scene = {"image": str(image), "labels": None if labels is None else str(labels)}
    cfg = {
        "name": "t", "runs_dir": str(d / "runs"), "classes": CLASSES,
        "tiling": {"scenes": [scene], "tile_size": 64, "overlap": 16, "workers": 1, "negative_ratio": 1.0,
                   "split": {"method": "scene", "val_fraction": 0.0, "test_fraction": 0.0}, **tiling},
    }
    path = d / "c.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def leftovers(d: Path) -> list[str]:
    """Temp files and folders left anywhere under `d` (atomic writes name them .<name>.*)."""
    return sorted(str(p.relative_to(d)) for p in d.rglob(".*") if p.name not in (".", ".."))


# ------------------------------------------------------------------------------------------ satdet tile
# (case, exit status, message regex; for successes the message is a line the output must contain)
TILE_MATRIX = [
    ("truncated_tiled", 2, (r"scene\.tif: pixel read failed at rows \d+-\d+ \(.*\); the file is corrupt or cut "
                            r"short .*gdalinfo -checksum .*scene\.tif")),
    ("truncated_striped", 2, r"scene\.tif: pixel read failed at rows \d+-\d+ .*gdalinfo -checksum"),
    ("non_raster", 2, r"scene\.tif: not a readable raster .*give a GeoTIFF"),
    ("missing_file", 2, r"nowhere\.tif: image file not found"),
    ("no_crs", 2, r"scene\.tif: raster has no CRS but the labels labels\.geojson are in EPSG:\d+"),
    ("labels_no_crs", 2, r"nocrs\.gpkg: labels have no CRS"),
    ("labels_off_scene", 2, r"off\.geojson: none of the 1 labels overlaps the raster scene\.tif"),
    ("unknown_class", 2, r"boat\.geojson: label class\(es\) \['boat'\] not in the configured classes"),
    ("empty_labels", 0, r"warning: .*empty\.geojson: no labels; every tile of this scene is a negative"),
    ("points_only", 0, r"warning: .*points\.geojson: 2 invalid, empty or non-polygon geometries skipped"),
    ("uint16_1band", 0, r"tiles: train \d+, val 0, test 0"),
    ("float32_nan", 0, r"tiles: train \d+, val 0, test 0"),
]


@pytest.mark.parametrize(("case", "status", "message"), TILE_MATRIX, ids=[c[0] for c in TILE_MATRIX])
def test_tile_matrix(tmp_path, case, status, message):
    image, labels = case_inputs(case, tmp_path / "in")
    config = write_config(tmp_path, image, labels)
    res = CliRunner().invoke(app, ["tile", str(config)])
    assert res.exit_code == status, res.output
    output = " ".join(res.output.split())  # the terminal may wrap a long line
    assert re.search(message, output), res.output
    assert "Traceback" not in res.output
    if status:
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, res.output
        assert not (tmp_path / "runs").exists()  # no tiles, no run folder, no temp folders
    else:
        tiles = tmp_path / "runs" / "t" / "tiles"
        assert (tiles / "stats.json").is_file() and (tiles / "manifest.jsonl").is_file()
    assert leftovers(tmp_path) == []


def test_truncated_scene_in_a_worker_process_is_one_line(tmp_path):
    """Two scenes tiled by two processes: the read error crosses the process pool as the same one line."""
    good = make_scene(tmp_path / "in", "good", 96, 96, seed=0, n_objects=2)
    bad, labels = case_inputs("truncated_tiled", tmp_path / "in2")
    cfg = json.loads(write_config(tmp_path, bad, labels, workers=2).read_text())
    cfg["tiling"]["scenes"].insert(0, {"image": str(good.image), "labels": str(good.labels)})
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["tile", str(tmp_path / "c.yaml")])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert "scene.tif: pixel read failed at rows" in " ".join(res.output.split())
    assert not (tmp_path / "runs").exists() and leftovers(tmp_path) == []


def test_tile_check_reports_every_unreadable_scene_and_tiles_nothing(tmp_path):
    good = make_scene(tmp_path / "in", "good", 96, 96, seed=0, n_objects=2)
    bad, labels = case_inputs("truncated_striped", tmp_path / "in2")
    junk, _ = case_inputs("non_raster", tmp_path / "in3")
    cfg = json.loads(write_config(tmp_path, bad, labels).read_text())
    cfg["tiling"]["scenes"] += [{"image": str(good.image), "labels": str(good.labels)},
                                {"image": str(junk), "labels": None}]
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["tile", str(tmp_path / "c.yaml"), "--check"])
    assert res.exit_code == 2, res.output
    lines = [" ".join(ln.split()) for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 3, res.output
    assert "in2/scene.tif: pixel read failed at rows" in lines[0] and "gdalinfo -checksum" in lines[0]
    assert "in3/scene.tif: not a readable raster" in lines[1]
    assert lines[2] == "error: 2 of 3 scene(s) unreadable; nothing was tiled"
    assert not (tmp_path / "runs").exists()


def test_tile_check_passes_then_tiles(tmp_path):
    good = make_scene(tmp_path / "in", "good", 96, 96, seed=0, n_objects=2)
    res = CliRunner().invoke(app, ["tile", str(write_config(tmp_path, good.image, good.labels)), "--check"])
    assert res.exit_code == 0, res.output
    assert "check: 1 scene(s) read in full, no errors" in res.output
    assert (tmp_path / "runs" / "t" / "tiles" / "stats.json").is_file()


def test_inspect_prints_the_header_and_ok_or_the_error(tmp_path):
    ok = write_raster(tmp_path / "ok.tif", pixels(1, "uint16"), nodata=0)
    cut = truncate(write_raster(tmp_path / "cut.tif", pixels(), tiled=True, blockxsize=32, blockysize=32))
    nocrs = write_raster(tmp_path / "nocrs.tif", pixels(dtype="float32"), crs=None)
    res = CliRunner().invoke(app, ["inspect", str(ok), str(cut), str(nocrs), str(tmp_path / "gone.tif")])
    assert res.exit_code == 2, res.output
    out = [" ".join(ln.split()) for ln in res.output.splitlines()]
    assert f"{ok}: 160x128 px, 1 band uint16, EPSG:32633, nodata 0: OK" in out
    assert f"{cut}: 160x128 px, 3 bands uint8, EPSG:32633, nodata none: UNREADABLE" in out
    assert any(ln.startswith(f"error: {cut}: pixel read failed at rows") for ln in out)
    assert f"{nocrs}: 160x128 px, 3 bands float32, no CRS, nodata none: OK" in out
    assert f"error: {tmp_path / 'gone.tif'}: image file not found; check tiling.scenes[].image (relative paths " \
           "are resolved against the config file's folder)" in out
    assert "Traceback" not in res.output
    res = CliRunner().invoke(app, ["inspect", str(ok)])
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------------------------------ satdet predict
class FiniteCheckingDetector(BrightSquareDetector):
    """The bright-square fake with training statistics, recording whether every window it gets is finite."""

    def __init__(self, dtype: str = "uint8", bands: int = 3) -> None:
        super().__init__(tile_size=64, dtype=dtype, bands=bands)
        self.info["stats"] = {"dtype": dtype, "mean": [0.3] * bands, "std": [0.2] * bands}
        self.finite: list[bool] = []

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.finite.append(bool(np.isfinite(images).all()))
        return super().predict(images * 255 if images.dtype.kind == "f" else images)


# (case, model dtype, exit status, message regex)
PREDICT_MATRIX = [
    ("truncated_tiled", "uint8", 2, (r"scene\.tif: pixel read failed at window col \d+, row \d+, \d+x\d+ px "
                                     r"\(.*\); the file is corrupt or cut short .*gdalinfo -checksum")),
    ("truncated_striped", "uint8", 2, r"scene\.tif: pixel read failed at window col \d+, row \d+"),
    ("non_raster", "uint8", 2, r"scene\.tif: not a readable raster"),
    ("missing_file", "uint8", 2, r"nowhere\.tif: scene file not found"),
    ("no_crs", "uint8", 2, r"scene scene has no CRS, so it cannot be written as EPSG:4326 GeoJSON; use --format gpkg"),
    ("uint16_1band", "uint8", 2, r"scene\.tif: scene has 1 band\(s\) but the model was trained on bands \[1, 2, 3\]"),
    ("float32_nan", "float32", 0, r"d\.geojson"),
]


@pytest.mark.parametrize(("case", "dtype", "status", "message"), PREDICT_MATRIX, ids=[c[0] for c in PREDICT_MATRIX])
def test_predict_matrix(tmp_path, monkeypatch, case, dtype, status, message):
    image, _ = case_inputs(case, tmp_path / "in")
    detector = FiniteCheckingDetector(dtype=dtype)
    monkeypatch.setattr(exported, "load_detector", lambda p: detector)
    out = tmp_path / "out" / "d.geojson"
    res = CliRunner().invoke(app, ["predict", str(tmp_path), str(image), "--out", str(out), "--overlap", "16"])
    assert res.exit_code == status, res.output
    assert re.search(message, " ".join(res.output.split())), res.output
    assert "Traceback" not in res.output
    if status:
        assert not (tmp_path / "out").exists()  # no detections file, not even its folder
    else:
        assert detector.finite and all(detector.finite)  # NaN never reached the model
        found = gpd.read_file(out)
        assert len(found) >= 1  # the bright square, away from the NaN block
    assert leftovers(tmp_path) == []


def test_predict_no_crs_scene_works_as_geopackage(tmp_path, monkeypatch):
    image, _ = case_inputs("no_crs", tmp_path / "in")
    monkeypatch.setattr(exported, "load_detector", lambda p: FiniteCheckingDetector())
    out = tmp_path / "d.gpkg"
    res = CliRunner().invoke(app, ["predict", str(tmp_path), str(image), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file()
