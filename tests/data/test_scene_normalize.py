"""`data.normalize: scene`: tiling writes each scene's own statistics, the input pipeline normalises every
tile with its scene's (pipeline/geo/pixel_sample.per_scene_stats, pipeline/data/dataset.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tensorflow as tf

from pipeline.config import AugmentSpec
from pipeline.data.dataset import build_dataset
from pipeline.data.records import decode_tile_numpy
from pipeline.data.stats import normalize_numpy, scene_stats_of
from pipeline.errors import SatdetError
from pipeline.geo.synth import make_scene
from pipeline.geo.tiling import run_tiling

from ..geo.conftest import make_config


def _darken(path: Path) -> None:
    """Rewrite a synthetic scene's pixels at a third of their brightness (another flight, another look)."""
    with rasterio.open(path, "r+") as ds:
        ds.write((ds.read() // 3 + 1).astype(ds.dtypes[0]))


@pytest.fixture(scope="module")
def two_looks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Two scenes, one three times darker than the other, tiled (all tiles train, no augmentation)."""
    tmp = tmp_path_factory.mktemp("looks")
    bright = make_scene(tmp / "scenes", "bright", 160, 128, seed=3, n_objects=6)
    dark = make_scene(tmp / "scenes", "dark", 160, 128, seed=4, n_objects=6)
    _darken(dark.image)
    scenes = [{"image": s.image, "labels": s.labels} for s in (bright, dark)]
    cfg = make_config(tmp, scenes, classes=["crown", "roof", "vehicle"])
    tiles = run_tiling(cfg)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"augment": [], "batch_size": 2})})
    return tiles, {"config": cfg}


def _with(cfg, **data):
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=data)})


def _raw_tiles(tiles: Path) -> dict[str, dict]:
    out = {}
    for shard in sorted(tiles.glob("train-*.tfrecord")):
        for record in tf.data.TFRecordDataset(str(shard)).as_numpy_iterator():
            tile = decode_tile_numpy(record)
            out[tile["id"]] = tile
    return out


def test_tiling_writes_each_scenes_own_statistics(two_looks) -> None:
    tiles, _ = two_looks
    stats = json.loads((tiles / "stats.json").read_text())
    own = stats["scenes"]
    assert set(own) == {"bright", "dark"}
    raw = _raw_tiles(tiles)
    for name in own:  # the scene's numbers sit on its own pixels: its mean within the scene's pixel range
        pixels = np.concatenate([t["image"].reshape(-1, 3) for t in raw.values() if t["scene"] == name])
        assert np.allclose(own[name]["mean"], pixels.mean(0), rtol=0.15)
    dark, bright = np.asarray(own["dark"]["mean"]), np.asarray(own["bright"]["mean"])
    assert (dark < bright / 2).all()
    assert (np.asarray(stats["mean"]) > dark).all() and (np.asarray(stats["mean"]) < bright).all()  # pooled: between


@pytest.mark.parametrize("training", [False, True])
def test_each_tile_is_normalised_with_its_own_scenes_statistics(two_looks, training: bool) -> None:
    tiles, ctx = two_looks
    stats = json.loads((tiles / "stats.json").read_text())
    raw = _raw_tiles(tiles)
    # training: through the augmentation numpy_function (a flip that never fires leaves the pixels as they are)
    augment = [AugmentSpec(name="HorizontalFlip", params={"p": 0.0})] if training else []
    cfg = _with(ctx["config"], normalize="scene", augment=augment)
    ds = build_dataset(tiles, "train", cfg, training=training, with_ids=True)
    seen = {}
    for images, targets in ds.take(len(raw)):
        for image, tile_id in zip(images.numpy(), targets["tile_id"].numpy()):
            tile = raw[tile_id.decode()]
            expected = normalize_numpy(tile["image"], scene_stats_of(stats, tile["scene"]))
            np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-5)
            seen.setdefault(tile["scene"], []).append(image.mean())
    assert set(seen) == {"bright", "dark"}
    # the point of it: both looks come out alike (mean near 0), where the pooled stretch keeps them apart
    assert all(abs(np.mean(m)) < 0.5 for m in seen.values())
    pooled = {}
    for images, targets in build_dataset(tiles, "train", ctx["config"], training=False, with_ids=True):
        for image, tile_id in zip(images.numpy(), targets["tile_id"].numpy()):
            pooled.setdefault(raw[tile_id.decode()]["scene"], []).append(image.mean())
    assert np.mean(pooled["dark"]) < -0.5 < 0.5 < np.mean(pooled["bright"])


def test_tiles_without_scene_statistics_are_a_clear_error(two_looks, tmp_path: Path) -> None:
    tiles, ctx = two_looks
    old = Path(tmp_path / "old")
    old.mkdir()
    for f in tiles.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    stats = json.loads((old / "stats.json").read_text())
    del stats["scenes"]
    (old / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(SatdetError, match=r"stats.json: no statistics of scene 'bright'.*re-run the tiling stage"):
        build_dataset(old, "train", _with(ctx["config"], normalize="scene"), training=True)
    assert build_dataset(old, "train", ctx["config"], training=True) is not None  # global needs none


def test_nodata_of_float_tiles_normalises_to_zero_with_its_scenes_numbers(tmp_path: Path) -> None:
    from .conftest import make_config as data_config
    from .fake_tiles import write_tiles_dir

    tiles = write_tiles_dir(tmp_path / "run" / "tiles", {"train": [1, 2], "val": [1]}, dtype="float32")
    stats = json.loads((tiles / "stats.json").read_text())
    own = {"low": [10.0] * 3, "high": [900.0] * 3, "mean": [300.0] * 3, "std": [100.0] * 3}
    (tiles / "stats.json").write_text(json.dumps({**stats, "scenes": {"scene0": own}}))
    nan_tiles = tmp_path / "nan" / "tiles"
    nan_tiles.mkdir(parents=True)
    for f in tiles.iterdir():  # the same folder with a NaN stripe in every tile
        if f.suffix != ".tfrecord":
            (nan_tiles / f.name).write_bytes(f.read_bytes())
            continue
        from pipeline.data.records import encode_tile

        with tf.io.TFRecordWriter(str(nan_tiles / f.name)) as w:
            for record in tf.data.TFRecordDataset(str(f)).as_numpy_iterator():
                t = decode_tile_numpy(record)
                image = t["image"].copy()
                image[:5] = np.nan
                w.write(encode_tile(image, t["boxes"], t["labels"], t["id"], t["scene"]))
    cfg = data_config(nan_tiles, normalize="scene", augment=[])
    for images, _ in build_dataset(nan_tiles, "val", cfg, training=False):
        assert np.isfinite(images.numpy()).all()
        np.testing.assert_array_equal(images.numpy()[:, :5], 0.0)  # the scene's mean, not the pooled one
        assert np.abs(images.numpy()[:, 5:]).max() > 0.1
