# satdet — set-up and everyday commands. Everything is installed into .venv from pyproject.toml.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean image image-cpu container-test bench-torchvision

# Container images (docs/container.md). Tags: $(IMAGE):<git revision>[-dirty][-cpu] and $(IMAGE):<version>[-cpu].
# PYTHON_IMAGE=<base> overrides the Dockerfile's base (e.g. satdet-base:bookworm from docker/debian-base.sh);
# PIP_CA=<CA bundle> and PIP_CONF=<pip.conf> are passed as build secrets, never baked in.
IMAGE ?= satdet
DOCKER ?= $(shell docker/buildkit-docker.sh 2>/dev/null || echo docker)
REV = $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)$(shell git diff --quiet HEAD -- 2>/dev/null || echo -dirty)
VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
BUILD = DOCKER_BUILDKIT=1 $(DOCKER) build $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) \
	$(if $(PIP_CA),--secret id=pip_ca$(,)src=$(PIP_CA)) $(if $(PIP_CONF),--secret id=pip_conf$(,)src=$(PIP_CONF)) \
	--build-arg VCS_REF=$(REV) --build-arg SATDET_VERSION=$(VERSION) $(DOCKER_BUILD_ARGS)
, := ,

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=... to another 3.11+ interpreter)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/satdet run configs/demo.yaml

# Test files are spread over TEST_WORKERS processes (pytest-xdist; a file's tests stay together, so its
# module and session fixtures are built once per worker). TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check pipeline flows tests benchmarks
	$(BIN)/hadolint Dockerfile

clean:
	rm -rf runs .pytest_cache

# satdet against torchvision's Faster R-CNN, side by side on this CPU (benchmarks/vs_torchvision.py); torch goes
# into its own .venv-torch, never into the product's .venv. BENCH_ARGS: e.g. --export runs/neon-trees/model/export
# TORCH_PIP_ARGS: e.g. --extra-index-url https://download.pytorch.org/whl/cpu (torch's CPU build: no CUDA libraries)
.venv-torch/.installed: benchmarks/requirements-torchvision.txt
	$(PYTHON) -m venv .venv-torch
	.venv-torch/bin/python -m pip install --quiet $(TORCH_PIP_ARGS) -r benchmarks/requirements-torchvision.txt
	@touch $@

bench-torchvision: $(STAMP) .venv-torch/.installed
	$(BIN)/python benchmarks/vs_torchvision.py --torch-python .venv-torch/bin/python $(BENCH_ARGS)

image:
	$(BUILD) --build-arg VARIANT=gpu -t $(IMAGE):$(REV) -t $(IMAGE):$(VERSION) .

image-cpu:
	$(BUILD) --build-arg VARIANT=cpu -t $(IMAGE):$(REV)-cpu -t $(IMAGE):$(VERSION)-cpu .

# Builds a Debian base and the CPU image, runs doctor, a 4-step demo flow and predict in it (docker/container-test.sh).
container-test:
	docker/container-test.sh
