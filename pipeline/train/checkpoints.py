"""Checkpoints: everything a run needs to continue exactly, plus the best weights by validation AP50.

`model_dir/checkpoints/` is a `tf.train.CheckpointManager` directory holding, per checkpoint: the model,
the optimizer (slots, iteration count), the clipping state (autoclip history, zclip EMA), the train-step
counters (skipped steps, clip counts, loss scale), the run state (step, batches consumed = data position,
best AP50, evals without improvement) and the `tf.random.Generator`. TensorFlow writes the data files first
and the `checkpoint` index last (atomically), so a run killed mid-save resumes from the previous one.

`model_dir/best/` holds `model.weights.h5` of the best validation AP50 and `best.json` {step, ap50}.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from pipeline.errors import SatdetError
from pipeline.files import atomic_write_json

_ONE = {"trainable": False, "aggregation": tf.VariableAggregation.ONLY_FIRST_REPLICA}


class RunState(tf.Module):
    """Scalars of the training run that must survive a restart."""

    def __init__(self, seed: int):
        super().__init__(name="run_state")
        self.step = tf.Variable(tf.constant(0, tf.int64), name="step", **_ONE)
        self.data_position = tf.Variable(tf.constant(0, tf.int64), name="data_position", **_ONE)
        self.best_ap50 = tf.Variable(-1.0, name="best_ap50", **_ONE)
        self.evals_since_best = tf.Variable(tf.constant(0, tf.int64), name="evals_since_best", **_ONE)
        # The run's random generator, installed as TF's global generator so code drawing from
        # tf.random.get_global_generator() continues the same stream after a resume.
        self.rng = tf.random.Generator.from_seed(seed)


def make_checkpoint(**objects: Any) -> tf.train.Checkpoint:
    """A checkpoint over the given trackables (model=, optimizer=, clip=, train_step=, state=)."""
    return tf.train.Checkpoint(**{k: v for k, v in objects.items() if v is not None})


def checkpoint_manager(ckpt: tf.train.Checkpoint, model_dir: Path, keep: int) -> tf.train.CheckpointManager:
    return tf.train.CheckpointManager(ckpt, str(Path(model_dir) / "checkpoints"), max_to_keep=keep)


def restore_latest(ckpt: tf.train.Checkpoint, manager: tf.train.CheckpointManager) -> str | None:
    """Restore the newest checkpoint; None if there is none. Mismatches become a one-line SatdetError."""
    latest = manager.latest_checkpoint
    if latest is None:
        return None
    try:
        ckpt.restore(latest).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as err:
        raise SatdetError(
            f"{latest}: checkpoint does not match this model/optimizer/clipping config "
            f"({type(err).__name__}); train without --resume or use the config the run started with"
        ) from None
    return latest


def save_best(model: keras.Model, model_dir: Path, step: int, ap50: float) -> Path:
    """Write the best weights and best.json (each atomically)."""
    best = Path(model_dir) / "best"
    best.mkdir(parents=True, exist_ok=True)
    tmp = best / f".tmp-{os.getpid()}.weights.h5"  # Keras insists on the .weights.h5 suffix
    model.save_weights(str(tmp))
    os.replace(tmp, best / "model.weights.h5")
    atomic_write_json(best / "best.json", {"step": int(step), "ap50": float(ap50)})
    return best


def load_best(model: keras.Model, model_dir: Path) -> bool:
    """Load the best weights into `model` if a best checkpoint exists."""
    path = Path(model_dir) / "best" / "model.weights.h5"
    if not path.exists():
        return False
    model.load_weights(str(path))
    return True
