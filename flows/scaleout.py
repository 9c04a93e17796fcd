"""Scale-out on Dask through prefect-dask (`satdet run --dask`, `satdet predict-flow --dask`).

The flows themselves do not change: they are run with a `DaskTaskRunner`, so the tasks they *submit*
(one `tile-scene` per scene, one `predict-scenes` per scene of an output folder) run on Dask workers,
while the tasks they *call* (plan-tiling, finalize-tiling, build-dataset, train, evaluate) stay in the
flow's own process (training wants its main thread and GPU). Every worker process loads the SavedModel
once for all the scenes it predicts. Workers need the same installed satdet and the same view of the
files (scenes, run folder, Prefect's result storage) as the flow: a LocalCluster has both; for a remote
cluster, mount the same paths on its workers.

Install with `pip install "satdet[dask]"`.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.errors import SatdetError


def dask_task_runner(address: str | None = None, workers: int | None = None) -> Any:
    """A DaskTaskRunner: on the cluster at `address`, else on a new `distributed.LocalCluster` of
    `workers` single-threaded worker processes (torn down when the flow ends)."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise SatdetError("--dask needs prefect-dask: pip install 'satdet[dask]'") from None
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": max(1, workers or os.cpu_count() or 1), "threads_per_worker": 1,
                        "processes": True, "dashboard_address": None},
    )


def local_workers(tiling_workers: int) -> int:
    """LocalCluster size from the config: `tiling.workers` (0 = one per CPU)."""
    return tiling_workers or os.cpu_count() or 1


def on_dask() -> bool:
    """True inside a flow run whose task runner is Dask (submitted tasks go to its workers)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    runner = getattr(ctx, "task_runner", None) if ctx else None
    return type(runner).__name__ == "DaskTaskRunner"
