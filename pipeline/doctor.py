"""`satdet doctor`: what this environment can run — TensorFlow and its GPUs, the CUDA/cuDNN it was built
against, rasterio/GDAL, Prefect — so a user can tell at a glance whether a GPU host or container is usable.

Every probe is independent: a broken or missing library is reported, never raised, so the command works
everywhere (a laptop without a GPU reports "no GPU visible").
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any


def _version(dist: str) -> str | None:
    """Installed version of a distribution, read from metadata (no import, so no heavy side effects)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _tensorflow() -> dict[str, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        from pipeline.tf_quiet import import_tensorflow

        tf = import_tensorflow()
    except Exception as err:  # noqa: BLE001 - ImportError, or a broken CUDA wheel failing at import
        return {"error": f"cannot import tensorflow: {err}"}
    info: dict[str, Any] = {"version": tf.__version__}
    try:
        import keras

        info["keras"] = keras.__version__
    except Exception as err:  # noqa: BLE001 - report, never raise
        info["keras"] = f"error: {err}"
    build = dict(tf.sysconfig.get_build_info())
    info["cuda_build"] = bool(build.get("is_cuda_build", False))
    info["cuda_version"] = build.get("cuda_version")
    info["cudnn_version"] = build.get("cudnn_version")
    gpus = []
    for dev in tf.config.list_physical_devices("GPU"):
        entry: dict[str, Any] = {"name": dev.name}
        try:
            details = tf.config.experimental.get_device_details(dev)
            entry["device"] = details.get("device_name")
            cc = details.get("compute_capability")
            entry["compute_capability"] = ".".join(map(str, cc)) if cc else None
        except Exception:  # noqa: BLE001, S110 - details are best-effort; the device itself is what matters
            pass
        gpus.append(entry)
    info["gpus"] = gpus
    return info


def _rasterio() -> dict[str, Any]:
    try:
        import rasterio
    except Exception as err:  # noqa: BLE001 - report, never raise
        return {"error": f"cannot import rasterio: {err}"}
    return {"version": rasterio.__version__, "gdal": rasterio.__gdal_version__}


def collect() -> dict[str, Any]:
    """Probe the environment; returns a JSON-able dict (never raises for a missing/broken library)."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "tensorflow": _tensorflow(),
        "rasterio": _rasterio(),
        # Prefect is only reported by version: pipeline/ never imports it.
        "prefect": _version("prefect"),
        "prefect_api_url": os.environ.get("PREFECT_API_URL") or None,
        "satdet": _version("satdet"),
    }


def format_report(info: dict[str, Any]) -> str:
    """Human-readable lines for `satdet doctor`."""
    tf_info = info["tensorflow"]
    lines = [f"satdet      {info['satdet'] or 'not installed as a package'}"]
    lines.append(f"python      {info['python']}  ({info['platform']}, {info['cpus']} CPUs)")
    if "error" in tf_info:
        lines.append(f"tensorflow  {tf_info['error']}")
    else:
        lines.append(f"tensorflow  {tf_info['version']}  (keras {tf_info['keras']})")
        if tf_info["cuda_build"]:
            lines.append(f"cuda build  CUDA {tf_info['cuda_version']}, cuDNN {tf_info['cudnn_version']}")
        else:
            lines.append("cuda build  no (CPU-only TensorFlow build)")
        if tf_info["gpus"]:
            for gpu in tf_info["gpus"]:
                extra = ", ".join(
                    str(v) for v in (gpu.get("device"), gpu.get("compute_capability") and f"cc {gpu['compute_capability']}")
                    if v
                )
                lines.append(f"gpu         {gpu['name']}" + (f"  ({extra})" if extra else ""))
        else:
            hint = (
                "check the NVIDIA driver and `docker run --gpus all`"
                if tf_info["cuda_build"]
                else "install satdet[gpu] on a CUDA host to use one"
            )
            lines.append(f"gpu         no GPU visible: training runs on the CPU ({hint})")
    rio = info["rasterio"]
    lines.append(f"rasterio    {rio['error']}" if "error" in rio else f"rasterio    {rio['version']}  (GDAL {rio['gdal']})")
    lines.append(f"prefect     {info['prefect'] or 'not installed'}")
    api = info["prefect_api_url"]
    lines.append(f"prefect api {api if api else 'none set: flows use a temporary local API (no schedules)'}")
    return "\n".join(lines)
