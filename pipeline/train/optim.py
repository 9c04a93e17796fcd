"""Optimizers from the `train.optimizer` block (SGD+momentum, Adam, AdamW) with decoupled weight decay.

Keras 3 applies weight decay decoupled from the gradient for every optimizer (w ← w − lr·wd·w before the
update), so clipping never touches it. Biases and normalisation parameters (γ, β) are excluded from decay,
as is standard for detectors. No Keras clipping arguments are set: clipping happens in the train step
after the cross-replica reduction (Keras' clipnorm/global_clipnorm act per replica).
"""

from __future__ import annotations

import keras

from pipeline.config import OptimizerConfig
from pipeline.train.schedule import WarmupSchedule

# Matched against Keras variable names (re.search): Dense/Conv bias, BatchNorm/LayerNorm gamma and beta.
NO_DECAY_NAMES = ("bias", "gamma", "beta")


def build_optimizer(
    cfg: OptimizerConfig, learning_rate: WarmupSchedule | float
) -> keras.optimizers.Optimizer:
    """A Keras optimizer for `cfg` driven by `learning_rate` (a schedule or a float)."""
    wd = cfg.weight_decay or None
    if cfg.name == "sgd":
        opt = keras.optimizers.SGD(learning_rate, momentum=cfg.momentum, weight_decay=wd)
    elif cfg.name == "adam":
        opt = keras.optimizers.Adam(learning_rate, weight_decay=wd)
    elif cfg.name == "adamw":
        opt = keras.optimizers.AdamW(learning_rate, weight_decay=cfg.weight_decay)
    else:  # pragma: no cover - pydantic restricts the names
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    if wd:
        opt.exclude_from_weight_decay(var_names=list(NO_DECAY_NAMES))
    return opt
