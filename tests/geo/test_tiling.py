import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data.records import decode_tile_numpy
from pipeline.errors import SatdetError
from pipeline.geo.synth import make_scene
from pipeline.geo.tiling import run_tiling

from .conftest import NEON, make_config


def _records(tiles: Path) -> dict[str, dict]:
    import tensorflow as tf

    out = {}
    for shard in sorted(tiles.glob("*.tfrecord")):
        for raw in tf.data.TFRecordDataset(str(shard)).as_numpy_iterator():
            tile = decode_tile_numpy(raw)
            out[tile["id"]] = {**tile, "shard": shard.name}
    return out


def _manifest(tiles: Path) -> list[dict]:
    return [json.loads(line) for line in (tiles / "manifest.jsonl").read_text().splitlines()]


def test_tfrecord_round_trip_matches_the_raster_and_the_labels(tmp_path, scene):
    cfg = make_config(tmp_path, [{"image": scene.image, "labels": scene.labels}], negative_ratio=100.0,
                      min_visibility=0.5)
    tiles = run_tiling(cfg, tmp_path / "tiles")
    records, manifest = _records(tiles), _manifest(tiles)
    assert len(records) == len(manifest) == 3 * 3  # 160×128 px, 64 px tiles at stride 48 (last shifted)
    with rasterio.open(scene.image) as ds:
        for m in manifest:
            rec = records[m["id"]]
            c, r, w, h = m["window"]
            assert rec["shard"] == m["shard"] and m["split"] == "train"
            assert np.array_equal(rec["image"], ds.read(window=Window(c, r, w, h)).transpose(1, 2, 0))
            assert (m["transform"][2], m["transform"][5]) == pytest.approx(ds.transform * (c, r))
            assert len(rec["boxes"]) == m["n_boxes"]
            # every object wholly inside the window is in the tile, shifted to tile pixels
            inside = scene.boxes_px[(scene.boxes_px[:, 0] >= c) & (scene.boxes_px[:, 2] <= c + w)
                                    & (scene.boxes_px[:, 1] >= r) & (scene.boxes_px[:, 3] <= r + h)]
            for b in inside - [c, r, c, r]:
                assert np.abs(rec["boxes"] - b).max(axis=1).min() <= 0.5
            assert (rec["boxes"] >= 0).all() and (rec["boxes"] <= 64).all()
            assert set(rec["labels"].tolist()) <= {1, 2, 3}
    qa = json.loads((tiles / "qa.json").read_text())
    assert qa["boxes"]["kept"] == sum(m["n_boxes"] for m in manifest)
    assert qa["max_boxes_per_tile"] == max(m["n_boxes"] for m in manifest)
    assert sum(qa["class_counts"].values()) == qa["boxes"]["kept"]
    stats = json.loads((tiles / "stats.json").read_text())
    assert stats["dtype"] == "uint8" and stats["channels"] == 3 and len(stats["mean"]) == 3
    assert all(lo < hi for lo, hi in zip(stats["low"], stats["high"]))


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_uint16_multiband_tiles_round_trip_in_either_encoding(tmp_path, encoding):
    s = make_scene(tmp_path, "u", 100, 100, seed=1, dtype="uint16", bands=4, n_objects=2)
    cfg = make_config(tmp_path, [{"image": s.image, "labels": s.labels}], bands=[4, 1], negative_ratio=100.0,
                      encoding=encoding)
    tiles = run_tiling(cfg, tmp_path / "tiles")
    records = _records(tiles)
    with rasterio.open(s.image) as ds:
        for m in _manifest(tiles):
            c, r, w, h = m["window"]
            img = records[m["id"]]["image"]
            assert img.dtype == np.uint16
            assert np.array_equal(img, ds.read([4, 1], window=Window(c, r, w, h)).transpose(1, 2, 0))
    assert json.loads((tiles / "stats.json").read_text())["bands"] == [4, 1]


def test_box_cut_by_edge_is_dropped_below_min_visibility(tmp_path, scene):
    loose = run_tiling(make_config(tmp_path, [{"image": scene.image, "labels": scene.labels}],
                                   negative_ratio=100.0, min_visibility=0.0), tmp_path / "loose")
    strict = run_tiling(make_config(tmp_path, [{"image": scene.image, "labels": scene.labels}],
                                    negative_ratio=100.0, min_visibility=1.0), tmp_path / "strict")
    ql, qs = (json.loads((t / "qa.json").read_text())["boxes"] for t in (loose, strict))
    assert ql["dropped"] == 0 and qs["clipped"] == 0
    assert qs["dropped"] == ql["clipped"] > 0
    assert ql["kept"] - ql["clipped"] == qs["kept"]


def test_tiles_with_too_much_nodata_are_skipped(tmp_path):
    s = make_scene(tmp_path, "nd", 160, 160, seed=2, n_objects=3, nodata_border=30)
    cfg = make_config(tmp_path, [{"image": s.image, "labels": s.labels}], negative_ratio=100.0,
                      max_nodata_fraction=0.5)
    tiles = run_tiling(cfg, tmp_path / "tiles")
    manifest = _manifest(tiles)
    # windows start at 0, 48, 96 per axis; valid pixels are 30..130: the 4 corner tiles are 72% nodata
    assert json.loads((tiles / "qa.json").read_text())["tiles"]["nodata_skipped"] == 4
    assert len(manifest) == 5
    assert max(m["nodata_fraction"] for m in manifest) == pytest.approx(1 - 34 * 64 / 64**2, abs=1e-6)
    stats = json.loads((tiles / "stats.json").read_text())
    assert stats["nodata"] == 0 and min(stats["low"]) > 0  # nodata pixels stay out of the statistics


def test_scene_smaller_than_a_tile_is_padded_and_the_pad_is_nodata(tmp_path):
    s = make_scene(tmp_path, "small", 48, 40, seed=0, n_objects=1)
    cfg = make_config(tmp_path, [{"image": s.image, "labels": s.labels}], max_nodata_fraction=0.6)
    tiles = run_tiling(cfg, tmp_path / "tiles")
    (m,) = _manifest(tiles)
    rec = _records(tiles)[m["id"]]
    assert rec["image"].shape == (64, 64, 3)
    assert m["window"] == [0, 0, 64, 64]
    assert m["nodata_fraction"] == pytest.approx(1 - 48 * 40 / 64**2, abs=1e-6)
    assert (rec["image"][40:] == 0).all() and (rec["image"][:, 48:] == 0).all()
    with rasterio.open(s.image) as ds:
        assert np.array_equal(rec["image"][:40, :48], ds.read().transpose(1, 2, 0))
    assert np.allclose(rec["boxes"], s.boxes_px, atol=0.5)


def test_block_splits_do_not_leak(tmp_path):
    s = make_scene(tmp_path, "big", 400, 400, seed=4, n_objects=40)
    cfg = make_config(tmp_path, [{"image": s.image, "labels": s.labels}], negative_ratio=100.0,
                      split={"method": "block", "block_size": 96, "val_fraction": 0.3, "test_fraction": 0.3})
    tiles = run_tiling(cfg, tmp_path / "tiles")
    manifest = _manifest(tiles)
    assert {m["split"] for m in manifest} == {"train", "val", "test"}
    for a in manifest:
        for b in manifest:
            if a["split"] != b["split"]:
                (ac, ar, aw, ah), (bc, br, bw, bh) = a["window"], b["window"]
                assert ac + aw <= bc or bc + bw <= ac or ar + ah <= br or br + bh <= ar
    qa = json.loads((tiles / "qa.json").read_text())
    assert qa["tiles"]["straddling_dropped"] > 0
    assert sum(qa["tiles"][k] for k in ("train", "val", "test")) == len(manifest)
    splits = json.loads((tiles / "splits.json").read_text())
    blocks = splits["scenes"][0]["blocks"]
    assert sum(b["window"][2] * b["window"][3] for b in blocks) == 400 * 400
    for m in manifest:  # each tile lies inside blocks of its own split
        c, r, w, h = m["window"]
        for b in blocks:
            bc, br, bw, bh = b["window"]
            if c < bc + bw and bc < c + w and r < br + bh and br < r + h:
                assert b["split"] == m["split"]


def test_negative_ratio_zero_keeps_no_empty_training_tile(tmp_path, scene):
    cfg = make_config(tmp_path, [{"image": scene.image, "labels": scene.labels}], negative_ratio=0.0)
    tiles = run_tiling(cfg, tmp_path / "tiles")
    manifest = _manifest(tiles)
    assert manifest and all(m["n_boxes"] > 0 for m in manifest)
    qa = json.loads((tiles / "qa.json").read_text())
    assert qa["tiles"]["empty_kept"] == 0 and qa["tiles"]["empty_dropped"] == 9 - len(manifest)


def test_bad_input_leaves_no_output(tmp_path, scene):
    other = make_scene(tmp_path / "o", "other", 64, 64, seed=1, n_objects=1, classes=("boat",))
    cfg = make_config(tmp_path, [{"image": scene.image, "labels": scene.labels},
                                 {"image": other.image, "labels": other.labels}])
    out = tmp_path / "runs" / "t" / "tiles"
    with pytest.raises(SatdetError, match=r"other.geojson: label class\(es\) \['boat'\] not in"):
        run_tiling(cfg, out)
    assert not (tmp_path / "runs").exists()


def test_parallel_workers_give_the_same_tiles_as_one(tmp_path):
    a = make_scene(tmp_path, "a", 96, 96, seed=0, n_objects=2)
    b = make_scene(tmp_path, "b", 96, 96, seed=1, n_objects=2)
    scenes = [{"image": a.image, "labels": a.labels}, {"image": b.image, "labels": b.labels}]
    one = run_tiling(make_config(tmp_path, scenes, negative_ratio=100.0), tmp_path / "one")
    two = run_tiling(make_config(tmp_path, scenes, negative_ratio=100.0, workers=2), tmp_path / "two")
    assert _manifest(one) == _manifest(two)
    assert (one / "stats.json").read_text() == (two / "stats.json").read_text()


def test_cli_synth_then_tile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["synth", "scenes", "--n-scenes", "1", "--size", "128", "--seed", "3"])
    assert res.exit_code == 0, res.output
    (tmp_path / "c.yaml").write_text(
        "name: cli\nclasses: [crown, roof, vehicle]\ntiling:\n  tile_size: 64\n  overlap: 16\n  workers: 1\n"
        "  split: {method: scene, val_fraction: 0, test_fraction: 0}\n"
        "  scenes:\n    - {image: scenes/scene-000.tif, labels: scenes/scene-000.geojson}\n")
    res = runner.invoke(app, ["tile", "c.yaml", "--set", "tiling.negative_ratio=100"])
    assert res.exit_code == 0, res.output
    assert "tiles: train 9, val 0, test 0" in res.output
    assert (tmp_path / "runs" / "cli" / "config.yaml").exists()
    assert len(_manifest(tmp_path / "runs" / "cli" / "tiles")) == 9


def test_cli_bad_input_is_one_line_and_non_zero(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("name: bad\ntiling:\n  scenes:\n    - {image: nowhere.tif}\n")
    res = CliRunner().invoke(app, ["tile", "c.yaml"])
    assert res.exit_code == 2
    assert "nowhere.tif: image file not found" in res.output
    assert not (tmp_path / "runs").exists()


def test_real_neon_scene_tiles_its_61_trees(tmp_path):
    cfg = make_config(tmp_path, [{"image": NEON / "OSBS_029.tif", "labels": NEON / "OSBS_029.pixel.csv"}],
                      classes=["tree"], tile_size=400, overlap=32)
    tiles = run_tiling(cfg, tmp_path / "tiles")
    (m,) = _manifest(tiles)
    assert m["n_boxes"] == 61 and m["crs"] == "EPSG:32617"


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16"])
def test_histogram_stats_equal_numpy_percentiles(dtype):
    from pipeline.data.stats import percentile_stats

    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    for n in (1, 2, 9, 10, 5000):
        samples = rng.integers(info.min, info.max, (n, 3), endpoint=True).astype(dtype)
        for pct in ((1.0, 99.0), (0.0, 100.0), (37.5, 62.5), (28.0, 72.0)):
            got = percentile_stats(samples, pct)
            as_float = samples.astype(np.float64)
            low, high = np.percentile(as_float, list(pct), axis=0)
            clipped = np.clip(as_float, low, high)
            np.testing.assert_array_equal(got[0], low)  # percentiles to the last bit
            np.testing.assert_array_equal(got[1], high)
            for g, want in zip(got[2:], (clipped.mean(axis=0), clipped.std(axis=0)), strict=True):
                np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("damage", ["shard-missing", "last-line-cut"])
def test_a_scene_manifest_line_without_its_shard_stops_the_merge(tmp_path, damage):
    """finalize_tiling renames each line's shard; a line it cannot rename is an error, not a manifest entry
    pointing at the wrong (or no) shard."""
    from pipeline.geo.finalize import finalize_tiling
    from pipeline.geo.scene import tile_scene

    s = make_scene(tmp_path, "m", 160, 160, seed=0, n_objects=6)
    config = make_config(tmp_path, [{"image": s.image, "labels": s.labels}])
    work = tmp_path / "work"
    work.mkdir()
    out = tile_scene(config, 0, work)
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    assert len(lines) > 1
    if damage == "shard-missing":
        rec = json.loads(lines[0])
        del rec["shard"]
        lines[0] = json.dumps(rec) + "\n"
    else:
        lines[-1] = lines[-1][: lines[-1].index('"shard"')]
    manifest.write_text("".join(lines))
    with pytest.raises(SatdetError, match=r"manifest.jsonl: a line lacks its shard"):
        finalize_tiling(config, [out], tmp_path / "tiles")
    assert not (tmp_path / "tiles").exists()
