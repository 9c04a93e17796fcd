"""Row blocks: one large scene tiled as several independent jobs (bands of whole tile rows), merged into the
scene's work folder byte for byte as a whole-scene `tile_scene` writes it, so `finalize_tiling` and every
output are the same however the scene was split.

    row_blocks(plan, scene_index, windows_per_block) -> [(first, end), ...]   tile-row index ranges
    tile_row_block(config, scene_index, rows, work_dir) -> Path                one block's folder
    merge_row_blocks(config, scene_index, block_dirs, work_dir) -> Path        the scene's folder

Why the bytes match: every block chooses the tiles over the whole scene (from geometry and labels alone, so
the blocks agree) and keeps its own rows; the k-th chosen tile of the scene takes the k-th draw of the
scene's pixel-sample generator, whichever block cuts it (pixel_sample.sample_rng), and the merge trims the joined
sample with the generator's state after the last block; records are re-cut into parts of
`tiling.shard_size` in scene order (framed TFRecord records are copied, not decoded) and the manifest's
shard names follow. The cost: each block reads the scene's labels, and the merge copies the block's records
once more.
"""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.config import Config
from pipeline.errors import SatdetError
from pipeline.files import atomic_dir, atomic_write_json, atomic_write_text
from pipeline.geo.grid import tile_starts
from pipeline.geo.pixel_sample import SAMPLE_KEYS, trim_sample
from pipeline.geo.plan import SPLITS
from pipeline.geo.scene import tile_scene
from pipeline.geo.shards import manifest_line, manifest_record
from pipeline.geo.workdir import load_plan, scene_dir_name

_HEADER = 12  # a TFRecord frame: uint64 length, uint32 CRC of it, the data, uint32 CRC of the data


def row_blocks(plan: dict[str, Any], scene_index: int, windows_per_block: int) -> list[tuple[int, int]]:
    """(first, end) tile-row index ranges of about `windows_per_block` windows each (whole rows, at least
    one); one range for the whole scene when it has at most that many windows or `windows_per_block` <= 0."""
    scene = plan["scenes"][scene_index]
    n_rows = len(tile_starts(scene["height"], plan["tile_size"], plan["overlap"]))
    n_cols = scene["n_windows"] // n_rows
    if windows_per_block <= 0 or scene["n_windows"] <= windows_per_block:
        return [(0, n_rows)]
    step = max(1, windows_per_block // n_cols)
    return [(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def tile_row_block(config: Config, scene_index: int, rows: tuple[int, int], work_dir: Path) -> Path:
    """Tile the rows `rows` of one scene into ``work_dir/scene-NNNN-rows-F-E/`` (merge with merge_row_blocks)."""
    return tile_scene(config, scene_index, Path(work_dir), rows=(int(rows[0]), int(rows[1])))


def _frames(path: Path) -> Any:
    """The framed records of a TFRecord file, as raw bytes (header, data and CRCs)."""
    with open(path, "rb") as fh:
        while header := fh.read(_HEADER):
            size = struct.unpack("<Q", header[:8])[0] + 4 if len(header) == _HEADER else -1
            body = fh.read(size) if size > 0 else b""
            if len(body) != size:
                raise SatdetError(f"{path}: cut short inside a record; tile the scene again")
            yield header + body


def _recut_records(out: Path, blocks: list[tuple[dict[str, Any], Path]], shard_size: int) -> dict[str, list[str]]:
    """Every block's records, split by split, in scene order into parts of `shard_size` records in `out`."""
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        fh: BinaryIO | None = None
        n = 0
        try:
            for meta, folder in blocks:
                for name in meta["parts"][split]:
                    for frame in _frames(folder / name):
                        if n % shard_size == 0:
                            if fh:
                                fh.close()
                            parts[split].append(f"{split}-{len(parts[split]):05d}.tfrecord")
                            fh = open(out / parts[split][-1], "wb")  # noqa: SIM115 (closed below)
                        fh.write(frame)
                        n += 1
        finally:
            if fh:
                fh.close()
    return parts


def _merged_manifest(blocks: list[tuple[dict[str, Any], Path]], shard_size: int) -> str:
    """The blocks' manifest lines in scene order, each "shard" naming its part in the merged scene."""
    counts = dict.fromkeys(SPLITS, 0)
    lines = []
    for _, folder in blocks:
        source = folder / "manifest.jsonl"
        for line in source.read_text().splitlines():
            record = manifest_record(line, source)
            split = record["split"]
            lines.append(manifest_line(record, f"{split}-{counts[split] // shard_size:05d}.tfrecord") + "\n")
            counts[split] += 1
    return "".join(lines)


def _merged_samples(out: Path, blocks: list[tuple[dict[str, Any], Path]], limit: int, dtype: str) -> None:
    """The blocks' stats pixel samples joined in scene order and trimmed as a whole-scene run trims them."""
    rng = np.random.default_rng()
    rng.bit_generator.state = blocks[-1][0]["sample_rng"]  # after every draw of the scene's tiles
    for key in SAMPLE_KEYS:  # the order tile_scene trims in: the generator is shared
        loaded = [np.load(folder / f"sample_{key}.npy") for _, folder in blocks]
        # a block without sampled tiles saved float64 zeros: joined, they would change the scene's dtype
        arrs = [a for a in loaded if len(a)] or [next((a for a in loaded if a.dtype == dtype), loaded[0])]
        np.save(out / f"sample_{key}.npy", trim_sample(np.concatenate(arrs), limit, rng))


def _merged_meta(blocks: list[tuple[dict[str, Any], Path]], parts: dict[str, list[str]]) -> dict[str, Any]:
    """scene.json of the whole scene: per-tile counts summed over the blocks; the scene-wide counts (tile
    choice, labels), which every block computes for the whole scene, from the first block."""
    metas = [m for m, _ in blocks]
    first = metas[0]
    qa = {k: sum(m["qa"][k] for m in metas) for k in ("kept", "clipped", "dropped", "nodata_skipped")}
    qa.update(max_boxes=max(m["qa"]["max_boxes"] for m in metas),
              tiles={s: sum(m["qa"]["tiles"][s] for m in metas) for s in SPLITS},
              empty_kept=sum(m["qa"]["empty_kept"] for m in metas),
              class_counts={c: sum(m["qa"]["class_counts"][c] for m in metas) for c in first["qa"]["class_counts"]})
    scene_wide = ("straddling_dropped", "empty_dropped", "invalid_geometries", "labels_outside_raster",
                  "objects", "warnings")
    return {"index": first["index"], "scene": first["scene"], "parts": parts, "qa": qa,
            **{k: first[k] for k in scene_wide}, "rows": [0, metas[-1]["rows"][1]]}


def _read_blocks(plan: dict[str, Any], scene_index: int, block_dirs: list[Path]
                 ) -> list[tuple[dict[str, Any], Path]]:
    """The blocks' scene.json and folders in row order; a one-line error unless they cover the scene once."""
    blocks = sorted(((json.loads((Path(d) / "scene.json").read_text()), Path(d)) for d in block_dirs),
                    key=lambda mb: mb[0]["rows"][0])
    scene = plan["scenes"][scene_index]
    n_rows = len(tile_starts(scene["height"], plan["tile_size"], plan["overlap"]))
    ranges = [tuple(m["rows"]) for m, _ in blocks]
    chained = all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    if not ranges or ranges[0][0] != 0 or ranges[-1][1] != n_rows or not chained or \
            any(m["index"] != scene_index for m, _ in blocks):
        raise SatdetError(f"{scene['image']}: row blocks {ranges} do not cover its {n_rows} tile rows once; "
                          "tile the scene again")
    return blocks


def merge_row_blocks(config: Config, scene_index: int, block_dirs: list[Path], work_dir: Path) -> Path:
    """Merge the row blocks of one scene into ``work_dir/scene-NNNN/``, as tile_scene writes a whole scene."""
    work_dir = Path(work_dir)
    plan = load_plan(config, work_dir)
    blocks = _read_blocks(plan, scene_index, [Path(d) for d in block_dirs])
    shard_size = config.tiling.shard_size
    out_final = work_dir / scene_dir_name(scene_index)
    with atomic_dir(out_final) as out:
        parts = _recut_records(out, blocks, shard_size)
        atomic_write_text(out / "manifest.jsonl", _merged_manifest(blocks, shard_size))
        _merged_samples(out, blocks, config.tiling.stats_max_pixels, plan["dtype"])
        atomic_write_json(out / "scene.json", _merged_meta(blocks, parts))
    return out_final
