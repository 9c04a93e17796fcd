# satdet image: a Python base plus one virtualenv, in two variants from this one file:
#   VARIANT=gpu (default)  TensorFlow with CUDA/cuDNN from pip wheels (tensorflow[and-cuda]); the host needs
#                          only the NVIDIA driver and the NVIDIA Container Toolkit.
#   VARIANT=cpu            tensorflow-cpu, no CUDA wheels: for CPU hosts and CI.
# rasterio's wheels bundle GDAL, so no system GDAL is installed. Needs BuildKit (the default builder since
# Docker 23; DOCKER_BUILDKIT=1 on 20.10). Versions come from requirements/constraints.txt (docker/lock.sh).
#   make image / make image-cpu          tags satdet:<git revision>[-cpu] and satdet:<version>[-cpu]
#   docker run --rm --gpus all -v "$PWD":/work satdet:0.1.0 run configs/gpu-r50.yaml
# Behind a TLS-inspecting proxy or with an internal mirror: --build-arg PYTHON_IMAGE=<any Debian-like image
# with python3 and venv, e.g. from docker/debian-base.sh>, --secret id=pip_ca,src=<CA bundle>,
# --secret id=pip_conf,src=<pip.conf with index-url> (docs/container.md, "Build behind a proxy").

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ------------------------------------------------------------------------------------------------ deps
# The dependencies alone: pyproject.toml's lists (docker/requirements.py: + tensorflow[and-cuda] for gpu,
# tensorflow-cpu instead of tensorflow for cpu), pinned by the constraints file. This layer depends only on
# those three files: a change to the code (or README) does not rebuild it.
FROM ${PYTHON_IMAGE} AS deps
ARG VARIANT=gpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY requirements/constraints.txt requirements/constraints.txt
COPY docker/requirements.py docker/requirements.py
COPY pyproject.toml ./
# Optional build secrets (never stored in a layer): pip_ca = a CA bundle for pip (a TLS-inspecting proxy or
# a private index), pip_conf = a pip.conf (index-url, trusted-host, ...). The pip cache is a BuildKit cache
# mount, so a rebuild after a constraints change downloads only what changed.
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip_ca --mount=type=secret,id=pip_conf \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && if [ -s /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi \
    && python -m pip install --quiet -c requirements/constraints.txt pip setuptools wheel \
    && python docker/requirements.py "$VARIANT" > /tmp/requirements.txt \
    && pip install --prefer-binary -c requirements/constraints.txt -r /tmp/requirements.txt \
    && pip check

# ------------------------------------------------------------------------------------------------ builder
# The project itself: a non-editable install of pipeline/ and flows/ into /stage (the venv's paths under a
# root prefix), so the runtime stage adds it as a small layer on top of the unchanged dependency layer.
FROM deps AS builder
COPY README.md ./
COPY pipeline ./pipeline
COPY flows ./flows
RUN pip install --no-cache-dir --no-deps --no-build-isolation --no-compile --no-warn-script-location --root /stage . \
    && python -m compileall -q -s /stage -p / /stage/opt/venv

# ------------------------------------------------------------------------------------------------ runtime
FROM ${PYTHON_IMAGE} AS runtime
# Re-declared: an ARG before the first FROM is not visible inside a stage unless declared again.
ARG PYTHON_IMAGE
ARG SATDET_UID=1000

# A fixed, unprivileged default user; `docker run --user "$(id -u):$(id -g)"` (any uid) works too: nothing
# below depends on HOME, and /work/.prefect and /work/.keras are world-writable (sticky) so that named
# volumes mounted there, which start as copies of these folders, are writable for any SATDET_UID.
RUN useradd --create-home --uid "${SATDET_UID}" --shell /usr/sbin/nologin satdet \
    && mkdir -p /work/.prefect /work/.keras \
    && chown satdet:satdet /work \
    && chmod 1777 /work/.prefect /work/.keras

COPY --from=deps /opt/venv /opt/venv
COPY --from=builder /stage/ /

# No NVIDIA_VISIBLE_DEVICES here on purpose: `--gpus` / compose device requests set it per container, and
# a baked-in "all" would hand every GPU to any container started with the nvidia runtime (docs/container.md).
# The temporary Prefect API of `satdet run` creates its database on a container's first run: Prefect's 20 s
# startup limit is too short for that on a busy 2-core host (seen: "Timed out while attempting to connect").
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=1 \
    PREFECT_HOME=/work/.prefect \
    KERAS_HOME=/work/.keras \
    MPLCONFIGDIR=/tmp/matplotlib \
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN satdet --version

# /work is where users mount their project (configs, data, runs). No VOLUME instruction on purpose:
# an image-declared volume under /work would shadow the user's bind mount of "$PWD":/work.
WORKDIR /work
USER ${SATDET_UID}

# Metadata last: a new revision changes only the image config, no layer.
ARG VARIANT=gpu
ARG SATDET_VERSION=0.1.0
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="satdet" \
      org.opencontainers.image.description="Object detection on georeferenced imagery: tiling, Faster R-CNN training with gradient clipping, evaluation and scene prediction, orchestrated by Prefect." \
      org.opencontainers.image.version="${SATDET_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="https://github.com/satdet/satdet" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}" \
      io.satdet.variant="${VARIANT}"

ENTRYPOINT ["satdet"]
CMD ["--help"]
