"""Where a flow's tasks run: an in-process thread pool, a local Dask cluster or a remote one.

- ``"auto"`` (default): ``"threads"`` for one worker, ``"local"`` for more. One worker gains
  nothing from a separate process and pays for it: the cluster start (about 11 s on a 2-core
  machine) and moving every task's inputs and results between processes.
- ``"threads"``: a thread pool of ``workers`` threads in the flow process (no extra processes).
- ``"local"``: a temporary ``distributed.LocalCluster`` of ``workers`` processes,
  one thread each, the machine's cores shared between them (``OMP_NUM_THREADS``), so PyTorch
  in two workers does not fight over the same cores.
- a scheduler address (``tcp://host:8786``): an existing Dask cluster, e.g. one
  ``dask-cuda-worker`` per GPU on each node; every task uses its worker's GPU.

Dask workers report task states to the Prefect API named by ``PREFECT_API_URL`` in their
environment: a local cluster inherits the flow process's (see :mod:`infra.prefect_api`); the
workers of a remote cluster must be started with it set.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from functools import cache
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.task_runners import TaskRunner


SCHEMES = ("tcp://", "tls://", "ucx://", "inproc://", "ws://", "wss://")
#: Seconds the shutdown of a Dask client and local cluster may take before it is abandoned.
CLOSE_TIMEOUT = 20.0
#: Loggers whose shutdown chatter (workers killed, close timed out) is summed up in one line.
_SHUTDOWN_LOGGERS = ("distributed", "tornado", "asyncio")

log = logging.getLogger("musc")


def close_quietly(close: Callable[[], None], what: str, timeout: float = CLOSE_TIMEOUT) -> bool:
    """Run ``close`` in a daemon thread for at most ``timeout`` seconds; never raise.

    The results of a run are already computed when its cluster is shut down, so nothing the
    shutdown does may fail the run: an error, or a shutdown still running after ``timeout``
    (it is left to finish, or to die with the process), is one warning on the ``musc``
    logger, and Dask's own shutdown messages are held back meanwhile.

    Args:
        close: the shutdown to run.
        what: what is shut down, for the warning.
        timeout: seconds to wait.

    Returns:
        Whether the shutdown finished cleanly in time.
    """
    errors: list[BaseException] = []

    def run() -> None:
        try:
            close()
        except BaseException as error:  # reported below as one line
            errors.append(error)

    loggers = [logging.getLogger(name) for name in _SHUTDOWN_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        closing = threading.Thread(target=run, name=f"close {what}", daemon=True)
        closing.start()
        closing.join(timeout)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    if closing.is_alive():
        log.warning("%s did not shut down within %.0f s; left behind (results are kept)",
                    what, timeout)
        return False
    if errors:
        error = errors[0]
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        log.warning("%s shut down with an error (results are kept): %s",
                    what, f"{type(error).__name__}: {detail}" if detail else type(error).__name__)
        return False
    return True


def threads_per_worker(workers: int) -> int:
    """CPU threads each of ``workers`` local worker processes may use (at least 1)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def resolve_cluster(cluster: str, workers: int) -> str:
    """The cluster an option means: ``"auto"`` is ``"threads"`` for one worker, else ``"local"``."""
    if cluster == "auto":
        return "threads" if workers == 1 else "local"
    return cluster


def task_runner(cluster: str = "auto", workers: int = 1) -> TaskRunner:
    """The Prefect task runner for a cluster option.

    Args:
        cluster: ``"auto"``, ``"threads"``, ``"local"`` or a Dask scheduler address.
        workers: threads (``"threads"``) or worker processes (``"local"``); ignored for an
            existing cluster, whose size is its own.

    Returns:
        A task runner for ``flow.with_options(task_runner=...)``.

    Raises:
        ValueError: an unknown cluster option or a non-positive worker count.
    """
    check_cluster(cluster, workers)
    cluster = resolve_cluster(cluster, workers)
    if cluster == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    runner_class = bounded_dask_runner()
    if cluster == "local":
        threads = str(threads_per_worker(workers))
        configure_worker_spawn(threads)
        return runner_class(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": ":0",
                "env": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
            },
        )
    return runner_class(address=cluster)


#: The answer key of the flow's own process (thread-pool task runner, or no flow run).
THIS_PROCESS = "this process"


def on_every_worker(function: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """``function(*args)`` on every worker of the running flow's task runner, by worker.

    On a Dask cluster each worker process runs it (``Client.run``; keyed by worker address),
    so it sees that worker's own hardware. A thread pool's tasks run in this process: it runs
    here once (keyed :data:`THIS_PROCESS`), as it does outside a flow run.

    Args:
        function: a module-level function (Dask ships it to the workers by reference).
        *args: its arguments (picklable).

    Returns:
        Each worker's result.
    """
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    runner = context.task_runner if context is not None else None
    # A Dask task runner has imported prefect_dask; a thread pool needs neither it nor Dask.
    if runner is not None and "prefect_dask" in sys.modules:
        from prefect_dask import DaskTaskRunner

        if isinstance(runner, DaskTaskRunner):
            return dict(runner.client.run(function, *args))
    return {THIS_PROCESS: function(*args)}


#: Thread variables every local worker process starts with (read when the math libraries load).
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def configure_worker_spawn(threads: str) -> None:
    """Set the environment Dask's nannies give a local worker process before it starts.

    Dask's defaults (``distributed.nanny.pre-spawn-environ``) start every worker with one
    math-library thread and ``MALLOC_TRIM_THRESHOLD_=65536``. The threads are raised to the
    worker's share of the cores here. The malloc variable is removed: setting it switches off
    glibc's adaptive mmap threshold, so every tensor above 128 KiB is mapped and unmapped
    anew, and the kernel zeroes its pages on each first touch; on 2 cores that made the
    backbones 10-40 % slower in a worker than in the flow process (``benchmarks/RESULTS.md``).
    A worker's memory is still bounded by its tasks: every cache entry is written and released
    per chunk.

    Args:
        threads: math-library threads per worker process, as a string.
    """
    import dask
    import distributed  # noqa: F401  (loads Dask's defaults, which this then changes)

    environ = {name: threads for name in _THREAD_VARIABLES}
    environ["MALLOC_TRIM_THRESHOLD_"] = None
    dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in environ.items()})


def check_cluster(cluster: str, workers: int) -> None:
    """Reject a cluster option :func:`task_runner` would refuse, without building anything.

    Raises:
        ValueError: an unknown cluster option or a non-positive worker count.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if cluster not in ("auto", "threads", "local") and not cluster.startswith(SCHEMES):
        raise ValueError(
            "cluster must be 'auto', 'threads', 'local' or a Dask scheduler address "
            f"(tcp://host:port), got {cluster!r}"
        )


@cache
def bounded_dask_runner() -> type[TaskRunner]:
    """The ``DaskTaskRunner`` subclass of local and remote clusters.

    Built on first use, so that importing this module imports neither Prefect nor Dask.
    """
    from prefect.task_runners import TaskRunner
    from prefect_dask import DaskTaskRunner

    class BoundedDaskTaskRunner(DaskTaskRunner):
        """A ``DaskTaskRunner`` whose shutdown is bounded and cannot fail the flow.

        ``prefect_dask`` closes the client and the cluster it created when the flow's task
        runner exits, before the flow run is finished: on a loaded machine Dask's close times
        out (workers still alive, ``SpecCluster`` state correction) and that ``TimeoutError``
        turned a run whose results were all written into a failed one. Here the close goes
        through :func:`close_quietly`: at most :data:`CLOSE_TIMEOUT` seconds, problems as one
        warning.
        """

        def __exit__(
            self,
            exc_type: type[BaseException] | None,
            exc_value: BaseException | None,
            traceback: TracebackType | None,
        ) -> None:
            close_quietly(
                lambda: self._exit_stack.__exit__(exc_type, exc_value, traceback),
                "the Dask cluster",
            )
            TaskRunner.__exit__(self, exc_type, exc_value, traceback)

    return BoundedDaskTaskRunner
