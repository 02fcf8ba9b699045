"""The local Dask cluster's worker processes: their environment and thread count."""

from __future__ import annotations

import os

import dask
import distributed  # noqa: F401  (loads the distributed section of Dask's configuration)
import pytest

from infra.cluster import (
    check_cluster,
    configure_worker_spawn,
    resolve_cluster,
    task_runner,
    threads_per_worker,
)


def _worker_facts() -> dict[str, object]:
    """What a worker process sees: its environment variables and torch's thread count."""
    import torch

    return {
        "malloc": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
    }


@pytest.fixture
def restored_dask_config():
    """Undo the process-wide Dask configuration a test sets."""
    saved = dask.config.get("distributed.nanny.pre-spawn-environ")
    yield
    dask.config.set({"distributed.nanny.pre-spawn-environ": dict(saved)})


def test_spawn_environment_drops_the_malloc_trim_and_sets_threads(restored_dask_config):
    configure_worker_spawn("3")
    environ = dask.config.get("distributed.nanny.pre-spawn-environ")
    assert environ["MALLOC_TRIM_THRESHOLD_"] is None
    assert environ["OMP_NUM_THREADS"] == environ["MKL_NUM_THREADS"] == "3"


@pytest.mark.slow
def test_local_worker_starts_without_malloc_trim_and_with_its_threads(
    restored_dask_config, monkeypatch
):
    from distributed import Client, LocalCluster

    # The flow process's own variables override Dask's (the nanny reads os.environ first).
    for name in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    threads = threads_per_worker(1)
    configure_worker_spawn(str(threads))
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        facts = client.submit(_worker_facts).result(timeout=120)
    assert facts == {"malloc": None, "omp": str(threads), "torch_threads": threads}


def test_auto_runs_one_worker_in_this_process_and_more_on_a_local_cluster(restored_dask_config):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    assert [resolve_cluster("auto", n) for n in (1, 2, 3)] == ["threads", "local", "local"]
    assert resolve_cluster("local", 1) == "local" and resolve_cluster("threads", 4) == "threads"
    assert resolve_cluster("tcp://10.0.0.1:8786", 1) == "tcp://10.0.0.1:8786"
    one = task_runner("auto", 1)
    assert isinstance(one, ThreadPoolTaskRunner) and one._max_workers == 1
    two = task_runner("auto", 2)  # built, not started: no cluster runs here
    assert isinstance(two, DaskTaskRunner) and two.cluster_kwargs["n_workers"] == 2
    with pytest.raises(ValueError, match="'auto', 'threads', 'local'"):
        check_cluster("dask", 1)
