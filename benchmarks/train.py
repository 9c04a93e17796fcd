"""Train-step throughput per clipping strategy on CPU: steps/s, img/s and overhead relative to `none`.

    .venv/bin/python benchmarks/train.py [--backbone tiny] [--size 128] [--batch 2] [--rounds 5] [--threads 2]

Uses the real detector (pipeline.model.detector, default head sizes) on random images with random boxes,
so the number is the train step alone (forward, backward, clipping, optimizer) — the input pipeline is
benchmarked apart. Two measurements per strategy:
- ``clip_ms``: the clipper alone on the detector's real gradients (a tf.function, median of many calls) —
  the direct cost of the strategy, stable even on a busy machine;
- ``steps_per_s`` / ``images_per_s``: whole train steps, strategies interleaved round-robin (one step
  each per round, median over rounds) so machine-load drift hits all strategies alike.
``overhead_vs_none`` = clip_ms / median step time of `none`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

STRATEGIES = ("none", "global_norm", "value", "norm", "loss_adaptive", "autoclip", "agc", "zclip")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    args = ap.parse_args()

    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras

    from pipeline.config import Config
    from pipeline.model.detector import build_detector
    from pipeline.train.clipping import build_clipper
    from pipeline.train.optim import build_optimizer
    from pipeline.train.step import TrainStep, build_variables

    cfg = Config()
    cfg.model.backbone = args.backbone
    cfg.train.clip.warmup_steps = 1
    rng = np.random.default_rng(0)
    m = 16
    xy = rng.uniform(0, args.size - 24, size=(args.batch, m, 2))
    wh = rng.uniform(8, 24, size=(args.batch, m, 2))
    images = tf.constant(rng.normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32))
    targets = {
        "boxes": tf.constant(np.concatenate([xy, xy + wh], -1).astype(np.float32)),
        "labels": tf.ones([args.batch, m], tf.int32),
        "num_boxes": tf.fill([args.batch], m),
    }
    spec = tf.data.Dataset.from_tensors((images, targets)).element_spec
    names = args.strategies.split(",")
    steps, clippers = {}, {}
    for name in names:
        keras.utils.set_random_seed(0)
        cfg.train.clip.strategy = name
        model = build_detector(cfg.model, 1, 3)
        build_variables(model, spec)
        clippers[name] = build_clipper(cfg.train.clip)
        steps[name] = TrainStep(model, build_optimizer(cfg.train.optimizer, 0.001), clippers[name])
        for _ in range(args.warmup):
            steps[name](images, targets)["loss"].numpy()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            t0 = time.perf_counter()
            steps[name](images, targets)["loss"].numpy()
            times[name].append(time.perf_counter() - t0)

    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss = tf.add_n(list(model.compute_losses(images, targets, training=True).values()))
    grads = tape.gradient(loss, variables)
    results = {}
    for name in names:
        fn = tf.function(lambda g, c=clippers[name]: c(g, variables, loss)[1].norm_after)
        fn(grads).numpy()
        reps = []
        for _ in range(50):
            t0 = time.perf_counter()
            fn(grads).numpy()
            reps.append(time.perf_counter() - t0)
        step_s = float(np.median(times[name]))
        results[name] = {
            "steps_per_s": 1.0 / step_s,
            "images_per_s": args.batch / step_s,
            "clip_ms": 1000 * float(np.median(reps)),
        }
    base_s = float(np.median(times[names[0]])) if names[0] == "none" else None
    if base_s:
        for r in results.values():
            r["overhead_vs_none"] = r["clip_ms"] / 1000 / base_s
    print(
        json.dumps(
            {
                "benchmark": "train_step_per_clipping_strategy",
                "device": "cpu",
                "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "threads": args.threads,
                "backbone": args.backbone,
                "size": args.size,
                "batch": args.batch,
                "rounds": args.rounds,
                "n_variables": len(model.trainable_variables),
                "n_parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
