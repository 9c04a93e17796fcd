"""Row-block tasks: one large scene tiled as several `tile-row-block` tasks (bands of whole tile rows, so on
Dask they spread over the workers) and merged by a `merge-row-blocks` task into the scene's work folder,
byte for byte what one `tile-scene` task writes (pipeline/geo/blocks.py says why). `finalize-tiling` then
sees no difference.

A scene is split when it has more windows than `tiling.row_block_windows`; with 0 (the default) scenes are
split at AUTO_BLOCK_WINDOWS on a Dask task runner and never on the default one, so small scenes and local
runs keep one task per scene.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import task

from flows.caching import key_fn
from flows.retries import io_retries
from pipeline.config import Config

AUTO_BLOCK_WINDOWS = 4096  # windows per block on Dask when tiling.row_block_windows is 0 (16k² px at 256 px)

Unit = tuple[int, "tuple[int, int] | None"]  # (scene index, tile-row range or None for the whole scene)


def _scene_plan(work_dir: Path, scene_index: int) -> Any:
    """The plan's entry for one scene plus the plan-wide fields (what one scene's tiles depend on)."""
    from pipeline.geo.workdir import PLAN_FILE

    try:
        plan = json.loads((Path(work_dir) / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None
    shared = {k: v for k, v in plan.items() if k != "scenes"}
    return hashlib.sha256(json.dumps([shared, plan["scenes"][scene_index]], sort_keys=True,
                                     default=str).encode()).hexdigest()


def scene_inputs(p: dict[str, Any]) -> dict[str, Any]:
    """What one scene's tiles depend on (the tile-scene and tile-row-block cache keys); a block adds its rows."""
    scene = p["config"].tiling.scenes[p["scene_index"]]
    inputs = {"image": scene.image, "labels": scene.labels, "scene_index": p["scene_index"],
              "plan": _scene_plan(p["work_dir"], p["scene_index"])}
    if "first" in p:
        inputs["rows"] = [p["first"], p["end"]]
    return inputs


@task(
    name="tile-row-block",
    task_run_name="tile-scene-{scene_index}-rows-{first}-{end}",
    **io_retries(3, jitter=True),
    cache_key_fn=key_fn("tile-row-block", scene_inputs, output="work_dir"),
    persist_result=True,
)
def tile_row_block(config: Config, scene_index: int, first: int, end: int, work_dir: Path) -> Path:
    """Cut tile rows first..end-1 of one scene (retried with backoff, like tile-scene)."""
    from pipeline.geo import blocks

    return Path(blocks.tile_row_block(config, scene_index, (first, end), Path(work_dir)))


@task(
    name="merge-row-blocks",
    task_run_name="merge-row-blocks-{scene_index}",
    **io_retries(2),
    cache_key_fn=key_fn("merge-row-blocks",
                        lambda p: {"scene_index": p["scene_index"], **dict(enumerate(map(str, p["block_dirs"])))},
                        output="work_dir"),
    persist_result=True,
)
def merge_row_blocks(config: Config, scene_index: int, block_dirs: list[Path], work_dir: Path) -> Path:
    """Join one scene's row blocks into its scene folder (records re-cut into shards, manifest, sample)."""
    from pipeline.geo import blocks

    return Path(blocks.merge_row_blocks(config, scene_index, [Path(d) for d in block_dirs], Path(work_dir)))


def tiling_units(config: Config, work_dir: Path, dask: bool) -> list[Unit]:
    """The tiling tasks to run, from the plan: (scene, None) per whole scene, (scene, rows) per row block."""
    from pipeline.geo.blocks import row_blocks
    from pipeline.geo.workdir import PLAN_FILE

    plan = json.loads((Path(work_dir) / PLAN_FILE).read_text())
    per_block = config.tiling.row_block_windows or (AUTO_BLOCK_WINDOWS if dask else 0)
    units: list[Unit] = []
    for i in range(len(plan["scenes"])):
        ranges = row_blocks(plan, i, per_block)
        units += [(i, None)] if len(ranges) == 1 else [(i, rows) for rows in ranges]
    return units


def merged_outputs(config: Config, units: list[Unit], outputs: list[Path], work_dir: Path, refresh: bool
                   ) -> list[Path]:
    """The scene folders in scene order: a whole scene's as it is; a split scene's blocks merged by a
    submitted merge-row-blocks task (on Dask, on a worker), all scenes' merges at once."""
    by_scene: dict[int, list[tuple[Any, Path]]] = {}
    for (index, rows), out in zip(units, outputs, strict=True):
        by_scene.setdefault(index, []).append((rows, out))
    merge = merge_row_blocks.with_options(refresh_cache=True) if refresh else merge_row_blocks
    merges = {i: merge.submit(config, i, [out for _, out in items], work_dir)
              for i, items in by_scene.items() if items[0][0] is not None}
    return [Path(merges[i].result()) if i in merges else Path(items[0][1]) for i, items in sorted(by_scene.items())]
