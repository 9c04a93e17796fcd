"""The tiles folder from the scenes' work folders: numbered shards, manifest.jsonl, stats.json, qa.json and
splits.json, assembled in a temporary folder that replaces `out_dir` only when complete.

    finalize_tiling(config, scene_outputs, out_dir) -> out_dir
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import SatdetError
from pipeline.files import atomic_dir, atomic_write_json
from pipeline.geo.pixel_sample import per_scene_stats, stats_json, stats_sample
from pipeline.geo.plan import SPLITS, splits_json
from pipeline.geo.shards import manifest_line, manifest_record
from pipeline.geo.workdir import PLAN_FILE

_Scene = tuple[dict[str, Any], Path]  # a scene's scene.json and its work folder


def finalize_tiling(config: Config, scene_outputs: list[Path], out_dir: Path) -> Path:
    """Merge per-scene outputs into `out_dir`: numbered shards, manifest.jsonl, stats/qa/splits.json."""
    out_dir = Path(out_dir)
    scene_outputs = [Path(p) for p in scene_outputs]
    if not scene_outputs:
        raise SatdetError("config: no scenes were tiled; list scenes under tiling.scenes")
    plan = json.loads((scene_outputs[0].parent / PLAN_FILE).read_text())
    scenes = sorted(((json.loads((p / "scene.json").read_text()), p) for p in scene_outputs),
                    key=lambda mp: mp[0]["index"])
    if sum(sum(m["qa"]["tiles"].values()) for m, _ in scenes) == 0:
        raise SatdetError(f"{config.tiling.scenes[0].image}: no tile was kept (all empty, nodata or straddling); "
                          "raise tiling.negative_ratio / max_nodata_fraction or check the labels")
    with atomic_dir(out_dir) as tmp:
        renames = _link_shards(scenes, tmp)
        _write_manifest(scenes, renames, tmp / "manifest.jsonl")
        samples, sample_warnings = stats_sample([p for _, p in scenes], plan["channels"])
        percentiles = tuple(config.tiling.stats_percentiles)
        stats = stats_json(samples, plan, percentiles)
        stats["scenes"] = per_scene_stats([(m["scene"], p) for m, p in scenes], percentiles)
        atomic_write_json(tmp / "stats.json", stats)
        warnings = [w for m, _ in scenes for w in m["warnings"]] + sample_warnings
        atomic_write_json(tmp / "qa.json", _qa_json([m for m, _ in scenes], list(config.classes), warnings))
        atomic_write_json(tmp / "splits.json", splits_json(plan))
    return out_dir


def _link(src: Path, dst: Path) -> None:
    """Hard-link (free, keeps the scene outputs for a retried finalize) or copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_shards(scenes: list[_Scene], out: Path) -> dict[tuple[int, str], str]:
    """Every scene's parts into `out` as numbered shards (``train-00000-of-00012.tfrecord``), split by split
    in scene order; the shard name of each (scene index, part name)."""
    renames: dict[tuple[int, str], str] = {}
    for split in SPLITS:
        parts = [(m["index"], p / name) for m, p in scenes for name in m["parts"][split]]
        for k, (index, src) in enumerate(parts):
            name = f"{split}-{k:05d}-of-{len(parts):05d}.tfrecord"
            _link(src, out / name)
            renames[(index, src.name)] = name
    return renames


def _write_manifest(scenes: list[_Scene], renames: dict[tuple[int, str], str], path: Path) -> None:
    """manifest.jsonl: every scene's lines in scene order, each "shard" renamed to its numbered shard."""
    with open(path, "w") as fh:
        for meta, folder in scenes:
            source = folder / "manifest.jsonl"
            text = source.read_text()
            if text and not text.endswith("\n"):  # cut short inside its last line
                raise SatdetError(f"{source}: a line lacks its shard; tile the scene again")
            for line in text.splitlines():
                record = manifest_record(line, source)
                fh.write(manifest_line(record, renames[(meta["index"], record["shard"])]) + "\n")


def _qa_json(metas: list[dict[str, Any]], classes: list[str], warnings: list[str]) -> dict[str, Any]:
    """qa.json: the scenes' counts summed (tiles, boxes, classes, labels), per scene, and the warnings."""

    def total(key: str) -> int:
        return int(sum(m[key] for m in metas))

    def total_qa(key: str) -> int:
        return int(sum(m["qa"][key] for m in metas))

    return {
        "boxes": {k: total_qa(k) for k in ("kept", "clipped", "dropped")},
        "tiles": {
            **{s: int(sum(m["qa"]["tiles"][s] for m in metas)) for s in SPLITS},
            "empty_kept": total_qa("empty_kept"),
            "empty_dropped": total("empty_dropped"),
            "nodata_skipped": total_qa("nodata_skipped"),
            "straddling_dropped": total("straddling_dropped"),
        },
        "class_counts": {c: int(sum(m["qa"]["class_counts"][c] for m in metas)) for c in classes},
        "objects": {c: int(sum(m["objects"][c] for m in metas)) for c in classes},
        "max_boxes_per_tile": int(max(m["qa"]["max_boxes"] for m in metas)),
        "invalid_geometries": total("invalid_geometries"),
        "labels_outside_raster": total("labels_outside_raster"),
        "scenes": {m["scene"]: {**m["qa"]["tiles"], "boxes": m["qa"]["kept"]} for m in metas},
        "warnings": warnings,
    }
