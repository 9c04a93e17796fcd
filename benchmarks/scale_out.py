"""Scale-out benchmark: synthetic scenes tiled and predicted through the Prefect flows' tasks, serially
(the default thread pool, one scene at a time) and on a Dask LocalCluster (prefect-dask). Prints JSON.

    .venv/bin/python benchmarks/scale_out.py                          # 8 scenes of 4096², 2 worker processes
    .venv/bin/python benchmarks/scale_out.py --scenes 4 --size 2048 --workers 4 --out scale.json

Both modes run the same tasks (flows.training: plan-tiling, tile-scene, finalize-tiling; flows.prediction:
one predict-scenes task per scene of an output folder) with the cache refreshed, against a temporary
Prefect API; the JSON has the wall time of each mode, serial / Dask ratios, and whether the outputs are
byte-identical (tiles: every shard, manifest and stats file; detections: every GeoJSON). The model is
an untrained tiny detector exported as a SavedModel (speed only; score threshold 0.3).

The row-block case ("row_blocks" in the JSON): ONE scene (the first, or a new one of `--big-size`) tiled as
one tile-scene task, then on the LocalCluster as 2 × workers tile-row-block tasks and their merge
(tiling.row_block_windows), with the same byte comparison. Needs `pip install "satdet[dask]"`. On a
machine busy with other work the ratio says little: note the load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def _tile_flow():
    """A flow with the training flow's tiling tasks only (same tasks, same order, cache refreshed)."""
    from prefect import flow

    from flows import training

    @flow(name="scale-out-tiling")
    def tile_scenes(config_path: str, work: str, out: str, overrides: list[str] | None = None) -> str:
        from pipeline.config import load_config

        config = load_config(config_path, overrides or [])
        training.plan_tiling(config, Path(work), force=True)
        outputs = training.tile_all_scenes(config, Path(work), refresh=True)  # tiling.workers: 1 when serial
        return str(training.finalize_tiling.with_options(refresh_cache=True)(config, outputs, Path(out)))

    return tile_scenes


def _export(work: Path, classes: list[str], tile: int) -> Path:
    import tensorflow as tf

    from pipeline.config import ModelConfig
    from pipeline.model.detector import build_detector
    from pipeline.model.export import export_model

    stats = {"dtype": "uint8", "bands": [1, 2, 3], "channels": 3, "nodata": None, "tile_size": tile,
             "percentiles": [1, 99], "low": [0.0] * 3, "high": [255.0] * 3, "mean": [110.0] * 3, "std": [50.0] * 3}
    tf.keras.utils.set_random_seed(0)
    model = build_detector(ModelConfig(backbone="tiny", fpn_channels=16, head_dim=32, min_level=3, max_level=5,
                                       anchor_sizes=[16, 32, 64], max_detections=50), len(classes), 3)
    return export_model(model, stats, classes, work / "model" / "export", tile_size=tile)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--size", type=int, default=4096, help="Scene edge in pixels.")
    p.add_argument("--workers", type=int, default=2, help="Dask LocalCluster worker processes.")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--big-size", type=int, default=0,
                   help="Edge of the one scene of the row-block case; 0 = the first scene of --size.")
    p.add_argument("--out", type=Path, help="Also write the JSON here.")
    return p.parse_args()


def _write_config(path: Path, work: Path, scenes: list, tile: int) -> Path:
    import yaml

    from pipeline.geo.synth import DEFAULT_CLASSES

    path.write_text(yaml.safe_dump({
        "name": "scale", "runs_dir": str(work / "runs"), "classes": list(DEFAULT_CLASSES),
        "tiling": {"scenes": [{"image": str(s.image), "labels": str(s.labels)} for s in scenes],
                   "tile_size": tile, "overlap": 0, "workers": 1, "shard_size": 256},
    }))
    return path


def _timed(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def _many_scenes(args: argparse.Namespace, work: Path, config: Path, images: list[str]) -> dict[str, float]:
    """Tiling and prediction of every scene, serially then on a LocalCluster; wall times."""
    from flows.prediction import predict_scenes
    from flows.scaleout import dask_task_runner
    from pipeline.geo.synth import DEFAULT_CLASSES

    export = _export(work, list(DEFAULT_CLASSES), args.tile)
    predict = {"score_threshold": 0.3, "overlap": 32, "batch_size": 4}
    tile_flow = _tile_flow()
    timings: dict[str, float] = {}
    for mode in ("serial", "dask"):
        on_dask = mode == "dask"
        tiles_flow = tile_flow.with_options(task_runner=dask_task_runner(workers=args.workers)) if on_dask else tile_flow
        timings[f"tile_{mode}_s"] = _timed(tiles_flow, str(config), str(work / f"work-{mode}"),
                                           str(work / f"tiles-{mode}"))
        pred_flow = predict_scenes.with_options(task_runner=dask_task_runner(workers=args.workers)) \
            if on_dask else predict_scenes
        timings[f"predict_{mode}_s"] = _timed(pred_flow, str(export), images, str(work / f"pred-{mode}"),
                                              predict=predict, force=True)
    return timings


def _row_blocks(args: argparse.Namespace, work: Path, config: Path) -> dict:
    """One scene: one tile-scene task (default runner) vs its row blocks on a LocalCluster."""
    import math

    from flows.scaleout import dask_task_runner
    from pipeline.geo.grid import tile_starts

    tile_flow = _tile_flow()
    edge = args.big_size or args.size
    n_windows = len(tile_starts(edge, args.tile, 0)) ** 2
    per_block = math.ceil(n_windows / (2 * args.workers))  # two blocks per worker
    whole_s = _timed(tile_flow, str(config), str(work / "big-work-whole"), str(work / "big-tiles-whole"))
    on_dask = tile_flow.with_options(task_runner=dask_task_runner(workers=args.workers))
    blocks_s = _timed(on_dask, str(config), str(work / "big-work-blocks"), str(work / "big-tiles-blocks"),
                      [f"tiling.row_block_windows={per_block}"])
    same = _digests(work / "big-tiles-whole") == _digests(work / "big-tiles-blocks")
    return {"scene_px": [edge, edge], "windows": n_windows, "row_block_windows": per_block,
            "blocks": len(list((work / "big-work-blocks").glob("scene-0000-rows-*"))),
            "tile_whole_s": round(whole_s, 2), "tile_blocks_dask_s": round(blocks_s, 2),
            "speedup": round(whole_s / blocks_s, 3), "tiles_byte_identical": same}


def main() -> None:
    args = _args()
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from pipeline.geo.synth import make_scene, make_scenes

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        scenes = make_scenes(work / "scenes", n_scenes=args.scenes, size=args.size)
        big = [make_scene(work / "scenes", "big", args.big_size, args.big_size, seed=7)] if args.big_size else scenes[:1]
        synth_s = time.perf_counter() - t0
        config = _write_config(work / "scale.yaml", work, scenes, args.tile)
        big_config = _write_config(work / "big.yaml", work, big, args.tile)
        with (temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(work / "results")}),
              prefect_test_harness(server_startup_timeout=180)):
            timings = _many_scenes(args, work, config, [str(s.image) for s in scenes])
            row_blocks = _row_blocks(args, work, big_config)
        tiles_same = _digests(work / "tiles-serial") == _digests(work / "tiles-dask")
        preds_same = _digests(work / "pred-serial") == _digests(work / "pred-dask")
        n_tiles = sum(1 for _ in (work / "tiles-serial" / "manifest.jsonl").open())

    result = {
        "benchmark": "scale_out",
        "scenes": args.scenes, "scene_px": [args.size, args.size], "tile_px": args.tile, "tiles": n_tiles,
        "dask_workers": args.workers,
        **{k: round(v, 2) for k, v in timings.items()},
        "tile_speedup": round(timings["tile_serial_s"] / timings["tile_dask_s"], 3),
        "predict_speedup": round(timings["predict_serial_s"] / timings["predict_dask_s"], 3),
        "total_speedup": round((timings["tile_serial_s"] + timings["predict_serial_s"])
                               / (timings["tile_dask_s"] + timings["predict_dask_s"]), 3),
        "tiles_byte_identical": tiles_same, "detections_byte_identical": preds_same,
        "row_blocks": row_blocks,
        "synth_s": round(synth_s, 1), "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if not (tiles_same and preds_same and row_blocks["tiles_byte_identical"]):
        raise SystemExit("outputs differ between the serial and the Dask run")


if __name__ == "__main__":
    main()
