# satdet GPU image: slim Python + TensorFlow with CUDA/cuDNN from pip wheels (tensorflow[and-cuda]).
# The host needs only the NVIDIA driver and the NVIDIA Container Toolkit; rasterio's wheels bundle GDAL,
# so no system GDAL is installed. Build:  docker build -t satdet:0.1.0 .
# Run:    docker run --rm --gpus all -v "$PWD":/work satdet:0.1.0 run configs/gpu-r50.yaml
# See docs/container.md.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------------------------- builder
# Everything that compiles or downloads lives here; only the finished virtualenv is copied out.
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Metadata first so a code-only change does not invalidate the layer cache of the big dependency install.
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY flows ./flows
# A non-editable install: the runtime image gets `pipeline` and `flows` inside the venv, no source tree.
RUN pip install --no-cache-dir --prefer-binary "./[gpu]" \
    && satdet --version

# ---------------------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

ARG SATDET_VERSION=0.1.0
ARG SATDET_UID=1000

LABEL org.opencontainers.image.title="satdet" \
      org.opencontainers.image.description="Object detection on georeferenced imagery: tiling, Faster R-CNN training with gradient clipping, evaluation and scene prediction, orchestrated by Prefect." \
      org.opencontainers.image.version="${SATDET_VERSION}" \
      org.opencontainers.image.source="https://github.com/satdet/satdet" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# A fixed, unprivileged user; `docker run --user "$(id -u):$(id -g)"` works too because nothing below
# depends on HOME being writable (Prefect, Keras and Matplotlib state is pointed at /work or /tmp).
RUN useradd --create-home --uid "${SATDET_UID}" --shell /usr/sbin/nologin satdet \
    && mkdir -p /work/.prefect \
    && chown -R satdet:satdet /work

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=1 \
    PREFECT_HOME=/work/.prefect \
    KERAS_HOME=/work/.keras \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# /work is where users mount their project (configs, data, runs). No VOLUME instruction on purpose:
# an image-declared volume under /work would shadow the user's bind mount of "$PWD":/work.
# /work/.prefect exists (owned by satdet) so a named volume mounted there starts out writable.
WORKDIR /work
USER ${SATDET_UID}

ENTRYPOINT ["satdet"]
CMD ["--help"]
