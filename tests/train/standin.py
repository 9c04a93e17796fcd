"""Stand-ins with the detector's and dataset's contracts, small enough for fast trainer tests.

`TinyDetector.compute_losses(images, targets, training)` returns the four Faster R-CNN loss names, each
a smooth function of the weights that training can lower; `synthetic_dataset` yields the contract's
(images, {"boxes", "labels", "num_boxes"}) batches, deterministic for a seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from pipeline.config import Config

# The environment of a training process whose losses are compared with another's: one intra-op thread, as
# multi-threaded CPU kernels sum in an order that varies from run to run (test_resume, test_time_budget).
ONE_THREAD_ENV = {"TF_NUM_INTRAOP_THREADS": "1", "OMP_NUM_THREADS": "1"}

SIZE, CHANNELS, MAX_BOXES = 16, 3, 4


class TinyDetector(keras.Model):
    """conv → pool → four small heads, one per loss term; the last Dense plays the 'final classifier'."""

    def __init__(self, noise: float = 0.0, bn: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.noise = noise  # > 0: training inputs get noise from TF's global generator (tests RNG resume)
        self.conv = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")
        # bn: a BatchNormalization (moving statistics written by the forward pass) after the convolution
        self.bn = keras.layers.BatchNormalization(momentum=0.5, name="bn") if bn else None
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.hidden = keras.layers.Dense(8, activation="relu", name="hidden")
        self.box_head = keras.layers.Dense(4, name="box_head")
        self.cls_score = keras.layers.Dense(2, name="cls_score")

    def call(self, images, training=False):
        x = self.conv(images)
        if self.bn is not None:
            x = self.bn(x, training=training)
        h = self.hidden(self.pool(x))
        return {"box": self.box_head(h), "cls": self.cls_score(h)}

    def compute_losses(self, images, targets, training=True):
        if training and self.noise:
            images = images + self.noise * tf.random.get_global_generator().normal(tf.shape(images))
        out = self(images, training=training)
        box, cls = tf.cast(out["box"], tf.float32), tf.cast(out["cls"], tf.float32)
        count = tf.cast(targets["num_boxes"], tf.float32) / MAX_BOXES
        first = targets["boxes"][:, 0, :] / SIZE
        has = tf.cast(targets["num_boxes"] > 0, tf.int32)
        return {
            "rpn_objectness": tf.reduce_mean(tf.square(cls[:, 0] - count)),
            "rpn_box": tf.reduce_mean(tf.abs(box[:, :2] - first[:, :2])),
            "roi_class": tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(has, cls, from_logits=True)
            ),
            "roi_box": tf.reduce_mean(tf.square(box[:, 2:] - first[:, 2:])),
        }

    def agc_exempt_variables(self):
        return list(self.cls_score.trainable_variables)


def build_model(seed: int = 0, noise: float = 0.0, bn: bool = False) -> TinyDetector:
    keras.utils.set_random_seed(seed)
    model = TinyDetector(noise=noise, bn=bn)
    model(tf.zeros([1, SIZE, SIZE, CHANNELS]))
    return model


def synthetic_arrays(n: int = 32, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    num = rng.integers(0, MAX_BOXES + 1, size=n).astype(np.int32)
    boxes = np.zeros((n, MAX_BOXES, 4), np.float32)
    images = rng.normal(size=(n, SIZE, SIZE, CHANNELS)).astype(np.float32) * 0.1
    for i in range(n):
        for j in range(num[i]):
            x0, y0 = rng.uniform(0, SIZE - 6, size=2)
            w, h = rng.uniform(2, 6, size=2)
            boxes[i, j] = [x0, y0, x0 + w, y0 + h]
            images[i, int(y0) : int(y0 + h), int(x0) : int(x0 + w), :] += 1.0  # objects are bright
    labels = (np.arange(MAX_BOXES)[None, :] < num[:, None]).astype(np.int32)
    return images, {"boxes": boxes, "labels": labels, "num_boxes": num}


def synthetic_dataset(batch: int = 4, n: int = 32, seed: int = 0) -> tf.data.Dataset:
    images, targets = synthetic_arrays(n, seed)
    ds = tf.data.Dataset.from_tensor_slices((images, targets))
    return ds.shuffle(n, seed=seed, reshuffle_each_iteration=True).repeat().batch(batch, drop_remainder=True)


def tiny_config(
    steps: int = 20, clip: dict | None = None, learning_rate: float = 0.05, **train: object
) -> Config:
    """A Config whose train block suits the tiny stand-ins (fast, CPU, no XLA)."""
    cfg = Config()
    cfg.train.steps = steps
    cfg.train.log_every = 5
    cfg.train.checkpoint_every = 10
    cfg.train.jit_compile = False
    cfg.train.schedule.warmup_steps = 3
    cfg.train.optimizer.learning_rate = learning_rate
    for key, value in (clip or {}).items():
        setattr(cfg.train.clip, key, value)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg



def _hanging_after(make: Callable[[], tf.data.Dataset], slow_after: int) -> Callable[[int], tf.data.Dataset]:
    """data(start) for fit: the dataset from `start`, whose input hangs from batch `slow_after` on (< 0: never),
    so a test can kill the process in the middle of training."""

    def hang(i):
        if i >= slow_after:
            time.sleep(3600)  # the test may start this process long before it kills it
        return i

    def data(start: int) -> tf.data.Dataset:
        ds = make()
        if slow_after >= 0:
            ds = ds.enumerate().map(lambda i, b: (tf.numpy_function(hang, [i], tf.int64), b)[1])
        return ds.skip(start)

    return data

def resume_run(model_dir: str, resume: bool, slow_after: int = -1) -> list[np.ndarray]:
    """The run of the kill-and-resume test: momentum SGD, cosine LR with warmup, autoclip (stateful) and
    input noise from the checkpointed generator. With slow_after >= 0 the input pipeline hangs from that
    batch on, so a process running it is reliably still alive when it gets killed."""

    from pipeline.train.fit import fit

    cfg = tiny_config(
        steps=20, clip={"strategy": "autoclip", "percentile": 50.0, "warmup_steps": 2}, learning_rate=0.1
    )
    cfg.train.checkpoint_every = 10

    data = _hanging_after(lambda: synthetic_dataset(batch=4, n=24, seed=1), slow_after)

    model = build_model(0, noise=0.05)
    fit(model, data, cfg, model_dir, resume=resume, progress=False)
    weights = [v.numpy() for v in model.trainable_variables]
    np.savez(f"{model_dir}/final.npz", *weights)
    return weights


# ------------------------------------------------------------------ the real detector, small
def detector_config(backbone: str = "tiny", **overrides: object):
    """A FasterRCNN config small enough for CPU trainer tests at 64 px (P3-P5, narrow heads, few samples)."""
    from pipeline.config import ModelConfig

    base = {
        "backbone": backbone, "fpn_channels": 16, "head_dim": 32, "min_level": 3, "max_level": 5,
        "anchor_sizes": [16, 32, 64], "rpn_batch_per_image": 32, "roi_batch_per_image": 16,
        "rpn_pre_nms_top_n_train": 64, "rpn_post_nms_top_n_train": 32, "rpn_pre_nms_top_n_test": 64,
        "rpn_post_nms_top_n_test": 32, "max_detections": 10, "nms_impl": "greedy",
        "roi_align_impl": "crop_and_resize",
    }
    base.update(overrides)
    return ModelConfig(**base)


def detector_arrays(n: int = 8, size: int = 64, seed: int = 0, max_boxes: int = 3):
    """Dark noisy images with bright squares (class 1) or dim ones (class 2) of 12-24 px; padded targets."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.0, 0.1, (n, size, size, CHANNELS)).astype(np.float32)
    boxes = np.zeros((n, max_boxes, 4), np.float32)
    labels = np.zeros((n, max_boxes), np.int32)
    num = rng.integers(1, max_boxes + 1, size=n).astype(np.int32)
    for i in range(n):
        for j in range(num[i]):
            side = rng.uniform(12, 24)
            x0, y0 = rng.uniform(0, size - side, size=2)
            cls = int(rng.integers(1, 3))
            boxes[i, j], labels[i, j] = [x0, y0, x0 + side, y0 + side], cls
            images[i, int(y0) : int(y0 + side), int(x0) : int(x0 + side), :] += 2.0 if cls == 1 else 1.0
    return images, {"boxes": boxes, "labels": labels, "num_boxes": num}


def detector_dataset(batch: int = 2, n: int = 8, seed: int = 0, size: int = 64) -> tf.data.Dataset:
    images, targets = detector_arrays(n, size, seed)
    ds = tf.data.Dataset.from_tensor_slices((images, targets))
    return ds.shuffle(n, seed=seed, reshuffle_each_iteration=True).repeat().batch(batch, drop_remainder=True)


def tiny_bn_backbone(name: str, bands: int, *args: object, **kwargs: object) -> keras.Model:
    """The tiny backbone's shape (C2-C5 at strides 4-32) with a BatchNormalization after every convolution
    (momentum 0.9): what a from-scratch MobileNetV3 does with its statistics, at a fraction of the cost.
    Same signature as pipeline.model.backbone.build_backbone, whose place it takes in `build_bn_detector`."""
    inputs = keras.Input((None, None, bands))

    def conv_bn(x, ch, stride, name):
        x = keras.layers.Conv2D(ch, 3, strides=stride, padding="same", use_bias=False, name=name)(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
        return keras.layers.Activation("relu")(x)

    x = conv_bn(inputs, 8, 2, "bn_stem")
    outs = []
    for i, ch in enumerate((16, 16, 32, 32)):
        x = conv_bn(x, ch, 2, f"bn_c{i + 2}")
        outs.append(x)
    return keras.Model(inputs, outs, name="tiny_bn_backbone")


def build_bn_detector(num_classes: int = 2, bands: int = CHANNELS, **overrides: object):
    """The real FasterRCNN (detector_config) on `tiny_bn_backbone`."""
    from unittest import mock

    from pipeline.model import detector

    with mock.patch.object(detector, "build_backbone", tiny_bn_backbone):
        return detector.build_detector(detector_config("tiny", **overrides), num_classes, bands)


def detector_resume_run(model_dir: str, resume: bool, slow_after: int = -1) -> list[np.ndarray]:
    """`resume_run` with the real FasterRCNN (tiny backbone, 64 px): 8 steps of momentum SGD with warmup
    and cosine decay, autoclip, checkpoints at steps 4 and 8. Its sampling RNG is a model variable (the
    seed generator), so a resumed run draws the same anchors and ROIs as an uninterrupted one."""

    from pipeline.model.detector import build_detector
    from pipeline.train.fit import fit

    cfg = tiny_config(
        steps=8, clip={"strategy": "autoclip", "percentile": 50.0, "warmup_steps": 2}, learning_rate=0.02
    )
    cfg.train.log_every, cfg.train.checkpoint_every, cfg.train.schedule.warmup_steps = 2, 4, 2
    cfg.model = detector_config("tiny")
    cfg.classes = ["bright", "dim"]

    data = _hanging_after(lambda: detector_dataset(batch=2, n=8, seed=1), slow_after)

    keras.utils.set_random_seed(0)
    model = build_detector(cfg.model, len(cfg.classes), CHANNELS)
    fit(model, data, cfg, model_dir, resume=resume, progress=False)
    weights = [v.numpy() for v in model.trainable_variables]
    np.savez(f"{model_dir}/final.npz", *weights)
    return weights
