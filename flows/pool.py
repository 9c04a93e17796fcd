"""A Docker work pool that cannot drop the GPU (`satdet pool create`, `satdet doctor --pool`).

prefect-docker passes a deployment's `container_create_kwargs` (the GPU `device_requests`, the
entrypoint) to docker-py only when the work pool's *base job template* declares that variable and its
job configuration uses it. `prefect work-pool create --type docker` run where prefect-docker is not
installed takes the template from Prefect's bundled worker metadata, which lacks it: the worker then
drops the GPUs without a word and training runs on the CPU. So the pool is created from a template that
is guaranteed to carry `container_create_kwargs` (prefect-docker's own default template when it is
installed, else the bundled one, plus the variable), with satdet's GPU request as its default (every
flow run of the pool gets the GPUs, even from a deployment that sets no job variables) and
`auto_remove` off (an OOM-killed container must stay until the worker has read its exit code).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pipeline.errors import SatdetError

CCK = "container_create_kwargs"
CCK_PLACEHOLDER = "{{ container_create_kwargs }}"
CCK_SCHEMA = {
    "title": "Container Configuration",
    "description": "Configuration for containers created by workers. See the docker-py documentation "
    "(https://docker-py.readthedocs.io/en/stable/containers.html) for accepted values.",
    "type": "object",
}


def gpu_request(gpus: str = "all") -> list[dict[str, Any]]:
    """docker-py device_requests for `gpus`, as `docker run --gpus` reads it: 'all', a count ('2'), or
    device ids ('device=0,1' or GPU UUIDs); 'none' = no GPU."""
    text = str(gpus).strip().strip('"').lower()
    if text == "none":
        return []
    if text == "all":
        return [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
    if text.isdigit() and int(text) > 0:
        return [{"driver": "nvidia", "count": int(text), "capabilities": [["gpu"]]}]
    if text.startswith("device="):
        ids = [g.strip() for g in str(gpus).strip().strip('"')[len("device="):].split(",") if g.strip()]
        if ids and all(i.isdigit() or i.lower().startswith("gpu-") for i in ids):
            return [{"driver": "nvidia", "device_ids": ids, "capabilities": [["gpu"]]}]
    raise SatdetError(f"--gpus {gpus!r}: expected all, none, a count (2) or device ids (device=0,1)")


def satdet_container_kwargs(gpus: str = "all", shm_size: str = "2g") -> dict[str, Any]:
    """The container settings the satdet image needs: the GPUs, its entrypoint replaced (the worker
    runs `prefect flow-run execute`; the image's ENTRYPOINT is `satdet`), shared memory for tf.data."""
    kwargs: dict[str, Any] = {"entrypoint": ["/usr/bin/env"], "shm_size": shm_size}
    if requests := gpu_request(gpus):
        kwargs["device_requests"] = requests
    return kwargs


def docker_default_template() -> tuple[dict[str, Any], str]:
    """The Docker worker's default base job template and where it came from (no network needed)."""
    try:
        from prefect_docker.worker import DockerWorker

        return copy.deepcopy(DockerWorker.get_default_base_job_template()), "prefect-docker"
    except ImportError:
        pass
    import prefect

    bundled = Path(prefect.__file__).parent / "server" / "api" / "collections_data" / "views" / \
        "aggregate-worker-metadata.json"
    try:
        metadata = json.loads(bundled.read_text())
    except (OSError, ValueError):
        raise SatdetError("prefect-docker is not installed and Prefect's bundled worker metadata is missing: "
                          "pip install prefect-docker") from None
    for collection in metadata.values():
        for worker in collection.values():
            if worker.get("type") == "docker":
                return copy.deepcopy(worker["default_base_job_configuration"]), "Prefect's bundled worker metadata"
    raise SatdetError("no Docker worker template found: pip install prefect-docker")


def gpu_job_template(gpus: str = "all", shm_size: str = "2g",
                     template: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Docker base job template that declares and uses `container_create_kwargs` (default: satdet's
    GPU request and entrypoint) and defaults `auto_remove` to false."""
    template = copy.deepcopy(template if template is not None else docker_default_template()[0])
    job = template.setdefault("job_configuration", {})
    props = template.setdefault("variables", {"type": "object"}).setdefault("properties", {})
    props[CCK] = {**CCK_SCHEMA, **{k: v for k, v in props.get(CCK, {}).items() if k != "default"},
                  "default": satdet_container_kwargs(gpus, shm_size)}
    job[CCK] = CCK_PLACEHOLDER
    props["auto_remove"] = {"title": "Auto Remove", "type": "boolean",
                            "description": "Remove the container when it exits.",
                            **props.get("auto_remove", {}), "default": False}
    job.setdefault("auto_remove", "{{ auto_remove }}")
    return template


def template_problems(template: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(errors, warnings) about a Docker pool template for GPU flow runs."""
    errors: list[str] = []
    warnings: list[str] = []
    props = (template.get("variables") or {}).get("properties") or {}
    job = template.get("job_configuration") or {}
    if CCK not in props:
        errors.append(f"the template declares no `{CCK}` variable: a deployment's GPU device_requests and "
                      "entrypoint are dropped and flow runs start without GPUs")
    if CCK not in job or "container_create_kwargs" not in json.dumps(job.get(CCK)):
        errors.append(f"the job configuration does not use `{CCK}` ({CCK_PLACEHOLDER}): the worker never "
                      "passes it to Docker")
    default = (props.get(CCK) or {}).get("default") or {}
    if CCK in props and not default.get("device_requests"):
        warnings.append(f"`{CCK}` has no default device_requests: only deployments that set them get GPUs")
    if (props.get("auto_remove") or {}).get("default", False):
        warnings.append("auto_remove defaults to true: an OOM-killed container is removed before the worker "
                        "reads its exit code and the run stays Running")
    return errors, warnings


# ------------------------------------------------------------------------------------------------ server
def create_pool(name: str, gpus: str = "all", shm_size: str = "2g", overwrite: bool = False,
                concurrency_limit: int | None = None) -> tuple[Any, str]:
    """Create (or with `overwrite`, update) the Docker work pool `name` with the GPU template."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    base, source = docker_default_template()
    template = gpu_job_template(gpus, shm_size, base)
    spec: dict[str, Any] = {"name": name, "type": "docker", "base_job_template": template,
                            "description": "satdet GPU hosts (Docker); template from `satdet pool create`"}
    if concurrency_limit is not None:
        spec["concurrency_limit"] = concurrency_limit
    with get_client(sync_client=True) as client:
        try:
            return client.create_work_pool(WorkPoolCreate(**spec), overwrite=overwrite), source
        except ObjectAlreadyExists:
            raise SatdetError(f"work pool {name!r} exists; pass --overwrite to replace its job template "
                              "(or check it: satdet doctor --pool " + name + ")") from None


def check_pool(name: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) for the work pool `name` on the configured Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            return [f"work pool {name!r} not found on {client.api_url}"], []
    if pool.type != "docker":
        return [f"work pool {name!r} is of type {pool.type!r}, not docker"], []
    return template_problems(pool.base_job_template or {})
