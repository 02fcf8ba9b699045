"""Work items grouped into tasks, so a flow's task runs stay bounded whatever the pool size.

A stage's items (preparation chunks, feature blocks, pair shards, reduction blocks) are cut into
at most ``cap`` groups of consecutive items, one task each. Grouping is execution only: every
item is still computed as before, under the same cache key; with at most ``cap`` items each
item is its own group. Consecutive items share inputs: pair shards are planned sorted by
``(a, b)``, so a group's shards mostly share their first block, whose features the task then
reads once.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.cache.keys import PairKeys
from tasks.planning.blocks import ReduceItem, ScoringPlan

#: Most tasks one stage submits. A pool of up to this many blocks (shards) runs one task per
#: block (shard); a larger one groups them. Prefect's and Dask's per-task overheads (state
#: records, scheduling, progress reports) then stay bounded by a few hundred runs a stage.
MAX_TASKS_PER_STAGE = 128

#: Feature tasks per block: 2D tokens then 2D SNAMD; 3D grouping, 3D tokens, 3D SNAMD.
FEATURE_TASKS = {"2d": 2, "3d": 3, "2d+3d": 5}


def contiguous_groups(count: int, cap: int | None = None) -> list[range]:
    """``count`` items in at most ``cap`` groups of consecutive items, sizes within one.

    Args:
        count: number of items (0 or more).
        cap: most groups (at least 1); None for :data:`MAX_TASKS_PER_STAGE` (its value at the call).

    Returns:
        ``min(count, cap)`` ranges of item indices covering ``range(count)`` in order, the
        larger groups first.
    """
    if cap is None:
        cap = MAX_TASKS_PER_STAGE
    if cap < 1:
        raise ValueError(f"a stage needs at least one task, got a cap of {cap}")
    if count < 0:
        raise ValueError(f"item count must not be negative, got {count}")
    groups = min(count, cap)
    if groups == 0:
        return []
    size, extra = divmod(count, groups)
    ranges: list[range] = []
    start = 0
    for index in range(groups):
        stop = start + size + (1 if index < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


@dataclass(frozen=True)
class ShardWork:
    """One shard of a scoring task: blocks ``a`` and ``b`` (None: inside ``a``), its cache keys.

    The blocks are indices into the task's own block list (see :class:`ShardGroup`).
    """

    a: int
    b: int | None
    key: PairKeys


@dataclass(frozen=True)
class ShardGroup:
    """The shards of one scoring task and the sample keys of the blocks they read.

    Attributes:
        blocks: the pool indices of the blocks the task reads, each once, in first-use order.
        shards: the shards, in plan order, their blocks given as positions in ``blocks``.
    """

    blocks: tuple[int, ...]
    shards: tuple[ShardWork, ...]


def shard_groups(plan: ScoringPlan, cap: int | None = None) -> list[ShardGroup]:
    """The plan's shards in at most ``cap`` scoring tasks, consecutive in plan order.

    Args:
        plan: the scoring plan.
        cap: most tasks; None for :data:`MAX_TASKS_PER_STAGE` (its value at the call).

    Returns:
        One group per task; each block a group reads is listed once.
    """
    groups: list[ShardGroup] = []
    for span in contiguous_groups(len(plan.shards), cap):
        position: dict[int, int] = {}
        works: list[ShardWork] = []
        for shard in (plan.shards[i] for i in span):
            a = position.setdefault(shard.a, len(position))
            b = None if shard.b is None else position.setdefault(shard.b, len(position))
            works.append(ShardWork(a, b, shard.key))
        groups.append(ShardGroup(tuple(position), tuple(works)))
    return groups


def reduce_groups(plan: ScoringPlan, cap: int | None = None) -> list[list[ReduceItem]]:
    """The plan's reductions in at most ``cap`` tasks of consecutive blocks.

    Args:
        plan: the scoring plan.
        cap: most tasks; None for :data:`MAX_TASKS_PER_STAGE` (its value at the call).

    Returns:
        Per task, the reductions of its blocks' samples, in pool order.
    """
    return [
        [item for b in span for item in plan.reduce[b]]
        for span in contiguous_groups(len(plan.reduce), cap)
    ]


@dataclass(frozen=True)
class TaskRuns:
    """How many tasks each stage of a pool's scoring submits.

    Attributes:
        prepare: preparation tasks of the batch's samples.
        features: feature tasks (every chain of every group of blocks).
        pairs: pair-scoring tasks.
        reduction: reduction tasks.
    """

    prepare: int
    features: int
    pairs: int
    reduction: int

    @property
    def total(self) -> int:
        """Task runs of these stages together."""
        return self.prepare + self.features + self.pairs + self.reduction


def planned_task_runs(
    samples: int,
    shard_size: int,
    blocks: int,
    shards: int,
    modality: str | None,
    cap: int | None = None,
) -> TaskRuns:
    """Task runs of a pool's stages as :mod:`flows.stages` submits them.

    Args:
        samples: samples of the batch to prepare.
        shard_size: samples per preparation chunk.
        blocks: blocks of the pool (their features are computed and reduced).
        shards: pair shards of the plan.
        modality: ``2d``, ``3d`` or ``2d+3d``; None when no feature is computed (re-scoring).
        cap: most tasks per stage; None for :data:`MAX_TASKS_PER_STAGE` (its value at the call).

    Returns:
        The counts per stage.
    """
    chunks = -(-samples // shard_size)
    chains = 0 if modality is None else FEATURE_TASKS[modality]
    return TaskRuns(
        prepare=len(contiguous_groups(chunks, cap)),
        features=chains * len(contiguous_groups(blocks, cap)),
        pairs=len(contiguous_groups(shards, cap)),
        reduction=len(contiguous_groups(blocks, cap)),
    )
