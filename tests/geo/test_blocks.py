"""Row blocks (pipeline/geo/blocks.py): one scene tiled as bands of tile rows and merged gives the same
bytes as the whole scene tiled at once — shards, manifest, stats, QA — and bad blocks are one-line errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pipeline.errors import SatdetError
from pipeline.geo.blocks import merge_row_blocks, row_blocks, tile_row_block
from pipeline.geo.finalize import finalize_tiling
from pipeline.geo.scene import tile_scene
from pipeline.geo.synth import make_scene
from pipeline.geo.tiling import run_tiling
from pipeline.geo.workdir import load_plan

from .conftest import make_config


def tile_scene_in_blocks(config, scene_index, work_dir, windows_per_block):
    """Tile one scene block by block in this process, then merge (what the flow's tasks do on Dask)."""
    plan = load_plan(config, Path(work_dir))
    dirs = [tile_row_block(config, scene_index, rows, work_dir) for rows in row_blocks(plan, scene_index, windows_per_block)]
    return merge_row_blocks(config, scene_index, dirs, work_dir)

def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _as_float32(image: Path) -> Path:
    """The scene as float32 reflectances with NaN nodata (its 0 border)."""
    with rasterio.open(image) as src:
        data, profile = src.read(), src.profile
    out = image.with_name(image.stem + "-f32.tif")
    with rasterio.open(out, "w", **{**profile, "dtype": "float32", "nodata": float("nan")}) as dst:
        dst.write(np.where(data == 0, np.nan, data / 255.0).astype(np.float32))
    return out


def _tile_in_blocks(config, work: Path, out: Path, windows_per_block: int) -> Path:
    """Every scene in row blocks (one process), then the usual finalize."""
    plan = load_plan(config, work)
    outputs = [tile_scene_in_blocks(config, i, work, windows_per_block) for i in range(len(plan["scenes"]))]
    return finalize_tiling(config, outputs, out)


@pytest.mark.parametrize(("dtype", "encoding"), [("uint8", "raw"), ("uint16", "png"), ("float32", "raw")])
def test_scene_tiled_in_row_blocks_gives_the_bytes_of_the_whole_scene(tmp_path, dtype, encoding):
    # a nodata border (tiles skipped for nodata), block splits (straddlers dropped), small shards (the merge
    # re-cuts parts) and a small pixel budget (the joined sample is trimmed)
    scenes = [make_scene(tmp_path / "s", f"s{i}", 352, 300, seed=i, dtype="uint8" if dtype == "float32" else dtype,
                         n_objects=12, nodata_border=40 * (1 - i)) for i in range(2)]
    images = [_as_float32(s.image) if dtype == "float32" else s.image for s in scenes]
    config = make_config(tmp_path, [{"image": im, "labels": s.labels} for im, s in zip(images, scenes)],
                         classes=["crown", "roof", "vehicle"], shard_size=3, stats_max_pixels=5000,
                         encoding=encoding, negative_ratio=0.5, max_nodata_fraction=0.3,
                         split={"method": "block", "block_size": 96, "val_fraction": 0.2, "test_fraction": 0.2})
    whole = run_tiling(config, tmp_path / "whole")
    plan = load_plan(config, tmp_path / "work")
    assert len(row_blocks(plan, 0, 12)) > 2  # several blocks, rows of 6 windows: 2 rows each
    blocks = _tile_in_blocks(config, tmp_path / "work", tmp_path / "blocks", windows_per_block=12)

    expected = _digests(whole)
    assert _digests(blocks) == expected
    qa = json.loads((whole / "qa.json").read_text())
    assert qa["tiles"]["nodata_skipped"] > 0 and qa["tiles"]["straddling_dropped"] > 0
    assert sum(qa["tiles"][s] for s in ("train", "val", "test")) > 3 * 3  # more tiles than one shard per split
    # one row per block, and one block for the whole scene, give the same bytes too
    assert _digests(_tile_in_blocks(config, tmp_path / "work1", tmp_path / "rows", windows_per_block=1)) == expected
    assert _digests(_tile_in_blocks(config, tmp_path / "work2", tmp_path / "one", windows_per_block=0)) == expected


def test_row_blocks_are_whole_tile_rows_of_about_the_asked_windows(tmp_path, scene):
    config = make_config(tmp_path, [{"image": scene.image, "labels": scene.labels}])  # 160×128, 64 px, 16 overlap
    plan = load_plan(config, tmp_path / "work")
    assert plan["scenes"][0]["n_windows"] == 3 * 3
    assert row_blocks(plan, 0, 0) == [(0, 3)]  # 0: the whole scene
    assert row_blocks(plan, 0, 9) == [(0, 3)]  # no more windows than asked: the whole scene
    assert row_blocks(plan, 0, 6) == [(0, 2), (2, 3)]
    assert row_blocks(plan, 0, 1) == [(0, 1), (1, 2), (2, 3)]  # at least one row


def test_a_row_block_outside_the_scene_is_a_one_line_error(tmp_path, scene):
    config = make_config(tmp_path, [{"image": scene.image, "labels": scene.labels}])
    with pytest.raises(SatdetError, match=r"row block 2-5 is outside its 3 tile rows") as err:
        tile_row_block(config, 0, (2, 5), tmp_path / "work")
    assert "\n" not in str(err.value)
    with pytest.raises(SatdetError, match=r"row block 1-1 is outside"):
        tile_scene(config, 0, tmp_path / "work", rows=(1, 1))


def test_merging_blocks_that_miss_rows_is_a_one_line_error(tmp_path, scene):
    config = make_config(tmp_path, [{"image": scene.image, "labels": scene.labels}])
    work = tmp_path / "work"
    dirs = [tile_row_block(config, 0, rows, work) for rows in [(0, 1), (1, 2), (2, 3)]]
    with pytest.raises(SatdetError, match=r"row blocks \[\(0, 1\), \(2, 3\)\] do not cover its 3 tile rows once"):
        merge_row_blocks(config, 0, [dirs[0], dirs[2]], work)
    with pytest.raises(SatdetError, match="do not cover"):
        merge_row_blocks(config, 0, [dirs[0], dirs[1], dirs[1], dirs[2]], work)
    assert not (work / "scene-0000").exists()  # nothing half-merged is left


def test_a_cut_short_block_shard_is_a_one_line_error(tmp_path, scene):
    config = make_config(tmp_path, [{"image": scene.image, "labels": scene.labels}])
    work = tmp_path / "work"
    dirs = [tile_row_block(config, 0, rows, work) for rows in [(0, 2), (2, 3)]]
    meta = json.loads((dirs[0] / "scene.json").read_text())
    part = dirs[0] / meta["parts"]["train"][0]
    part.write_bytes(part.read_bytes() + b"\x01\x02")  # a truncated next record
    with pytest.raises(SatdetError, match=r"train-00000.tfrecord: cut short inside a record; tile the scene again"):
        merge_row_blocks(config, 0, dirs, work)
