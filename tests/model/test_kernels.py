"""pipeline/model/kernels.py: what 'auto' resolves to, and the XLA kernels a jit-compiled step needs."""

import tensorflow as tf

from pipeline.config import ModelConfig
from pipeline.model.kernels import CPU_KERNELS, XLA_KERNELS, resolve_kernel, with_xla_kernels


def test_an_explicit_kernel_is_kept():
    assert resolve_kernel("nms_impl", "padded") == "padded"
    assert resolve_kernel("roi_align_impl", "crop_and_resize") == "crop_and_resize"


def test_auto_is_the_xla_kernel_with_a_gpu_and_the_cpu_kernel_without():
    kernels = XLA_KERNELS if tf.config.list_physical_devices("GPU") else CPU_KERNELS
    assert resolve_kernel("nms_impl", "auto") == kernels["nms_impl"]
    assert resolve_kernel("roi_align_impl", "auto") == kernels["roi_align_impl"]


def test_xla_kernels_replace_auto_only():
    cfg = with_xla_kernels(ModelConfig(nms_impl="auto", roi_align_impl="crop_and_resize"))
    assert (cfg.nms_impl, cfg.roi_align_impl) == ("padded", "crop_and_resize")
