"""Kernel choices for the two ops the detector has two implementations of, and what 'auto' means.

NMS: 'greedy' (the C++ kernel per image, the natural CPU path) or 'padded' (batched pure TF ops).
ROIAlign: 'crop_and_resize' (a fused kernel, fast on CPU) or 'gather' (gather_nd + bilinear weights).
The padded and gather kernels compile with XLA, which TensorFlow turns on by default on a GPU; the
other two have no XLA lowering. Both choices compute the same result (tested).
"""

from __future__ import annotations

import tensorflow as tf

from pipeline.config import ModelConfig

XLA_KERNELS = {"nms_impl": "padded", "roi_align_impl": "gather"}
CPU_KERNELS = {"nms_impl": "greedy", "roi_align_impl": "crop_and_resize"}


def resolve_kernel(option: str, impl: str) -> str:
    """The kernel for model option `option` ('nms_impl' or 'roi_align_impl') set to `impl`: itself, or for
    'auto' the XLA-compatible kernel when a GPU is visible, else the CPU one."""
    if impl != "auto":
        return impl
    return (XLA_KERNELS if tf.config.list_physical_devices("GPU") else CPU_KERNELS)[option]


def with_xla_kernels(model_cfg: ModelConfig) -> ModelConfig:
    """`model_cfg` with its 'auto' kernel choices set to the XLA-compatible kernels, which a jit-compiled
    train step needs on any device (a CPU too)."""
    return model_cfg.model_copy(
        update={k: v for k, v in XLA_KERNELS.items() if getattr(model_cfg, k) == "auto"}
    )
