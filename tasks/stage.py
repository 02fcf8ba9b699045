"""What every pipeline task shares: Prefect options, retry rule and the work count it returns."""

from __future__ import annotations

from dataclasses import dataclass

from prefect.cache_policies import NO_CACHE

from infra.storage import is_transient, is_unreachable


def retry_on_storage_error(task: object, task_run: object, state: object) -> bool:
    """Prefect retry condition: retry a failed task only when storage failed transiently.

    A bad input or a bug fails at once; a network error, a throttled or unavailable object
    store is retried with backoff (each storage call already retries a few times itself). An
    endpoint that refuses connections or does not resolve is not: the storage call already
    retried it for tens of seconds, and the run fails with that one message.
    """
    try:
        state.result()  # type: ignore[attr-defined]
    except Exception as error:  # the task's exception, re-raised by the state
        return is_transient(error) and not is_unreachable(error)
    return False


#: Options of every stage task. Our Zarr cache is the source of truth: Prefect neither caches
#: nor persists task results (they are small references anyway).
TASK_OPTIONS: dict[str, object] = {
    "retries": 3,
    "retry_delay_seconds": [2, 8, 30],
    "retry_condition_fn": retry_on_storage_error,
    "cache_policy": NO_CACHE,
    "persist_result": False,
}


@dataclass(frozen=True)
class StageCount:
    """How many entries a task computed and how many it found valid in the cache.

    Attributes:
        stage: stage name (``prepared``, ``tokens_2d``, ``pairs``, ...).
        computed: entries computed and written by this task.
        cached: entries that already existed and were not recomputed.
    """

    stage: str
    computed: int
    cached: int


def add_counts(counts: list[StageCount]) -> dict[str, dict[str, int]]:
    """Sum task counts per stage: ``{stage: {"computed": n, "cached": m}}``."""
    total: dict[str, dict[str, int]] = {}
    for count in counts:
        entry = total.setdefault(count.stage, {"computed": 0, "cached": 0})
        entry["computed"] += count.computed
        entry["cached"] += count.cached
    return total
