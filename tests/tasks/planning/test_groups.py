"""Grouping work into tasks: every item exactly once, in order, and a bounded number of tasks."""

import random

import pytest

from musc_core.config import MuscConfig
from musc_core.references import reference_plan
from tasks.cache.keys import Identities, prepared_keys, sample_keys
from tasks.planning.blocks import PoolSample, batch_blocks, plan_scoring
from tasks.planning.groups import (
    FEATURE_TASKS,
    MAX_TASKS_PER_STAGE,
    contiguous_groups,
    planned_task_runs,
    reduce_groups,
    shard_groups,
)

CONFIG = MuscConfig(modality="2d")
IDS = Identities("vit:test", None)


def _blocks(n, size):
    samples = [
        PoolSample(
            f"s{i}", "b",
            sample_keys(prepared_keys({"image": f"{i:064x}"}, "folder", "l", CONFIG), CONFIG, IDS),
        )
        for i in range(n)
    ]
    return batch_blocks(samples, size)


def test_contiguous_groups_cover_every_item_once_in_order_with_balanced_sizes():
    rng = random.Random(17)
    cases = [(0, 1), (1, 1), (5, 128), (128, 128), (129, 128), (3750, 128), (37500, 7)]
    cases += [(rng.randint(0, 5000), rng.randint(1, 300)) for _ in range(300)]
    for count, cap in cases:
        groups = contiguous_groups(count, cap)
        assert [i for g in groups for i in g] == list(range(count))
        assert len(groups) == min(count, cap)
        sizes = {len(g) for g in groups}
        assert all(sizes) and max(sizes, default=0) - min(sizes, default=0) <= 1
    # few items: one group each, as before grouping
    assert contiguous_groups(3, 128) == [range(0, 1), range(1, 2), range(2, 3)]


def test_contiguous_groups_refuse_a_cap_below_one():
    with pytest.raises(ValueError, match="cap"):
        contiguous_groups(4, 0)


@pytest.mark.parametrize(
    ("n", "size", "budget", "cap"),
    [(7, 3, None, 2), (40, 4, 9, 5), (40, 4, 9, 1000), (61, 5, None, 7), (100, 16, 30, 3),
     (33, 2, 6, 4), (12, 12, None, 1)],
)
def test_shard_and_reduce_groups_cover_the_plan_exactly_once(n, size, budget, cap):
    plan = plan_scoring(_blocks(n, size), CONFIG, budget)
    groups = shard_groups(plan, cap)
    assert len(groups) == min(len(plan.shards), cap)
    seen = []
    for group in groups:
        assert len(set(group.blocks)) == len(group.blocks)
        used = set()
        for work in group.shards:
            a = group.blocks[work.a]
            b = None if work.b is None else group.blocks[work.b]
            used |= {work.a} | ({work.b} if work.b is not None else set())
            seen.append((a, b, work.key))
        assert used == set(range(len(group.blocks)))  # no block is sent that is not read
    assert seen == [(s.a, s.b, s.key) for s in plan.shards]
    reduce = reduce_groups(plan, cap)
    assert len(reduce) == min(len(plan.blocks), cap)
    assert [i for g in reduce for i in g] == [i for b in plan.reduce for i in b]


def test_grouping_does_not_change_any_cache_key():
    plan = plan_scoring(_blocks(50, 4), CONFIG, 12)
    alone = shard_groups(plan, 10_000)
    grouped = shard_groups(plan, 3)
    assert all(len(g.shards) == 1 for g in alone)
    assert [w.key for g in alone for w in g.shards] == [w.key for g in grouped for w in g.shards]
    assert [i.key for g in reduce_groups(plan, 2) for i in g] == [
        i.key for g in reduce_groups(plan, 10_000) for i in g
    ]


@pytest.mark.parametrize("n", [1000, 10_000, 100_000])
def test_task_runs_stay_bounded_whatever_n(n):
    sizes = [16] * (n // 16) + ([n % 16] if n % 16 else [])
    shards = len(reference_plan(sizes, 150).block_pairs)
    runs = planned_task_runs(n, 16, len(sizes), shards, "2d+3d")
    bound = MAX_TASKS_PER_STAGE * (2 + FEATURE_TASKS["2d+3d"] + 1)
    assert runs.total <= bound
    assert runs.pairs == min(shards, MAX_TASKS_PER_STAGE)
    if n >= 10_000:  # more items than the cap in every stage: every stage at the cap
        assert runs.total == bound


def test_few_blocks_run_one_task_per_block_and_shard_as_before():
    runs = planned_task_runs(40, 16, 3, 6, "2d")
    assert (runs.prepare, runs.features, runs.pairs, runs.reduction) == (3, 6, 6, 3)
    assert planned_task_runs(40, 16, 3, 6, None).features == 0
