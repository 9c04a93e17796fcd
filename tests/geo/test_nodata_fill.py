"""NaN and nodata never reach the model: float nodata is NaN in the tiles and the band mean (0) once normalised;
prediction windows of float scenes carry the training mean instead."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from pipeline.data.records import decode_tile_numpy
from pipeline.data.stats import fill_nonfinite_numpy, normalize_numpy
from pipeline.geo.raster import nodata_mask
from pipeline.geo.tiling import run_tiling

from .conftest import make_config

BLOCK = (slice(50, 90), slice(40, 80))  # rows, cols of the NaN block: 6 of the 9 64-px tiles touch it


def _float_scene(path: Path, nodata: float | None) -> Path:
    """160x128 float32 RGB with a 40x40 nodata block (NaN, or the finite nodata value) and one bright object."""
    rng = np.random.default_rng(0)
    data = (0.2 + 0.1 * rng.random((3, 128, 160))).astype(np.float32)
    data[:, 10:30, 10:30] = 0.9
    data[(slice(None), *BLOCK)] = np.nan if nodata is None or np.isnan(nodata) else nodata
    with rasterio.open(path, "w", driver="GTiff", width=160, height=128, count=3, dtype="float32",
                       crs="EPSG:32633", transform=from_origin(500_000, 5_000_000, 0.3, 0.3), nodata=nodata) as ds:
        ds.write(data)
    return path


def _tiles(tmp_path: Path, image: Path):  # type: ignore[no-untyped-def]
    import tensorflow as tf

    cfg = make_config(tmp_path, [{"image": image, "labels": None}], negative_ratio=100.0)
    tiles = run_tiling(cfg, tmp_path / "tiles")
    records = [decode_tile_numpy(raw) for shard in sorted(tiles.glob("*.tfrecord"))
               for raw in tf.data.TFRecordDataset(str(shard)).as_numpy_iterator()]
    manifest = {json.loads(ln)["id"]: json.loads(ln) for ln in (tiles / "manifest.jsonl").read_text().splitlines()}
    return cfg, tiles, records, manifest, json.loads((tiles / "stats.json").read_text())


def test_nodata_mask_flags_a_float_pixel_with_any_non_finite_band(tmp_path):
    path = _float_scene(tmp_path / "f.tif", nodata=-9999.0)
    with rasterio.open(path) as ds:
        win = Window(0, 0, 160, 128)
        data = ds.read(window=win)
        data[1, 0, 0], data[2, 0, 1] = np.nan, np.inf  # one bad band is enough
        mask = nodata_mask(ds, data, win, [1, 2, 3])
    assert mask[BLOCK].all() and mask[0, 0] and mask[0, 1]
    assert mask.sum() == 40 * 40 + 2


@pytest.mark.parametrize("nodata", [float("nan"), -9999.0, None], ids=["nan", "value", "unset"])
def test_every_tile_of_a_float_scene_with_a_nan_block_is_finite_after_normalising(tmp_path, nodata):
    image = _float_scene(tmp_path / "f.tif", nodata)
    _, _, records, manifest, stats = _tiles(tmp_path, image)
    assert len(records) == 9 and all(np.isfinite(stats[k]).all() for k in ("low", "high", "mean", "std"))
    assert 0.2 <= min(stats["mean"]) and max(stats["high"]) <= 0.9  # nodata never entered the statistics
    touched = 0
    for rec in records:
        c, r, _, _ = manifest[rec["id"]]["window"]
        nan = np.isnan(rec["image"]).any(axis=2)
        want = np.zeros((64, 64), bool)
        want[max(BLOCK[0].start - r, 0):max(BLOCK[0].stop - r, 0), max(BLOCK[1].start - c, 0):max(BLOCK[1].stop - c, 0)] = True
        assert np.array_equal(nan, want)  # nodata (NaN or the value) is NaN in the tile, and nothing else is
        touched += bool(want.any())
        x = normalize_numpy(rec["image"], stats)
        assert np.isfinite(x).all() and np.all(x[nan] == 0)  # the band mean: 0 after normalisation
        assert np.array_equal(fill_nonfinite_numpy(rec["image"], stats)[nan], np.broadcast_to(
            np.asarray(stats["mean"], np.float32), (int(nan.sum()), 3)))
    assert touched == 6


def test_the_training_and_evaluation_datasets_of_float_tiles_are_finite(tmp_path):
    import tensorflow as tf

    from pipeline.data.dataset import build_dataset
    from pipeline.data.stats import normalize

    cfg, tiles, records, _, stats = _tiles(tmp_path, _float_scene(tmp_path / "f.tif", float("nan")))
    nan_tile = next(r["image"] for r in records if np.isnan(r["image"]).any())
    x = normalize(tf.constant(nan_tile), stats).numpy()  # the export's in-graph normalisation
    assert np.isfinite(x).all() and np.all(x[np.isnan(nan_tile)] == 0)
    evaluation = [b[0].numpy() for b in build_dataset(tiles, "train", cfg, training=False, batch_size=4)]
    assert sum(len(b) for b in evaluation) == 9 and all(np.isfinite(b).all() for b in evaluation)
    training = build_dataset(tiles, "train", cfg, training=True, batch_size=3)  # augmented (default augment)
    for images, _ in training.take(6):
        assert np.isfinite(images.numpy()).all()


def test_integer_statistics_leave_pixels_untouched():
    stats = {"dtype": "uint16", "low": [0.0], "high": [100.0], "mean": [50.0], "std": [10.0]}
    img = np.array([[[0], [70]]], np.uint16)
    assert np.array_equal(normalize_numpy(img, stats), [[[-5.0], [2.0]]])
    assert fill_nonfinite_numpy(img, stats) is img


def test_float_scene_prediction_windows_are_finite_and_carry_the_training_mean(tmp_path):
    from pipeline.config import PredictConfig
    from pipeline.predict.reader import read_batches
    from pipeline.predict.scene import predict_region
    from pipeline.predict.windows import plan_windows

    image = _float_scene(tmp_path / "f.tif", float("nan"))

    class Recorder:
        def __init__(self) -> None:
            self.info = {"tile_size": 64, "dtype": "float32", "channels": 3, "bands": [1, 2, 3], "classes": ["a"],
                         "stats": {"mean": [0.25, 0.5, 0.75]}}
            self.seen: list[np.ndarray] = []

        def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
            self.seen.append(images.copy())
            b = len(images)
            return {"boxes": np.zeros((b, 1, 4)), "scores": np.zeros((b, 1)), "classes": np.ones((b, 1)),
                    "num_detections": np.zeros(b, np.int32)}

    det = Recorder()
    predict_region(det, image, PredictConfig(overlap=16, batch_size=4))
    windows = plan_windows((0, 0, 160, 128), 64, 16)
    assert sum(len(s) for s in det.seen) == len(windows) == 9
    filled = 0
    for images in det.seen:
        assert np.isfinite(images).all()
        filled += int(np.all(images == [0.25, 0.5, 0.75], axis=-1).sum())
    assert filled > 40 * 40  # the block, seen by several overlapping windows, is the training mean
    # without a fill (test-time BatchNorm adaptation) the reader keeps NaN, which normalize_numpy makes 0
    images, masks, _ = next(read_batches(str(image), windows[:1], [1, 2, 3], 1))
    assert np.array_equal(np.isnan(images[0]).any(-1), masks[0]) and masks[0].any()
