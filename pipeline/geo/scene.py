"""Tiling one scene, or one row block of it, into its work folder.

    tile_scene(config, scene_index, work_dir, progress=None, rows=None) -> work_dir/scene-NNNN/

The strip reader (pipeline.geo.strips) starts decoding at once while the labels are read and the tiles
chosen (pipeline.geo.selection); the chosen tiles are cut from each strip, stored as raw bytes (or PNG,
`tiling.encoding`) and handed to the shard writer (pipeline.geo.shards). The folder holds per-split
TFRecord parts, manifest.jsonl (one line per tile, naming its part), the stats pixel sample
(pipeline.geo.pixel_sample) and scene.json (parts, QA counts, label counts, the sample generator's state).
It is written in a temporary folder that replaces the output only when complete, so a failure leaves no
partial output.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from pipeline.config import Config
from pipeline.data.records import encode_tile_chunks, png_capable
from pipeline.errors import SatdetError
from pipeline.files import atomic_dir, atomic_write_json, atomic_write_text
from pipeline.geo.grid import tile_starts
from pipeline.geo.labels import read_labels
from pipeline.geo.pixel_sample import SceneSample
from pipeline.geo.plan import SPLITS
from pipeline.geo.raster import info_from_dataset, open_raster
from pipeline.geo.selection import ChosenTile, select_tiles
from pipeline.geo.shards import ShardWriter, manifest_line
from pipeline.geo.strips import StripReader, cut_tile
from pipeline.geo.workdir import load_plan, scene_dir_name

Progress = Callable[[int], None]
_Cut = tuple[ChosenTile, dict[str, Any], np.ndarray]  # a kept tile, its manifest record, its pixels


def tile_scene(config: Config, scene_index: int, work_dir: Path, progress: Progress | None = None,
               rows: tuple[int, int] | None = None) -> Path:
    """Tile one scene into ``work_dir/scene-NNNN/`` (TFRecord parts, manifest lines, pixel sample, counts).

    `rows` = (first, end) tile-row indices: only the tiles of those rows, into ``scene-NNNN-rows-F-E/``, with the
    pixel sample untrimmed and the sample generator's state kept (pipeline.geo.blocks merges the blocks)."""
    work_dir = Path(work_dir)
    plan = load_plan(config, work_dir)
    scene = plan["scenes"][scene_index]
    all_rows = tile_starts(scene["height"], plan["tile_size"], plan["overlap"])
    row_range = _row_range(scene, all_rows, rows)
    block_rows = all_rows[row_range[0]:row_range[1]]
    out_final = work_dir / scene_dir_name(scene_index, rows)
    with _gdal_env(config, plan, scene), open_raster(scene["image"]) as ds:
        info = info_from_dataset(ds, scene["image"])
        # the reader starts on the pixels at once; the labels and the tile choice run meanwhile
        with StripReader(ds, block_rows, plan["tile_size"], plan["bands"], plan["dtype"]) as strips:
            labels = read_labels(scene["labels"], info, list(config.classes), config.tiling.label_field)
            chosen, counts = select_tiles(scene, plan, config, labels)
            sample = _scene_sample(config, plan, scene_index, chosen, block_rows)
            by_row = _tiles_by_row(chosen, block_rows)
            strips.want(set(by_row))
            skipped_windows = scene["n_windows"] // len(all_rows) * len(block_rows) - sum(map(len, by_row.values()))
            if progress and skipped_windows:
                progress(skipped_windows)
            with atomic_dir(out_final) as out:
                cutter = _TileCutter(config, plan, scene, sample)
                parts, manifest = _write_tiles(config, plan, scene, strips, by_row, cutter, out, progress)
                atomic_write_text(out / "manifest.jsonl", "".join(m + "\n" for m in manifest))
                sample.save(out, plan["channels"], trim=rows is None)
                atomic_write_json(out / "scene.json", {
                    "index": scene_index, "scene": scene["scene"], "parts": parts, "qa": cutter.qa(),
                    **counts, **_label_counts(labels, list(config.classes)),
                    "rows": list(row_range), "sample_rng": sample.rng.bit_generator.state,
                })
    return out_final


def _row_range(scene: dict[str, Any], all_rows: list[int], rows: tuple[int, int] | None) -> tuple[int, int]:
    """(first, end) tile-row indices to tile: `rows`, checked against the scene, or all of them."""
    first, end = rows or (0, len(all_rows))
    if not 0 <= first < end <= len(all_rows):
        raise SatdetError(f"{scene['image']}: row block {first}-{end} is outside its {len(all_rows)} tile rows; "
                          "plan the tiling again")
    return first, end


def _gdal_env(config: Config, plan: dict[str, Any], scene: dict[str, Any]) -> rasterio.Env:
    """GDAL settings for reading one scene: a block cache for about two strips, decode threads on the
    worker's spare cores."""
    tile, channels = plan["tile_size"], len(plan["bands"])
    # GDAL's block cache would otherwise keep every decoded block of the scene (up to 5% of RAM); strips
    # reuse their own rows, so the cache only needs the block rows under about two strips.
    itemsize = np.dtype(plan["dtype"]).itemsize
    cache_mb = max(64, math.ceil(2 * (tile + 512) * scene["width"] * channels * itemsize / 2**20))
    # Of the cores a scene worker has, one cuts and writes tiles; GDAL decodes on the others (at least one).
    # On two cores one decode thread wins: GDAL's multi-threaded decode costs 60% more CPU (measured).
    cpus = os.cpu_count() or 1
    cores = max(1, cpus // max(1, min(config.tiling.workers or cpus, len(plan["scenes"]))))
    return rasterio.Env(GDAL_CACHEMAX=cache_mb, GDAL_NUM_THREADS=max(1, cores - 1))


def _scene_sample(config: Config, plan: dict[str, Any], scene_index: int,
                  chosen: dict[tuple[int, int], ChosenTile], block_rows: list[int]) -> SceneSample:
    """The pixel sample of the tiles cut here: its share per tile from the whole scene's train tiles, its
    generator past the draws of the chosen tiles above this row block."""
    n_train = sum(tile.split == "train" for tile in chosen.values())
    draws_before = sum(row < block_rows[0] for _, row in chosen)
    return SceneSample(config, scene_index, plan["tile_size"], n_train, draws_before)


def _tiles_by_row(chosen: dict[tuple[int, int], ChosenTile], block_rows: list[int]) -> dict[int, list[ChosenTile]]:
    """The chosen tiles within the block's rows, by row offset, left to right."""
    by_row: dict[int, list[ChosenTile]] = {}
    for tile in chosen.values():
        if block_rows[0] <= tile.row <= block_rows[-1]:
            by_row.setdefault(tile.row, []).append(tile)
    return {row: sorted(tiles, key=lambda tile: tile.col) for row, tiles in by_row.items()}


def _label_counts(labels: Any, classes: list[str]) -> dict[str, Any]:
    """scene.json's label counts: skipped geometries, objects per class, reader warnings."""
    return {
        "invalid_geometries": labels.invalid_geometries,
        "labels_outside_raster": labels.labels_outside_raster,
        "objects": {c: int((labels.class_ids == i + 1).sum()) for i, c in enumerate(classes)},
        "warnings": labels.warnings,
    }


class _TileCutter:
    """Cuts the chosen tiles of a strip: a tile with too much nodata is skipped; a kept one gets its manifest
    record and is counted into the scene's QA counts and its pixel sample."""

    def __init__(self, config: Config, plan: dict[str, Any], scene: dict[str, Any], sample: SceneSample) -> None:
        self.scene, self.sample, self.size = scene, sample, plan["tile_size"]
        self.classes = list(config.classes)
        self.max_nodata_fraction = config.tiling.max_nodata_fraction
        # the pad of a scene smaller than a tile: the nodata value (0 without one); NaN in float scenes,
        # like their nodata pixels, so that normalisation turns it into the band mean (0)
        self.fill = math.nan if np.dtype(plan["dtype"]).kind == "f" else scene["nodata"] or 0
        self._qa: dict[str, Any] = {
            "kept": 0, "clipped": 0, "dropped": 0, "nodata_skipped": 0, "max_boxes": 0,
            "tiles": {s: 0 for s in SPLITS}, "empty_kept": 0, "class_counts": {c: 0 for c in self.classes}}
        self._class_ids: list[np.ndarray] = []

    def cut(self, tiles: list[ChosenTile], data: np.ndarray, mask: np.ndarray | None) -> list[_Cut]:
        """The kept tiles of one strip (`data`, nodata `mask`), in order."""
        kept = []
        for tile in tiles:
            pick = self.sample.draw()
            img, valid, nodata_fraction = cut_tile(data, mask, tile.col, self.size, self.fill)
            if nodata_fraction > self.max_nodata_fraction:
                self._qa["nodata_skipped"] += 1
                continue
            self._count(tile)
            self.sample.add(tile.split, img, valid, pick)
            kept.append((tile, self._record(tile, nodata_fraction), img))
        return kept

    def _count(self, tile: ChosenTile) -> None:
        n = len(tile.boxes)
        qa = self._qa
        qa["tiles"][tile.split] += 1
        qa["empty_kept"] += n == 0
        qa["kept"] += n
        qa["clipped"] += tile.clipped
        qa["dropped"] += tile.dropped
        qa["max_boxes"] = max(qa["max_boxes"], n)
        self._class_ids.append(tile.class_ids)

    def _record(self, tile: ChosenTile, nodata_fraction: float) -> dict[str, Any]:
        """The tile's manifest record (its "shard" is added once it is written)."""
        a, b, c, d, e, f = self.scene["transform"]  # the scene's pixel-to-map affine coefficients
        col, row, size = tile.col, tile.row, self.size
        return {
            "id": f"{self.scene['scene']}_{col}_{row}", "scene": self.scene["scene"], "split": tile.split,
            "window": [col, row, size, size],
            "transform": [a, b, a * col + b * row + c, d, e, d * col + e * row + f],
            "crs": self.scene["crs"], "n_boxes": len(tile.boxes), "nodata_fraction": round(nodata_fraction, 6),
        }

    def qa(self) -> dict[str, Any]:
        """scene.json's "qa": the counts over the kept tiles, boxes per class included."""
        ids = np.concatenate([np.zeros(0, np.int64), *self._class_ids])
        per_class = np.bincount(ids, minlength=len(self.classes) + 1)
        self._qa["class_counts"] = {c: int(per_class[i + 1]) for i, c in enumerate(self.classes)}
        return self._qa


def _write_tiles(config: Config, plan: dict[str, Any], scene: dict[str, Any], strips: StripReader,
                 by_row: dict[int, list[ChosenTile]], cutter: _TileCutter, out: Path, progress: Progress | None
                 ) -> tuple[dict[str, list[str]], list[str]]:
    """Cut, encode and write the chosen tiles strip by strip into `out`: the parts written per split and
    the manifest lines."""
    t = config.tiling
    writer = ShardWriter(out, t.shard_size)
    # PNG encoding is CPU-heavy and releases the GIL: spread it over threads. Raw is a memcpy: inline.
    png = t.encoding == "png" and png_capable(plan["dtype"], len(plan["bands"]))
    encoders = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) if png else None

    def encode(item: _Cut) -> list[bytes]:
        tile, record, img = item
        return encode_tile_chunks(img, tile.boxes, tile.class_ids, record["id"], scene["scene"], t.encoding)

    manifest: list[str] = []
    try:
        for r, data, mask in strips:
            if r not in by_row:
                continue
            kept = cutter.cut(by_row[r], data, mask)
            # every tile of the strip is encoded before the strip buffer can be reused
            payloads = list(encoders.map(encode, kept)) if encoders else [encode(k) for k in kept]
            for (tile, record, _), payload in zip(kept, payloads, strict=True):
                manifest.append(manifest_line(record, writer.write(tile.split, payload)))
            if progress:
                progress(len(by_row[r]))
    finally:
        try:
            writer.close()
        finally:
            if encoders:
                encoders.shutdown()
    return writer.parts, manifest
