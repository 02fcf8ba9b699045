"""Where a run's entries and results go below a storage root, and a run's default batch id."""

from __future__ import annotations

from collections.abc import Sequence

from tasks.records.batch_record import new_batch_id
from tasks.records.result_store import safe_file_stem


def cache_url(storage: str) -> str:
    """The feature cache's root below a storage root."""
    return f"{storage.rstrip('/')}/cache"


def results_url(storage: str, line: str, batch: str) -> str:
    """Default output prefix of a run: ``<storage>/results/<line>/<batch>``."""
    return f"{storage.rstrip('/')}/results/{safe_file_stem(line)}/{batch}"


def default_batch_id() -> str:
    """The id of a run started now: its UTC time and a random suffix (:func:`new_batch_id`).

    Batch ids, ``rescore``'s ``<batch>-rescore-<id>``, ``score-new``'s ``new-<id>`` and the
    station's ``part-<id>-<count>`` all end with it: two runs started in the same instant
    never share a record or a results folder.
    """
    return new_batch_id()


def eval_line(category: str) -> str:
    """The line of a paper-style evaluation's runs of one category: ``eval-<category>``."""
    return f"eval-{category}"


def eval_tag(seed: int, subset: int, subsets: int) -> str:
    """The tag of one run of a paper-style evaluation: ``s<seed>-<k>of<g>``."""
    return f"s{seed}-{subset}of{subsets}"


def eval_batches(eval_id: str, subsets: int, seeds: Sequence[int]) -> list[str]:
    """The batch ids a paper-style evaluation records on each category's line.

    Args:
        eval_id: the evaluation's id (``--batch``).
        subsets: g, subsets per category; with 1 only the first seed is run.
        seeds: the seeds of the random partitions.

    Returns:
        ``<eval id>-s<seed>-<k>of<g>`` for each seed and subset, in the order they run.
    """
    chosen = list(seeds)[:1] if subsets == 1 else list(seeds)
    return [
        f"{eval_id}-{eval_tag(seed, index, subsets)}"
        for seed in chosen
        for index in range(1, subsets + 1)
    ]
