"""MirroredStrategy over two logical CPUs: the clipper sees the all-reduced gradient, so a distributed
step equals a single-device step on the same global batch. Runs in a subprocess because logical devices
must be configured before TensorFlow initialises."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[1])
from standin import build_model, synthetic_arrays
from pipeline.config import ClipConfig, OptimizerConfig
from pipeline.train.clipping import build_clipper
from pipeline.train.step import TrainStep
from pipeline.train.optim import build_optimizer
from pipeline.train.ema import WeightAverage

opt_cfg = OptimizerConfig(name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=1e-3)
images, targets = synthetic_arrays(16, seed=3)
ds = tf.data.Dataset.from_tensor_slices((images, targets)).batch(8)

def run(strategy, clip_cfg):
    with strategy.scope():
        model = build_model(0)
        opt = build_optimizer(opt_cfg, 0.1)
        step = TrainStep(model, opt, build_clipper(clip_cfg), strategy=strategy)
        ema = WeightAverage(model, 0.5)  # weight averaging, updated after each step as fit does
    data = strategy.experimental_distribute_dataset(ds) if strategy.num_replicas_in_sync > 1 else ds
    outs = []
    for x, y in data:
        out = step(x, y)
        ema.update()
        outs.append({k: float(v) for k, v in out.items()})
    averages = [a.numpy() for a in ema.state.averages]
    return [v.numpy() for v in model.trainable_variables], outs, int(opt.iterations.numpy()), averages

mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert mirrored.num_replicas_in_sync == 2
results = {}
for name in sys.argv[2].split(","):
  clip_cfg = ClipConfig(strategy=name, clip_norm=0.05, agc_lambda=0.001, warmup_steps=1, z_threshold=0.5)
  w2, o2, it2, a2 = run(mirrored, clip_cfg)
  w1, o1, it1, a1 = run(tf.distribute.get_strategy(), clip_cfg)
  results[name] = {
    "max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(w1, w2)),
    "max_weight_change": max(float(np.abs(a).max()) for a in w1),
    "norms": [[a["grad_norm_before"], b["grad_norm_before"]] for a, b in zip(o1, o2)],
    "after": [[a["grad_norm_after"], b["grad_norm_after"]] for a, b in zip(o1, o2)],
    "clipped": [[a["clipped"], b["clipped"]] for a, b in zip(o1, o2)],
    "losses": [[a["loss"], b["loss"]] for a, b in zip(o1, o2)],
    "iterations": [it1, it2],
    "max_average_diff": max(float(np.abs(a - b).max()) for a, b in zip(a1, a2)),
    "averages_differ_from_weights": any(not np.allclose(a, w) for a, w in zip(a1, w1)),
  }

# ---- the real detector (BN backbone): what the clipper sees is the mean of the replicas' gradients, and a
# non-finite step restores every replica's copy of the BN statistics. Sampling takes every anchor and ROI
# candidate, so a replica's gradient is the single-device gradient of its half of the batch.
if sys.argv[3] == "1":
    import keras
    from standin import build_bn_detector, detector_arrays
    from pipeline.model.losses import LOSS_NAMES

    overrides = dict(rpn_batch_per_image=256, roi_batch_per_image=64, roi_positive_fraction=1.0)
    images, targets = detector_arrays(4, 64, seed=2)
    halves = [(tf.constant(images[i * 2:(i + 1) * 2]), {k: tf.constant(v[i * 2:(i + 1) * 2]) for k, v in targets.items()})
              for i in range(2)]
    keras.utils.set_random_seed(0)
    ref = build_bn_detector(**overrides)
    state = [v.numpy() for v in ref.non_trainable_variables]
    grads, losses = [], []
    for x, y in halves:
        for v, s in zip(ref.non_trainable_variables, state):
            v.assign(s)
        with tf.GradientTape() as tape:
            total = tf.add_n(list(ref.compute_losses(x, y, training=True).values()))
        grads.append(tape.gradient(total, ref.trainable_variables))
        losses.append(float(total))
    pairs = [(a, b) for a, b in zip(*grads) if a is not None]
    mean_grad = [(a + b) / 2 for a, b in pairs]
    norm = float(tf.linalg.global_norm(mean_grad))
    lr, clip_norm = 0.1, norm / 4

    with mirrored.scope():
        keras.utils.set_random_seed(0)
        model = build_bn_detector(**overrides)
        opt = build_optimizer(OptimizerConfig(name="sgd", learning_rate=lr, momentum=0.0, weight_decay=0.0), lr)
        step = TrainStep(model, opt, build_clipper(ClipConfig(strategy="global_norm", clip_norm=clip_norm)),
                               strategy=mirrored)
    start = [v.numpy() for v in model.trainable_variables]
    assert all((a == b.numpy()).all() for a, b in zip(start, ref.trainable_variables))

    def distribute(per_replica):
        xs = mirrored.experimental_distribute_values_from_function(lambda ctx: per_replica[ctx.replica_id_in_sync_group][0])
        ys = mirrored.experimental_distribute_values_from_function(lambda ctx: per_replica[ctx.replica_id_in_sync_group][1])
        return xs, ys

    out = step(*distribute(halves))
    with_grad = [i for i, g in enumerate(grads[0]) if g is not None]
    expected = [start[i] - lr * (clip_norm / norm) * g.numpy() for i, g in zip(with_grad, mean_grad)]
    components = lambda v: [c.numpy() for c in v.value.values]  # noqa: E731 - every replica's copy
    detector = {
        "norm": [norm, float(out["grad_norm_before"])],
        "after": [clip_norm, float(out["grad_norm_after"])],
        "loss": [sum(losses) / 2, float(out["loss"])],
        "clipped": bool(out["clipped"]), "skipped": bool(out["skipped"]),
        "iterations": int(opt.iterations.numpy()),
        "max_weight_error": max(float(np.abs(model.trainable_variables[i].numpy() - e).max())
                                for i, e in zip(with_grad, expected)),
        "max_step": max(float(np.abs(model.trainable_variables[i].numpy() - start[i]).max()) for i in with_grad),
        "replicas_agree": all(float(np.abs(c[0] - c[1]).max()) == 0.0
                              for c in map(components, model.trainable_variables)),
    }
    before = [[c.tobytes() for c in components(v)] for v in model.variables]
    bn = [i for i, v in enumerate(model.variables) if "moving_" in v.path]
    poisoned = [halves[0], (tf.tensor_scatter_nd_update(halves[1][0], [[0, 3, 3, 0]], [np.nan]), halves[1][1])]
    out = step(*distribute(poisoned))  # NaN on the second replica only: both skip, both restore
    after = [[c.tobytes() for c in components(v)] for v in model.variables]
    detector.update(
        nan_skipped=bool(out["skipped"]), bn_vars=len(bn),
        changed=[model.variables[i].path for i, (a, b) in enumerate(zip(before, after)) if a != b],
        iterations_after_nan=int(opt.iterations.numpy()),
    )
    out = step(*distribute(halves))
    moved = [[c.tobytes() for c in components(model.variables[i])] for i in bn]
    detector["bn_moved_after"] = sum(m != after[i] for m, i in zip(moved, bn))
    detector["finite_after"] = not bool(out["skipped"])
    results["detector"] = detector
print(json.dumps(results))
"""


STRATEGIES = ("global_norm", "agc", "zclip")
_run: dict = {}


def start_in_background() -> None:
    """Start the subprocess (once). tests/train/conftest.py calls this as soon as collection finishes, so its
    TensorFlow start-up and tracing overlap the tests that run before this module."""
    if _run:
        return
    here = Path(__file__).parent
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(here.parents[1]))
    # Files, not pipes: nobody reads the output until the fixture runs. The fixture closes them.
    _run["out"], _run["err"] = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115
    _run["proc"] = proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(here), ",".join(STRATEGIES), "1"],
        stdout=_run["out"],
        stderr=_run["err"],
        text=True,
        env=env,
    )
    atexit.register(lambda: proc.poll() is None and proc.kill())  # a session that ends before the fixture


@pytest.fixture(scope="module")
def results():
    start_in_background()
    proc = _run["proc"]
    with _run["out"] as out, _run["err"] as err:
        try:
            proc.wait(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
        out.seek(0)
        err.seek(0)
        assert proc.returncode == 0, err.read()[-3000:]
        return json.loads(out.read().strip().splitlines()[-1])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mirrored_step_clips_the_reduced_gradient_like_a_single_device_step(results, strategy):
    res = results[strategy]
    assert res["iterations"] == [2, 2]  # the optimizer applied each step once (no double reduction)
    for single, dist in res["norms"] + res["after"] + res["losses"]:
        assert dist == pytest.approx(single, rel=1e-5)
    if strategy != "zclip":  # zclip only starts clipping after its warmup
        assert all(a for a, _ in res["clipped"])
    assert [a for a, _ in res["clipped"]] == [b for _, b in res["clipped"]]
    assert res["max_weight_diff"] < 1e-6
    # the weight average (train.ema_decay) under the strategy equals the single-device one
    assert res["max_average_diff"] < 1e-6 and res["averages_differ_from_weights"]


def test_real_detector_under_mirrored_strategy_clips_the_all_reduced_gradient(results):
    """The real FasterRCNN (BN backbone) on two replicas, each with half of a batch of 4: the clipper sees
    the mean of the replicas' gradients (each computed here on one device), the optimizer applies the
    clipped mean once, and every replica keeps the same weights."""
    res = results["detector"]
    assert not res["skipped"] and res["clipped"] and res["iterations"] == 1
    for expected, got in (res["norm"], res["after"], res["loss"]):
        assert got == pytest.approx(expected, rel=1e-4)
    assert res["max_weight_error"] < 1e-3 * res["max_step"], res
    assert res["replicas_agree"]


def test_real_detector_under_mirrored_strategy_restores_every_replicas_bn_statistics(results):
    """A NaN pixel in one replica's half: the reduced gradient is non-finite, so both replicas skip, and both
    replicas' copies of every variable (BN moving statistics, sampling seed) are bit-identical to before."""
    res = results["detector"]
    assert res["nan_skipped"] and res["bn_vars"] == 10
    assert res["changed"] == [] and res["iterations_after_nan"] == 1
    assert res["finite_after"] and res["bn_moved_after"] == 10
