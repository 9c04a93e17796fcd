"""Input-pipeline throughput: images/s out of `build_dataset(training=True)` on this machine. Prints JSON.

    .venv/bin/python benchmarks/input_pipeline.py                  # 400 and 512 px, batch 4 and 8, aug on/off
    .venv/bin/python benchmarks/input_pipeline.py --sizes 400 --batches 4 --seconds 5

Synthetic tiles written with records.encode_tile: uint8 RGB (PNG, like NEON RGB) with smooth texture plus
noise (so PNG decode costs what real imagery costs) and 30 boxes of 15-80 px per tile; one extra row for
uint16 4-band tiles (raw bytes). Augmentation = the default list (flips, rot90, brightness/contrast, HSV).
Compare with the training step rate from benchmarks/model.py: the pipeline should deliver ≥ 3× that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import tensorflow as tf

from pipeline.config import Config
from pipeline.data.dataset import build_dataset
from pipeline.data.records import encode_tile


def _write_tiles(root: Path, size: int, n: int, dtype: str, channels: int, per_shard: int = 16) -> Path:
    """A tiles folder with `n` train tiles of `size` px (stats.json, qa.json, shards)."""
    rng = np.random.default_rng(0)
    top = 255 if dtype == "uint8" else 4095
    yy, xx = np.mgrid[0:size, 0:size] / size
    root.mkdir(parents=True)
    for s in range(0, n, per_shard):
        name = f"train-{s // per_shard:05d}-of-{-(-n // per_shard):05d}.tfrecord"
        with tf.io.TFRecordWriter(str(root / name)) as writer:
            for i in range(s, min(n, s + per_shard)):
                base = 0.5 + 0.25 * np.sin(6 * xx + i)[..., None] * np.cos(5 * yy + 2 * i)[..., None]
                image = np.clip((base + rng.normal(0, 0.08, (size, size, channels))) * top, 0, top).astype(dtype)
                wh = rng.uniform(15, 80, (30, 2))
                xy = rng.uniform(0, size - 80, (30, 2))
                writer.write(encode_tile(image, np.concatenate([xy, xy + wh], 1), np.ones(30), f"t{i}", "bench"))
    stats = {"dtype": dtype, "bands": list(range(1, channels + 1)), "channels": channels, "nodata": None,
             "tile_size": size, "percentiles": [1, 99], "low": [0.0] * channels, "high": [float(top)] * channels,
             "mean": [top / 2] * channels, "std": [top / 4] * channels}
    (root / "stats.json").write_text(json.dumps(stats))
    (root / "qa.json").write_text(json.dumps({"max_boxes_per_tile": 30}))
    return root


def _rate(tiles: Path, size: int, batch: int, augment: bool, seconds: float) -> dict:
    cfg = Config.model_validate({"tiling": {"tile_size": size, "overlap": 0}, "data": {"batch_size": batch,
                                                                                        "shuffle_buffer": 64}})
    if not augment:
        cfg.data.augment = []
    it = iter(build_dataset(tiles, "train", cfg, training=True))
    for _ in range(5):  # warm-up: tracing, autotune, shuffle buffer fill
        next(it)
    n, start, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        images, _ = next(it)
        n += int(images.shape[0])
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    cpu_ms = 1000 * cpu / n
    return {"size": size, "batch": batch, "augment": augment, "images": n, "seconds": round(elapsed, 2),
            "images_per_s": round(n / elapsed, 1), "cpu_ms_per_image": round(cpu_ms, 2),
            "images_per_s_if_cores_free": round(1000 * (os.cpu_count() or 1) / cpu_ms, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[400, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--tiles", type=int, default=64, help="Distinct tiles written per size.")
    parser.add_argument("--seconds", type=float, default=3.0, help="Measurement time per configuration.")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            tiles = _write_tiles(Path(tmp) / f"u8_{size}", size, args.tiles, "uint8", 3)
            for batch in args.batches:
                for augment in (False, True):
                    results.append({"tiles": "uint8 RGB (PNG)", **_rate(tiles, size, batch, augment, args.seconds)})
        size, batch = args.sizes[0], args.batches[0]
        tiles = _write_tiles(Path(tmp) / "u16", size, args.tiles // 2, "uint16", 4)
        results.append({"tiles": "uint16 4-band (raw)", **_rate(tiles, size, batch, True, args.seconds)})
    print(json.dumps({
        "benchmark": "input_pipeline",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "tensorflow": tf.__version__,
                    "load_average_1min": round(os.getloadavg()[0], 2)},
        "note": "images_per_s is wall time on a possibly shared machine; images_per_s_if_cores_free = cores / "
                "CPU time per image (an upper bound that ignores tf.data scheduling overhead)",
        "threads": "tf.data defaults (AUTOTUNE parallel map, private pool = all cores); cv2.setNumThreads(0)",
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
