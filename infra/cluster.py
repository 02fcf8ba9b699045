"""Where a flow's tasks run: an in-process thread pool, a local Dask cluster or a remote one.

- ``"threads"``: a thread pool in the flow process (no extra processes; debugging, tests).
- ``"local"`` (default): a temporary ``distributed.LocalCluster`` of ``workers`` processes,
  one thread each, the machine's cores shared between them (``OMP_NUM_THREADS``), so PyTorch
  in two workers does not fight over the same cores.
- a scheduler address (``tcp://host:8786``): an existing Dask cluster, e.g. one
  ``dask-cuda-worker`` per GPU on each node; every task uses its worker's GPU.

Dask workers report task states to the Prefect API named by ``PREFECT_API_URL`` in their
environment: a local cluster inherits the flow process's (see :mod:`infra.prefect_api`); the
workers of a remote cluster must be started with it set.
"""

from __future__ import annotations

import os

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

SCHEMES = ("tcp://", "tls://", "ucx://", "inproc://", "ws://", "wss://")


def threads_per_worker(workers: int) -> int:
    """CPU threads each of ``workers`` local worker processes may use (at least 1)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def task_runner(cluster: str = "local", workers: int = 1) -> TaskRunner:
    """The Prefect task runner for a cluster option.

    Args:
        cluster: ``"threads"``, ``"local"`` or a Dask scheduler address.
        workers: threads (``"threads"``) or worker processes (``"local"``); ignored for an
            existing cluster, whose size is its own.

    Returns:
        A task runner for ``flow.with_options(task_runner=...)``.

    Raises:
        ValueError: an unknown cluster option or a non-positive worker count.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if cluster == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    from prefect_dask import DaskTaskRunner

    if cluster == "local":
        threads = str(threads_per_worker(workers))
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": ":0",
                "env": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
            },
        )
    if cluster.startswith(SCHEMES):
        return DaskTaskRunner(address=cluster)
    raise ValueError(
        f"cluster must be 'threads', 'local' or a Dask scheduler address (tcp://host:port), "
        f"got {cluster!r}"
    )
