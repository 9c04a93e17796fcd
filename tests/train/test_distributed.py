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
from pipeline.train.loop import make_train_step
from pipeline.train.optim import build_optimizer

opt_cfg = OptimizerConfig(name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=1e-3)
images, targets = synthetic_arrays(16, seed=3)
ds = tf.data.Dataset.from_tensor_slices((images, targets)).batch(8)

def run(strategy, clip_cfg):
    with strategy.scope():
        model = build_model(0)
        opt = build_optimizer(opt_cfg, 0.1)
        step = make_train_step(model, opt, build_clipper(clip_cfg), strategy=strategy)
    data = strategy.experimental_distribute_dataset(ds) if strategy.num_replicas_in_sync > 1 else ds
    outs = []
    for x, y in data:
        out = step(x, y)
        outs.append({k: float(v) for k, v in out.items()})
    return [v.numpy() for v in model.trainable_variables], outs, int(opt.iterations.numpy())

mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert mirrored.num_replicas_in_sync == 2
results = {}
for name in sys.argv[2].split(","):
  clip_cfg = ClipConfig(strategy=name, clip_norm=0.05, agc_lambda=0.001, warmup_steps=1, z_threshold=0.5)
  w2, o2, it2 = run(mirrored, clip_cfg)
  w1, o1, it1 = run(tf.distribute.get_strategy(), clip_cfg)
  results[name] = {
    "max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(w1, w2)),
    "max_weight_change": max(float(np.abs(a).max()) for a in w1),
    "norms": [[a["grad_norm_before"], b["grad_norm_before"]] for a, b in zip(o1, o2)],
    "after": [[a["grad_norm_after"], b["grad_norm_after"]] for a, b in zip(o1, o2)],
    "clipped": [[a["clipped"], b["clipped"]] for a, b in zip(o1, o2)],
    "losses": [[a["loss"], b["loss"]] for a, b in zip(o1, o2)],
    "iterations": [it1, it2],
  }
print(json.dumps(results))
"""


STRATEGIES = ("global_norm", "agc", "zclip")
_run: dict = {}


def start_in_background() -> None:
    """Start the subprocess (once). tests/train/conftest.py calls this as soon as collection finishes, so its
    ~10 s of TensorFlow start-up and tracing overlap the tests that run before this module."""
    if _run:
        return
    here = Path(__file__).parent
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(here.parents[1]))
    # Files, not pipes: nobody reads the output until the fixture runs. The fixture closes them.
    _run["out"], _run["err"] = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115
    _run["proc"] = proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(here), ",".join(STRATEGIES)],
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
