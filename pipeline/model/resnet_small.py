"""A half-width ResNet-18 for training from scratch on a CPU (``model.backbone: resnet18_half``).

Basic residual blocks, two per stage, 32 / 64 / 128 / 256 channels at strides 4 / 8 / 16 / 32 (ResNet-18
has 64-512), batch norm after every convolution. The stem is two 3x3 convolutions with stride 2 (16 and 32
channels) instead of the 7x7 convolution and max pool: the "deep stem" of ResNet-C, cheaper at this width
and kinder to 12 px objects. A downsampling block's shortcut is a 3x3 average pool with stride 2 and a 1x1
convolution with batch norm (as ResNet-D), so both branches of a block see the same place: every cell of a
level is centred where ``feature_centre_shift`` says, as with Keras' 'same' padding elsewhere (a strided 1x1
shortcut would sample a pixel up-left of the 3x3 branch's centre).

Why it exists: on one CPU core its forward + backward pass at 4 x 416^2 costs 1.19 s against 1.75 s for
MobileNetV3-Large (docs/model.md, Speed; measured with strided 1x1 shortcuts), because dense 3x3 convolutions run near the CPU's peak while
depthwise ones do not. It has no pretrained weights: random initialisation only.
"""

from __future__ import annotations

import keras

WIDTHS = (32, 64, 128, 256)
BLOCKS_PER_STAGE = 2
STEM_WIDTHS = (16, 32)


def _conv_bn(x, channels: int, kernel: int, strides: int, name: str, momentum: float, relu: bool = True):
    x = keras.layers.Conv2D(channels, kernel, strides=strides, padding="same", use_bias=False,
                            kernel_initializer="he_normal", name=name)(x)
    x = keras.layers.BatchNormalization(momentum=momentum, epsilon=1e-5, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _basic_block(x, channels: int, strides: int, name: str, momentum: float):
    y = _conv_bn(x, channels, 3, strides, f"{name}_a", momentum)
    y = _conv_bn(y, channels, 3, 1, f"{name}_b", momentum, relu=False)
    if strides != 1:  # average 3x3 'same' pooling: centred where the strided 3x3 convolution of the other branch is
        x = keras.layers.AveragePooling2D(3, strides=strides, padding="same", name=f"{name}_pool")(x)
    if strides != 1 or x.shape[-1] != channels:
        x = _conv_bn(x, channels, 1, 1, f"{name}_proj", momentum, relu=False)
    return keras.layers.ReLU(name=f"{name}_out")(keras.layers.Add(name=f"{name}_add")([x, y]))


def resnet18_half(bands: int, bn_momentum: float | None = None) -> keras.Model:
    """``[B, H, W, bands]`` -> ``[C2, C3, C4, C5]``; layers are named ``r18_stem*`` and ``r18_c{2-5}_*``."""
    momentum = 0.9 if bn_momentum is None else float(bn_momentum)
    inputs = keras.Input((None, None, bands))
    x = inputs
    for i, width in enumerate(STEM_WIDTHS):
        x = _conv_bn(x, width, 3, 2, f"r18_stem{i + 1}", momentum)
    outs = []
    for stage, width in enumerate(WIDTHS):
        for block in range(BLOCKS_PER_STAGE):
            strides = 2 if block == 0 and stage > 0 else 1
            x = _basic_block(x, width, strides, f"r18_c{stage + 2}_b{block}", momentum)
        outs.append(x)
    return keras.Model(inputs, outs, name="resnet18_half_backbone")


__all__ = ["resnet18_half"]
