"""Feature extractors: ResNet50, MobileNetV3-Large and MobileNetV3-Small from keras.applications, a half-width
ResNet-18 for training from scratch (resnet_small.py), and a tiny CNN for tests.

Every backbone is a functional ``keras.Model`` mapping ``[B, H, W, bands]`` (H, W multiples of 32) to the
list ``[C2, C3, C4, C5]`` of feature maps at strides 4, 8, 16 and 32. Weights are ``'none'`` (random),
``'imagenet'`` (keras downloads them once into ``$KERAS_HOME/models``; needs network) or a path to a keras
weights file of the 3-band application (``include_top=False``).

Pretrained backbones (weights not ``'none'``) differ from random ones in three ways (see docs/model.md):

- a ``PretrainedInput`` layer maps the pipeline's normalised bands back to the 0-255 percentile stretch
  and on to the convention the ImageNet weights were trained with (ResNet50: BGR minus the ImageNet mean;
  MobileNetV3: ``v / 127.5 - 1``), unless ``pretrained_input=False``;
- with ``bands != 3`` the first convolution is adapted: its RGB kernel is averaged over the input
  channels and repeated for every band (scaled by 3 / bands so activations keep their magnitude); all
  other weights are copied;
- batch norm is frozen (inference statistics, no trainable gamma/beta) unless ``freeze_bn=False``.

Random backbones keep the plain structure (no input layer, trainable batch norm) unless asked otherwise.
``freeze_stages`` makes the stem and the first N stages non-trainable for any backbone.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipeline.errors import SatdetError
from pipeline.model.resnet_small import resnet18_half

BACKBONES = ("mobilenet_v3_large", "mobilenet_v3_small", "resnet50", "resnet18_half", "tiny")
# Backbones with no pretrained weights: built with random weights only.
FROM_SCRATCH_ONLY = ("resnet18_half", "tiny")
NUM_STAGES = 4  # stages at strides 4, 8, 16, 32 after the stem
# MobileNetV3 variants: the keras.applications class; its taps, the strided depthwise blocks whose padding
# layers' *input* is the last (expanded) activation at strides 4, 8 and 16 (Large: 72/240/672 channels,
# Small: 72/96/288; the model output is stride 32); and the first block of each stage (the blocks with
# stride 2). Large: the stem conv and block 0 run at stride 2, blocks 1, 3, 6, 12 start the stages. Small:
# block 0 itself has stride 2.
_MOBILENETS = {
    "mobilenet_v3_large": ("MobileNetV3Large", ("expanded_conv_3_depthwise_pad", "expanded_conv_6_depthwise_pad",
                                                "expanded_conv_12_depthwise_pad"), (1, 3, 6, 12)),
    "mobilenet_v3_small": ("MobileNetV3Small", ("expanded_conv_1_depthwise_pad", "expanded_conv_3_depthwise_pad",
                                                "expanded_conv_8_depthwise_pad"), (0, 1, 3, 8)),
}
# Where a level-l cell is centred: half a pixel per stride-2 layer, in the resolution that layer reads, so
# 0.5 * (2**l - 1) px in image pixels. Keras' 'same' padding (tiny) and the applications' correct_pad
# (MobileNetV3) put the extra pixel of a stride-2 convolution after the input: cells look right of / below
# the nominal (i + 0.5) * 2**l (+). ResNet-50's symmetric zero padding and strided 1x1 convolutions: left/above (-).
_CENTRE_SHIFT_SIGN = {"mobilenet_v3_large": 1.0, "mobilenet_v3_small": 1.0, "tiny": 1.0, "resnet18_half": 1.0,
                      "resnet50": -1.0}
_RESNET_TAPS = ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out")
# ImageNet RGB mean/std as fractions of 255 (torchvision), and keras' 'caffe' mean in RGB order.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)
WEIGHT_FILES = {
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "mobilenet_v3_large": "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
    "mobilenet_v3_small": "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
}


def is_pretrained(weights: str | None) -> bool:
    """True unless ``weights`` is 'none' (or empty)."""
    return weights not in (None, "", "none")


def feature_centre_shift(name: str, level: int) -> float:
    """Pixels by which the cells of backbone level `level` (stride 2**level) are centred right of and below
    the nominal ``(i + 0.5) * 2**level`` (negative: left of / above); the FPN level of the same stride follows
    its lateral input. Measured in tests/model/test_feature_centres.py."""
    return _CENTRE_SHIFT_SIGN[name] * 0.5 * (2.0**level - 1.0)


def _per_band(values: Sequence[float], bands: int) -> np.ndarray:
    """The first 3 values for the first 3 bands, their mean for any other band (and for all of 1-2 bands)."""
    if bands < 3:
        return np.full(bands, np.mean(values), np.float64)
    return np.array([*values, *([np.mean(values)] * (bands - 3))], np.float64)


def input_affine(
    name: str, bands: int, stats: dict[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Per-band ``scale``, ``offset`` and output band ``order`` of the pretrained input mapping.

    ``y = (x * scale + offset)[..., order]`` takes ``x = (clip(raw, low, high) - mean) / std`` (the
    pipeline's normalisation with ``stats``) to ``v = 255 * (clip(raw, low, high) - low) / (high - low)``
    and then to the weights' convention: ResNet50 ('caffe') BGR order minus the ImageNet mean, MobileNetV3
    ``v / 127.5 - 1``. Without ``stats`` the inputs are read as z-scores and land on ImageNet's per-channel
    mean and std (the torchvision normalisation). Bands past the third use the mean of the three RGB
    constants; with 1-2 bands every band does.
    """
    if stats is None:
        mean_frac, std_frac = _per_band(_IMAGENET_MEAN, bands), _per_band(_IMAGENET_STD, bands)
        # z-scores (mean 0, std 1) whose stretch [low, high] maps mean -> ImageNet mean, std -> ImageNet std
        low, high = -mean_frac / std_frac, (1 - mean_frac) / std_frac
        mean, std = np.zeros(bands), np.ones(bands)
    else:
        low, high, mean, std = (np.asarray(stats[k], np.float64).reshape(-1) for k in ("low", "high", "mean", "std"))
        if not all(len(v) == bands for v in (low, high, mean, std)):
            raise SatdetError(f"stats.json has {len(mean)} bands but the backbone has {bands}; re-run tiling")
        std = np.where(std > 0, std, 1.0)  # as pipeline.data.stats.normalize
    span = np.where(high > low, high - low, 1.0)
    scale, offset = 255.0 * std / span, 255.0 * (mean - low) / span  # x_norm -> v in 0..255
    order = list(range(bands))
    if name == "resnet50":
        offset = offset - _per_band(_CAFFE_MEAN_RGB, bands)
        if bands >= 3:
            order[0], order[2] = 2, 0  # RGB -> BGR
    else:
        scale, offset = scale / 127.5, offset / 127.5 - 1.0
    return scale.astype(np.float32), offset.astype(np.float32), order


def _constant(values: Sequence[float]) -> keras.initializers.Initializer:
    return keras.initializers.Constant(np.asarray(values, np.float32))


@keras.saving.register_keras_serializable(package="satdet")
class PretrainedInput(keras.layers.Layer):
    """``y = (x * scale + offset)[..., order]`` in float32; scale and offset are non-trainable weights, so
    checkpoints and saved weights carry the normalisation stats the model was built with."""

    def __init__(self, scale: Sequence[float], offset: Sequence[float], order: Sequence[int], **kwargs: Any) -> None:
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.order = [int(i) for i in order]
        n = len(self.order)
        self.scale = self.add_weight((n,), initializer=_constant(scale), trainable=False, name="scale")
        self.offset = self.add_weight((n,), initializer=_constant(offset), trainable=False, name="offset")

    def call(self, x: Any) -> Any:
        y = x * self.scale + self.offset
        return y if self.order == sorted(self.order) else keras.ops.take(y, self.order, axis=-1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "scale": self.scale.numpy().tolist(),
                "offset": self.offset.numpy().tolist(), "order": self.order}


def _application(name: str, bands: int, weights: str | None, input_tensor: Any = None) -> keras.Model:
    shape = (None, None, bands)
    if name in _MOBILENETS:
        # include_preprocessing=False: its x / 127.5 - 1 is folded into PretrainedInput for pretrained weights.
        app = getattr(keras.applications, _MOBILENETS[name][0])
        return app(input_shape=shape, include_top=False, weights=weights, include_preprocessing=False,
                   input_tensor=input_tensor)
    return keras.applications.ResNet50(input_shape=shape, include_top=False, weights=weights,
                                       input_tensor=input_tensor)


def _taps(name: str, app: keras.Model) -> list:
    if name in _MOBILENETS:
        return [app.get_layer(n).input for n in _MOBILENETS[name][1]] + [app.output]
    return [app.get_layer(n).output for n in _RESNET_TAPS]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{err.__class__.__name__}: {text[0][:120] if text else ''}"


def _pretrained_source(name: str, weights: str) -> keras.Model:
    """The 3-band application with ``weights`` loaded; a missing or unreadable file is a one-line SatdetError."""
    if weights == "imagenet":
        try:
            return _application(name, 3, "imagenet")
        except Exception as err:  # noqa: BLE001 - keras raises a bare Exception when the download fails
            raise SatdetError(
                f"model.weights='imagenet': cannot get the {name} ImageNet weights ({_first_line(err)}); offline, "
                f"put {WEIGHT_FILES[name]} in $KERAS_HOME/models or set model.weights to its path"
            ) from None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise SatdetError(
            f"{path}: backbone weights file not found; set model.weights to 'none', 'imagenet' or an existing file"
        )
    with warnings.catch_warnings(record=True) as caught:  # a failed load warns per layer first: drop those
        warnings.simplefilter("always")
        try:
            app = _application(name, 3, str(path))
        except Exception as err:  # noqa: BLE001 - h5py/keras raise OSError, ValueError, KeyError, TypeError...
            raise SatdetError(
                f"{path}: not a {name} weights file ({_first_line(err)}); set model.weights to a keras "
                f"{name} include_top=False .h5 file (e.g. {WEIGHT_FILES[name]}), 'imagenet' or 'none'"
            ) from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return app


def _copy_adapting_first_conv(source: keras.Model, target: keras.Model, bands: int) -> None:
    """Copy weights layer by layer (same architecture, in order); adapt the kernel that reads the input bands."""
    src_layers = [layer for layer in source.layers if layer.weights]
    dst_layers = [layer for layer in target.layers if layer.weights and not isinstance(layer, PretrainedInput)]
    if len(src_layers) != len(dst_layers):
        raise SatdetError(f"{source.name}: {len(src_layers)} weighted layers, the backbone has {len(dst_layers)}")
    for src, dst in zip(src_layers, dst_layers):
        values = src.get_weights()
        kernel, shape = values[0], dst.get_weights()[0].shape
        if kernel.shape != shape:
            if not (kernel.ndim == 4 and kernel.shape[2] == 3 and shape[2] == bands):
                raise SatdetError(f"{src.name}: weights of shape {kernel.shape} do not fit {shape}")
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


def stage_of(name: str, layer_name: str) -> int | None:
    """0 for the stem, 1-4 for the stages at strides 4-32, None for layers in neither (input, preprocessing).

    ResNet50: conv1 + pool1 | conv2_x | conv3_x | conv4_x | conv5_x. MobileNetV3-Large: conv + block 0
    (stride 2) | blocks 1-2 | 3-5 | 6-11 | 12-14 + conv_1; MobileNetV3-Small: conv | block 0 | 1-2 | 3-7 |
    8-10 + conv_1, i.e. expanded_conv blocks grouped by output stride.
    """
    if name == "resnet50":
        match = re.match(r"(?:conv|pool)(\d)_", layer_name)
        return int(match.group(1)) - 1 if match else None
    if name in _MOBILENETS:
        if layer_name in ("conv", "conv_bn"):
            return 0
        if layer_name.startswith("conv_1"):
            return NUM_STAGES
        match = re.match(r"expanded_conv_(\d+)_", layer_name)
        block = int(match.group(1)) if match else 0 if layer_name.startswith("expanded_conv_") else None
        if block is None:  # block 0 has no index in its layer names
            return None
        return sum(block >= start for start in _MOBILENETS[name][2])
    match = re.match(r"(?:tiny|r18)_(?:stem|c(\d))", layer_name)
    return (int(match.group(1)) - 1 if match.group(1) else 0) if match else None


def _freeze(name: str, model: keras.Model, freeze_bn: bool, freeze_stages: int) -> None:
    for layer in model.layers:
        if freeze_bn and isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False  # keras 3: a non-trainable BN also runs in inference mode
        stage = stage_of(name, layer.name)
        if freeze_stages > 0 and layer.weights and stage is not None and stage <= freeze_stages:
            layer.trainable = False  # the stem (stage 0) and stages 1..freeze_stages


def build_backbone(
    name: str,
    bands: int,
    weights: str = "none",
    bn_momentum: float | None = None,
    *,
    freeze_bn: bool | None = None,
    freeze_stages: int = 0,
    stats: dict[str, Any] | None = None,
    pretrained_input: bool | None = None,
) -> keras.Model:
    """Build a backbone returning ``[C2, C3, C4, C5]`` (strides 4, 8, 16, 32) for ``bands`` input channels.

    ``bn_momentum`` replaces the batch-norm moving-average momentum of the application (Keras: 0.999 for
    MobileNetV3, 0.99 for ResNet50). At 0.999 the inference statistics still hold ~55% of their initial
    values after 600 steps, so a short from-scratch run detects nothing at inference while its training
    loss looks fine; 0.9 tracks the data within ~50 steps. None keeps the application's value.
    ``freeze_bn`` (None: frozen exactly when pretrained) runs every batch norm in inference mode with
    non-trainable gamma/beta; ``freeze_stages`` N > 0 makes the stem and the first N stages non-trainable.
    ``pretrained_input`` (None: exactly when pretrained) puts a ``PretrainedInput`` layer in front, its
    mapping (``input_affine``) from ``stats`` (tiles/stats.json: low, high, mean, std per band). True with
    random weights builds the structure of a pretrained backbone for ``load_weights`` to fill in.
    Call it under the desired keras dtype policy: the layers take the global policy at construction.
    """
    if name not in BACKBONES:
        raise SatdetError(f"model.backbone={name!r}: unknown; choose one of {', '.join(BACKBONES)}")
    if not 0 <= freeze_stages <= NUM_STAGES:
        raise SatdetError(f"model.freeze_stages={freeze_stages}: must be 0..{NUM_STAGES}")
    pretrained = is_pretrained(weights)
    freeze_bn = pretrained if freeze_bn is None else freeze_bn
    pretrained_input = pretrained if pretrained_input is None else pretrained_input
    if name in FROM_SCRATCH_ONLY and pretrained:
        raise SatdetError(f"model.weights={weights!r}: {name} has no pretrained weights; set model.weights: none")
    if name == "tiny":
        model = _tiny(bands)
    elif name == "resnet18_half":
        model = resnet18_half(bands, bn_momentum)
    else:
        source = _pretrained_source(name, weights) if pretrained else None  # a bad file fails first
        if pretrained_input:
            inputs = keras.Input((None, None, bands))
            scaled = PretrainedInput(*input_affine(name, bands, stats), name="pretrained_input")(inputs)
            app = _application(name, bands, None, input_tensor=scaled)
        else:
            app = _application(name, bands, None)
            inputs = app.input
        if source is not None:
            _copy_adapting_first_conv(source, app, bands)
        if bn_momentum is not None:
            for layer in app.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.momentum = float(bn_momentum)
        model = keras.Model(inputs, _taps(name, app), name=f"{name}_backbone")
    _freeze(name, model, freeze_bn, freeze_stages)
    return model
