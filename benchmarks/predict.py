"""Full-scene inference throughput (Mpx/s) and peak memory vs scene size, on CPU. Prints JSON.

    .venv/bin/python benchmarks/predict.py                   # 4096² scene, then 8192² (4x the pixels) for RSS
    .venv/bin/python benchmarks/predict.py --size 2048 --rss-size 0 --threads 2
    .venv/bin/python benchmarks/predict.py --config configs/neon-trees.yaml        # that config's model section
    .venv/bin/python benchmarks/predict.py --export runs/neon-trees/model/export   # a trained export
    .venv/bin/python benchmarks/predict.py --export runs/neon-trees/model/export --tta   # with test-time flips

MobileNetV3-Large FPN from scratch (untrained weights are fine for speed), 400 px windows, overlap 32,
batch 4, through the exported SavedModel when pipeline.model.export is available (else the Keras model
wrapped with the same normalisation). The untrained model's scores sit near 0.5, so with the model's own
score threshold (0.05) every window returns `max_detections` boxes and the seam merge gets more work than
a real scene would give it; --score-threshold sets the threshold applied before merging.

Each scene size runs in its own subprocess so its peak RSS (ru_maxrss) is its own: a flat figure across
sizes shows the streaming reads keep memory bounded. The scene is a synthetic textured GeoTIFF written in
strips (pipeline.geo.synth). The torchvision reference, measured side by side on the same scene and
windows, is benchmarks/vs_torchvision.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _stats() -> dict:
    return {"dtype": "uint8", "bands": [1, 2, 3], "channels": 3, "nodata": None, "tile_size": 400,
            "percentiles": [1, 99], "low": [0.0] * 3, "high": [255.0] * 3, "mean": [110.0] * 3, "std": [50.0] * 3}


class _KerasDetector:
    """Fallback when no export module exists: same contract as ExportedDetector (raw pixels in)."""

    def __init__(self, model, stats: dict, classes: list[str], tile_size: int) -> None:
        import tensorflow as tf

        from pipeline.data.stats import normalize

        self.info = {"bands": stats["bands"], "channels": 3, "dtype": "uint8", "tile_size": tile_size,
                     "classes": classes, "stats": stats}
        self._fn = tf.function(lambda x: model(normalize(x, stats), training=False),
                               input_signature=[tf.TensorSpec([None, tile_size, tile_size, 3], tf.uint8)])

    def predict(self, images):
        return {k: v.numpy() for k, v in self._fn(images).items()}


def _detector(work: Path, tile: int, config: str | None = None, export: str | None = None):
    from pipeline.config import ModelConfig, load_config
    from pipeline.model.detector import build_detector

    if export:
        from pipeline.model.export import load_exported

        return load_exported(export), f"exported SavedModel {export}"
    model_cfg = load_config(config).model if config else ModelConfig(backbone="mobilenet_v3_large")
    model = build_detector(model_cfg, 1, 3)
    try:
        from pipeline.model.export import export_model, load_exported

        export_model(model, _stats(), ["tree"], work / "export", tile_size=tile)
        return load_exported(work / "export"), "exported SavedModel"
    except Exception as err:  # noqa: BLE001 - measure the same graph without the SavedModel wrapper
        return _KerasDetector(model, _stats(), ["tree"], tile), f"keras (export unavailable: {type(err).__name__})"


def _child(args: argparse.Namespace) -> None:
    """One scene size: write the scene, predict it, print one JSON line."""
    import numpy as np
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    from pipeline.config import PredictConfig
    from pipeline.geo.synth import make_scene
    from pipeline.predict.scene import predict_region

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scene = make_scene(work, "scene", width=args.size, height=args.size, seed=0, resolution=0.1).image
        rss_before_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        detector, kind = _detector(work, args.tile, args.config, args.export)
        cfg = PredictConfig(tile_size=args.tile, overlap=args.overlap, batch_size=args.batch,
                            score_threshold=args.score_threshold)
        if args.tta:
            from pipeline.predict.adapt import FlipTTA

            detector, kind = FlipTTA(detector, cfg.merge_iou), kind + " + flips (4 views, WBF)"
        warm = np.zeros((args.batch, args.tile, args.tile, 3), np.uint8)
        detector.predict(warm)  # trace/compile outside the timed run
        t0 = time.perf_counter()
        dets = predict_region(detector, scene, cfg)
        seconds = time.perf_counter() - t0
        mpx = args.size * args.size / 1e6
        print(json.dumps({
            "scene_px": [args.size, args.size], "mpx": round(mpx, 2), "windows": dets.windows,
            "seconds": round(seconds, 2), "mpx_per_s": round(mpx / seconds, 3),
            "windows_per_s": round(dets.windows / seconds, 2), "detections_after_merge": len(dets),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_before_model_mb": round(rss_before_model, 1), "model": kind,
        }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096, help="Scene edge for the throughput figure.")
    p.add_argument("--rss-size", type=int, default=8192, help="Scene edge for the memory figure (0 = skip).")
    p.add_argument("--tile", type=int, default=400)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--score-threshold", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=0, help="TF intra/inter-op threads (0 = TF default).")
    p.add_argument("--config", help="Take the model section from this config (default: library defaults).")
    p.add_argument("--export", help="Benchmark this trained export instead of an untrained model.")
    p.add_argument("--tta", action="store_true", help="Test-time flips (predict.tta): four views per window.")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    runs = []
    for size in [args.size] + ([args.rss_size] if args.rss_size else []):
        cmd = [sys.executable, __file__, "--child", "--size", str(size), "--tile", str(args.tile),
               "--overlap", str(args.overlap), "--batch", str(args.batch),
               "--score-threshold", str(args.score_threshold), "--threads", str(args.threads)]
        cmd += ["--config", args.config] if args.config else []
        cmd += ["--export", str(Path(args.export).resolve())] if args.export else []
        cmd += ["--tta"] if args.tta else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"benchmark child failed for size {size}:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = {
        "benchmark": "predict",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {"model": args.export or args.config or "library defaults (MobileNetV3-Large FPN)", "tile": args.tile,
                     "overlap": args.overlap, "batch": args.batch, "score_threshold": args.score_threshold,
                     "tf_threads": args.threads or "default", "tta": args.tta},
        "throughput": runs[0],
        "memory": runs[1:] and {"sizes": [r["scene_px"][0] for r in runs],
                                "peak_rss_mb": [r["peak_rss_mb"] for r in runs]},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
