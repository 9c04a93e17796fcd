"""Feature extractors: ResNet50 and MobileNetV3-Large from keras.applications, and a tiny CNN for tests.

Every backbone is a functional ``keras.Model`` mapping ``[B, H, W, bands]`` (H, W multiples of 32) to the
list ``[C2, C3, C4, C5]`` of feature maps at strides 4, 8, 16 and 32. Weights are ``'none'`` (random),
``'imagenet'`` (keras downloads them; needs network) or a path to a keras weights file of the 3-band
application (``include_top=False``). With ``bands != 3`` the network is built for ``bands`` inputs and the
pretrained first convolution is adapted: its RGB kernel is averaged over the input channels and repeated
for every band (scaled by 3 / bands so activations keep their magnitude); all other weights are copied.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from pipeline.errors import SatdetError

BACKBONES = ("mobilenet_v3_large", "resnet50", "tiny")
# Strided depthwise blocks of MobileNetV3-Large: the *input* of each of these padding layers is the last
# (expanded, 72/240/672-channel) activation at strides 4, 8 and 16; the model output is stride 32.
_MOBILENET_TAPS = ("expanded_conv_3_depthwise_pad", "expanded_conv_6_depthwise_pad", "expanded_conv_12_depthwise_pad")
_RESNET_TAPS = ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out")


def _application(name: str, bands: int, weights: str | None) -> keras.Model:
    shape = (None, None, bands)
    if name == "mobilenet_v3_large":
        # include_preprocessing=False: images arrive already normalised by pipeline.data.stats.normalize.
        return keras.applications.MobileNetV3Large(
            input_shape=shape, include_top=False, weights=weights, include_preprocessing=False
        )
    return keras.applications.ResNet50(input_shape=shape, include_top=False, weights=weights)


def _taps(name: str, app: keras.Model) -> list:
    if name == "mobilenet_v3_large":
        return [app.get_layer(n).input for n in _MOBILENET_TAPS] + [app.output]
    return [app.get_layer(n).output for n in _RESNET_TAPS]


def _pretrained_source(name: str, weights: str) -> keras.Model:
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise SatdetError(
                f"{path}: backbone weights file not found; set model.weights to 'none', 'imagenet' or an existing file"
            )
        weights = str(path)
    try:
        return _application(name, 3, weights)
    except (OSError, ValueError) as err:
        raise SatdetError(
            f"model.weights={weights!r}: cannot load {name} weights ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0][:120]}); use 'none', or a local {name} include_top=False weights file"
        ) from None


def _copy_adapting_first_conv(source: keras.Model, target: keras.Model, bands: int) -> None:
    """Copy weights layer by layer (same architecture); adapt the kernel that reads the 3 input bands."""
    for src, dst in zip(source.layers, target.layers):
        values = src.get_weights()
        if not values:
            continue
        kernel = values[0]
        if kernel.ndim == 4 and kernel.shape[2] == 3 and dst.get_weights()[0].shape[2] == bands:
            mean = kernel.mean(axis=2, keepdims=True)
            values[0] = np.repeat(mean, bands, axis=2) * (3.0 / bands)
        dst.set_weights(values)


def _tiny(bands: int) -> keras.Model:
    """A few plain convolutions (no batch norm, so train and inference behave alike) at strides 4..32."""
    inputs = keras.Input((None, None, bands))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="tiny_stem")(inputs)
    outs = []
    for i, ch in enumerate((32, 64, 96, 128)):
        x = keras.layers.Conv2D(ch, 3, strides=2, padding="same", activation="relu", name=f"tiny_c{i + 2}_down")(x)
        x = keras.layers.Conv2D(ch, 3, padding="same", activation="relu", name=f"tiny_c{i + 2}")(x)
        outs.append(x)
    return keras.Model(inputs, outs, name="tiny_backbone")


def build_backbone(name: str, bands: int, weights: str = "none", bn_momentum: float | None = None) -> keras.Model:
    """Build a backbone returning ``[C2, C3, C4, C5]`` (strides 4, 8, 16, 32) for ``bands`` input channels.

    ``bn_momentum`` replaces the batch-norm moving-average momentum of the application (Keras: 0.999 for
    MobileNetV3, 0.99 for ResNet50). At 0.999 the inference statistics still hold ~55% of their initial
    values after 600 steps, so a short from-scratch run detects nothing at inference while its training
    loss looks fine; 0.9 tracks the data within ~50 steps. None keeps the application's value.
    Call it under the desired keras dtype policy: the layers take the global policy at construction.
    """
    if name not in BACKBONES:
        raise SatdetError(f"model.backbone={name!r}: unknown; choose one of {', '.join(BACKBONES)}")
    if name == "tiny":
        return _tiny(bands)
    pretrained = weights not in (None, "", "none")
    if pretrained and bands == 3:
        app = _pretrained_source(name, weights)
    else:
        app = _application(name, bands, None)
        if pretrained:
            _copy_adapting_first_conv(_pretrained_source(name, weights), app, bands)
    if bn_momentum is not None:
        for layer in app.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = float(bn_momentum)
    return keras.Model(app.input, _taps(name, app), name=f"{name}_backbone")
