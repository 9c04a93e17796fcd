"""The tiling stage: GeoTIFF scenes + labels → TFRecord tiles, manifest, stats, QA and splits.

    run_tiling(config, out_dir=None) -> tiles dir        the whole stage (scenes in parallel processes)
    summary_lines(tiles_dir) -> [str]                    the CLI's summary of a run

Its steps, each a function a Prefect task can call alone (flows/training.py):

    pipeline.geo.plan.plan_tiling(config)                 windows, blocks and splits from the headers
    pipeline.geo.scene.tile_scene(config, i, work_dir)    one scene into work_dir/scene-NNNN/, or one row
                                                          block of it (pipeline.geo.blocks merges those)
    pipeline.geo.finalize.finalize_tiling(config, scene_outputs, out_dir)   scene outputs → the tiles dir

Everything is written into temporary folders that replace the output only when complete, so a failure
leaves no partial output. A GDAL read error (a corrupt or cut-short file) reaches the caller, across the
process pool too, as one SatdetError naming the file and the rows.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.geo.finalize import finalize_tiling
from pipeline.geo.scene import Progress, tile_scene
from pipeline.geo.workdir import load_plan

__all__ = ["run_tiling", "summary_lines"]


def run_tiling(config: Config, out_dir: Path | None = None) -> Path:
    """Tile every scene of `config.tiling` into `out_dir` (default ``config.run_dir/tiles``); returns it.

    Scenes run in parallel processes (``tiling.workers``; paths are passed, never open datasets). On any
    error nothing is left behind: outputs are assembled in temp folders and renamed into place at the end.
    """
    out_dir = Path(out_dir) if out_dir is not None else config.run_dir / "tiles"
    created = [p for p in [out_dir.parent, *out_dir.parent.parents] if not p.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.work-"))
    try:
        finalize_tiling(config, _tile_scenes(config, work), out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for p in created:  # folders this call made, now empty: leave no trace
            try:
                p.rmdir()
            except OSError:
                break
        raise
    shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _tile_scenes(config: Config, work: Path) -> list[Path]:
    """Every scene into `work` (in this process with one worker), with a progress bar over the windows."""
    plan = load_plan(config, work)
    n = len(plan["scenes"])
    workers = min(config.tiling.workers or os.cpu_count() or 1, n)
    with _progress_bar() as bar:
        task = bar.add_task("tiles", total=sum(s["n_windows"] for s in plan["scenes"]))

        def advance(k: int) -> None:
            bar.advance(task, k)

        if workers <= 1:
            return [tile_scene(config, i, work, progress=advance) for i in range(n)]
        return _run_parallel(config, work, n, workers, advance)


def _progress_bar() -> Any:
    """The stage's bar on stderr (transient; off when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(TextColumn("tiling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


def _run_parallel(config: Config, work: Path, n_scenes: int, workers: int, advance: Progress) -> list[Path]:
    """Every scene in a pool of `workers` processes; their progress comes back through a queue, and the
    first scene error is raised at once (the scenes not started are cancelled)."""
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold TF/GDAL threads
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        queue = manager.Queue()
        futures = [pool.submit(_tile_scene_queued, config, i, work, queue) for i in range(n_scenes)]
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2)
                while not queue.empty():
                    advance(queue.get())
                for fut in done:
                    fut.result()  # re-raise a scene's error at once
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
        return [f.result() for f in futures]


def _tile_scene_queued(config: Config, index: int, work: Path, queue: Any) -> Path:
    return tile_scene(config, index, work, progress=queue.put)


def summary_lines(tiles_dir: Path) -> list[str]:
    """A short human summary of a tiling run (for the CLI)."""
    qa = json.loads((Path(tiles_dir) / "qa.json").read_text())
    t, b = qa["tiles"], qa["boxes"]
    lines = [
        (
            f"tiles: train {t['train']}, val {t['val']}, test {t['test']} (empty kept {t['empty_kept']}, "
            f"empty dropped {t['empty_dropped']}, nodata skipped {t['nodata_skipped']}, "
            f"straddling dropped {t['straddling_dropped']})"
        ),
        (
            f"boxes: kept {b['kept']} (clipped {b['clipped']}), dropped at edges {b['dropped']}; "
            f"max per tile {qa['max_boxes_per_tile']}"
        ),
        "classes: " + ", ".join(f"{k} {v}" for k, v in qa["class_counts"].items()),
    ]
    if qa["invalid_geometries"] or qa["labels_outside_raster"]:
        lines.append(f"skipped labels: {qa['invalid_geometries']} invalid geometries, "
                     f"{qa['labels_outside_raster']} outside the raster")
    lines += [f"warning: {w}" for w in qa.get("warnings", [])]
    lines.append(f"written: {tiles_dir}")
    return lines
