"""Checkpoints: everything a run needs to continue exactly, plus the best weights by validation AP50.

`model_dir/checkpoints/` is a `tf.train.CheckpointManager` directory holding, per checkpoint: the model,
the optimizer (slots, iteration count), the clipping state (autoclip history, zclip EMA), the train-step
counters (skipped steps, clip counts, loss scale), the run state (step, batches consumed = data position,
best AP50, evals without improvement) and the `tf.random.Generator`. TensorFlow writes the data files first
and the `checkpoint` index last (atomically), so a run killed mid-save resumes from the previous one.

`model_dir/best/` holds `model.weights.h5` of the best validation AP50 and `best.json` {step, ap50}.

`model_dir/checkpoints/fingerprint.json` holds the settings the checkpoints depend on (`config_fingerprint`),
written when a run starts; `--resume` compares it with the current settings before restoring
(`check_fingerprint`), so a different model, optimizer, clipping strategy, class list or tile layout is
named in a one-line error instead of surfacing as an opaque restore mismatch (or not at all).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from pipeline.errors import SatdetError
from pipeline.files import atomic_write_json
from pipeline.train.variables import state_variable

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
# model settings a resumed run may change: inference-only settings, kernel choices that compute the same
# thing, and the sampling seed (its state is restored from the checkpoint).
HARMLESS_MODEL_KEYS = frozenset({
    "score_threshold", "nms_iou", "max_detections", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
    "nms_impl", "roi_align_impl", "seed",
})
_STATS_KEYS = ("tile_size", "channels", "bands", "dtype")  # the tile layout, from tiles/stats.json
_MISSING = object()


class RunState(tf.Module):
    """Scalars of the training run that must survive a restart."""

    def __init__(self, seed: int):
        super().__init__(name="run_state")
        self.step = state_variable(tf.constant(0, tf.int64), "step")
        self.data_position = state_variable(tf.constant(0, tf.int64), "data_position")
        self.best_ap50 = state_variable(-1.0, "best_ap50")
        self.evals_since_best = state_variable(tf.constant(0, tf.int64), "evals_since_best")
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


# ------------------------------------------------------------------------------------------ fingerprint
def config_fingerprint(config: Any, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings a run's checkpoints depend on, as a flat {dotted name: value} dict (JSON values).

    The `model` section except `HARMLESS_MODEL_KEYS`, the optimizer (`train.optimizer.name`), the clipping
    strategy (and autoclip's history length, the shape of its saved state), whether weights are averaged, the class list and, from
    tiles/stats.json, tile size, channels, band list and dtype. `train.steps`, learning rates, clip
    thresholds and the schedule may change on resume and are left out.
    """
    model = config.model.model_dump(mode="json")
    fp: dict[str, Any] = {f"model.{k}": v for k, v in model.items() if k not in HARMLESS_MODEL_KEYS}
    if not model["roi_align_shift"]:  # the default, and the behaviour before the option: older runs match
        del fp["model.roi_align_shift"]
    fp["train.optimizer.name"] = config.train.optimizer.name
    fp["train.clip.strategy"] = config.train.clip.strategy
    if config.train.ema_decay > 0:  # the checkpoints hold a weight average (absent: fingerprints of older runs match)
        fp["train.ema"] = True
    if config.train.clip.strategy == "autoclip":
        fp["train.clip.history"] = config.train.clip.history
    fp["classes"] = list(config.classes)
    for key in _STATS_KEYS:
        if stats is not None and key in stats:
            fp[f"tiles.{key}"] = stats[key]
    return json.loads(json.dumps(fp))  # as it reads back from the file (tuples become lists)


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'name: old -> new' for every setting that differs, including ones only one side has."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a is _MISSING or b is _MISSING or a != b:
            changes.append(f"{key}: {_show(a)} -> {_show(b)}")
    return changes


def _show(value: Any) -> str:
    return "(unset)" if value is _MISSING else json.dumps(value)


def check_fingerprint(model_dir: Path, fingerprint: dict[str, Any], resuming: bool) -> None:
    """Write `fingerprint` beside the checkpoints; when `resuming` (a checkpoint will be restored), first
    compare it with the stored one and raise a one-line SatdetError naming every differing setting
    (old -> new). A run written before fingerprints existed resumes with a warning (and gets one)."""
    path = Path(model_dir) / "checkpoints" / FINGERPRINT_FILE
    if resuming:
        if not path.is_file():
            log.warning("%s: not found (a run from before checkpoint fingerprints); resuming without "
                        "checking that the settings match the checkpoint's", path)
        else:
            try:
                old = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as err:
                old = f"unreadable ({type(err).__name__})"
            if not isinstance(old, dict):
                raise SatdetError(f"{path}: {old if isinstance(old, str) else 'not a JSON object'}; delete it "
                                  "to resume without the settings check")
            changes = fingerprint_changes(old, fingerprint)
            if changes:
                raise SatdetError(
                    f"{path.parent}: the checkpoints were written with other settings ({'; '.join(changes)}); "
                    "resume with the settings the run started with, or train without --resume in a new run folder"
                )
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, fingerprint)
