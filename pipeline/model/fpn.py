"""Feature Pyramid Network (Lin et al. 2017) as in torchvision: lateral 1x1, top-down nearest upsampling,
3x3 output convolutions, and extra coarser levels by stride-2 subsampling (torchvision's LastLevelMaxPool).
"""

from __future__ import annotations

import keras
import tensorflow as tf


class FPN(keras.layers.Layer):
    """Maps backbone features ``[C_min .. C_top]`` (finest first) to ``[P_min .. P_max]``.

    Args:
        channels: output channels of every level.
        num_inputs: number of backbone levels used (``C_min .. C_top``, ``top <= 5``).
        extra_levels: levels above the last backbone level, each a stride-2 subsample of the previous one.
        light_levels: the finest levels that skip the 3x3 output convolution (their output is the merged
            lateral + top-down map): a cheap fine level, e.g. P2 for the box head only, where the 3x3
            convolution would cost as much as the rest of the FPN.
    """

    def __init__(self, channels: int = 256, num_inputs: int = 4, extra_levels: int = 1, light_levels: int = 0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.channels = channels
        self.num_inputs = num_inputs
        self.extra_levels = extra_levels
        self.light_levels = light_levels
        # torchvision initialises FPN convs with kaiming_uniform(a=1) = uniform variance 1/fan_in.
        init = keras.initializers.VarianceScaling(1.0, "fan_in", "uniform")
        # Plain attributes rather than lists: tf.train.Checkpoint does not follow keras' tracked lists.
        for i in range(num_inputs):
            setattr(self, f"lateral_{i}", keras.layers.Conv2D(channels, 1, kernel_initializer=init,
                                                              dtype=self.dtype_policy, name=f"lateral_{i}"))
            if i >= light_levels:
                setattr(self, f"output_{i}", keras.layers.Conv2D(channels, 3, padding="same", kernel_initializer=init,
                                                                 dtype=self.dtype_policy, name=f"output_{i}"))

    def call(self, features: list[tf.Tensor]) -> list[tf.Tensor]:
        laterals = [getattr(self, f"lateral_{i}")(f) for i, f in enumerate(features)]
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            up = tf.repeat(tf.repeat(merged[0], 2, axis=1), 2, axis=2)
            # Inputs are padded to a multiple of 32, so 2x upsampling matches exactly; crop keeps odd sizes safe.
            up = up[:, : lateral.shape[1], : lateral.shape[2]]
            merged.insert(0, lateral + up)
        outs = [m if i < self.light_levels else getattr(self, f"output_{i}")(m) for i, m in enumerate(merged)]
        for _ in range(self.extra_levels):
            outs.append(outs[-1][:, ::2, ::2])
        return outs

    def get_config(self) -> dict:
        return {**super().get_config(), "channels": self.channels, "num_inputs": self.num_inputs,
                "extra_levels": self.extra_levels, "light_levels": self.light_levels}
