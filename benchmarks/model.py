"""Detector throughput on this machine: training and inference img/s, plain tf.function vs XLA. Prints JSON.

    .venv/bin/python benchmarks/model.py                       # MobileNetV3-Large FPN from scratch, 400 px, batch 4
    .venv/bin/python benchmarks/model.py --variant plain:fpn_channels=128 --variant plain:mixed_precision=mixed_bfloat16
    .venv/bin/python benchmarks/model.py --config configs/neon-trees.yaml   # start from that config's model section

Synthetic data: random normalised images with 30 boxes of 15-80 px each (tree crowns at 0.1 m). The train
step is the real pattern (GradientTape, global-norm clip, SGD) without the input pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import tensorflow as tf
import yaml

from pipeline.config import ModelConfig
from pipeline.model.detector import build_detector
from pipeline.model.kernels import XLA_KERNELS


def _batch(batch: int, size: int, boxes: int, seed: int = 0) -> tuple[tf.Tensor, dict]:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    wh = rng.uniform(15, 80, size=(batch, boxes, 2))
    xy = rng.uniform(0, size - 80, size=(batch, boxes, 2))
    targets = {
        "boxes": tf.constant(np.concatenate([xy, xy + wh], -1), tf.float32),
        "labels": tf.ones((batch, boxes), tf.int32),
        "num_boxes": tf.fill([batch], boxes),
    }
    return tf.constant(images), targets


def _time(fn, steps: int) -> float:
    fn()  # trace / compile
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        out = fn()
    tf.nest.map_structure(lambda t: t.numpy(), out)
    return time.perf_counter() - start


def run(cfg: ModelConfig, jit: bool, batch: int, size: int, steps: int) -> dict:
    if jit:
        cfg = cfg.model_copy(update=XLA_KERNELS)  # the CPU kernels have no XLA lowering
    model = build_detector(cfg, num_classes=1, bands=3)
    optimizer = tf.keras.optimizers.SGD(0.01, momentum=0.9)
    images, targets = _batch(batch, size, 30)

    @tf.function(jit_compile=jit)
    def train_step(images, targets):
        with tf.GradientTape() as tape:
            losses = model.compute_losses(images, targets, training=True)
            total = tf.add_n(list(losses.values()))
        grads = tape.gradient(total, model.trainable_variables)
        grads, _ = tf.clip_by_global_norm(grads, 10.0)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return total

    @tf.function(jit_compile=jit)
    def infer(images):
        return model(images, training=False)

    result = {"jit_compile": jit, "roi_align_impl": model.roi_align_impl}
    try:
        dt = _time(lambda: train_step(images, targets), steps)
        result["train_img_per_s"] = round(batch * steps / dt, 3)
        result["train_s_per_step"] = round(dt / steps, 3)
    except (tf.errors.OpError, ValueError) as err:  # XLA may refuse an op: report, do not die
        result["train_error"] = f"{err.__class__.__name__}: {str(err).splitlines()[0][:200]}"
    try:
        dt = _time(lambda: infer(images), steps)
        result["infer_img_per_s"] = round(batch * steps / dt, 3)
    except (tf.errors.OpError, ValueError) as err:
        result["infer_error"] = f"{err.__class__.__name__}: {str(err).splitlines()[0][:200]}"
    return result


def calibrate(batch: int, size: int, steps: int) -> float:
    """Backbone-only train step img/s (DESIGN.md measured 14.5 on an idle machine): a load gauge."""
    from pipeline.model.backbone import build_backbone

    backbone = build_backbone("mobilenet_v3_large", 3)
    optimizer = tf.keras.optimizers.SGD(0.01)
    images = tf.random.normal([batch, size, size, 3])

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(backbone(images, training=True)[-1])
        optimizer.apply_gradients(zip(tape.gradient(loss, backbone.trainable_variables), backbone.trainable_variables))
        return loss

    return round(batch * steps / _time(step, steps), 3)


def _parse_variant(text: str) -> tuple[dict, bool]:
    """'plain' / 'xla', optionally followed by ':key=value,key=value' model overrides."""
    mode, _, rest = text.partition(":")
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in rest.split(",") if item)}
    return overrides, mode == "xla"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=400)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variant", action="append", default=[],
                        help="'plain' or 'xla', optionally ':key=value,...' model overrides (repeatable); "
                        "default: plain, xla")
    parser.add_argument("--config", help="Start every variant from this config's model section (default: defaults).")
    args = parser.parse_args()
    variants = args.variant or ["plain", "xla"]
    base = {"backbone": "mobilenet_v3_large", "weights": "none"}
    if args.config:
        from pipeline.config import load_config

        base = load_config(args.config).model.model_dump()
    out = {
        "benchmark": "model",
        "model": args.config or "defaults: mobilenet_v3_large (weights none)",
        "image_size": args.size,
        "batch": args.batch,
        "steps_timed": args.steps,
        "cpu_count": os.cpu_count(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default (all cores)",
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or "default (all cores)",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "tensorflow": tf.__version__,
        "machine": platform.machine(),
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "backbone_only_train_img_per_s": calibrate(args.batch, args.size, args.steps),
        "results": [],
    }
    for text in variants:
        overrides, jit = _parse_variant(text)
        cfg = ModelConfig(**{**base, **overrides})
        out["results"].append({"variant": text, **run(cfg, jit, args.batch, args.size, args.steps)})
    out["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
