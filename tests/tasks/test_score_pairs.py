"""Pair scoring of a group of shards: the arrays of one task per shard, blocks read once."""

import numpy as np

from musc_core.config import MuscConfig
from tasks.cache.keys import Identities, prepared_keys, sample_keys
from tasks.cache.store import FeatureCache
from tasks.planning.blocks import PoolSample, batch_blocks, plan_scoring
from tasks.planning.groups import shard_groups
from tasks.runtime import Runtime
from tasks.scoring import score_pairs
from tasks.stage import StageCount

CONFIG = MuscConfig(modality="2d", distance_dtype="float32", layers_2d=(1, 2))
IDS = Identities("vit:test", None)


def _plan_with_features(url, n, size, budget):
    samples = [
        PoolSample(
            f"s{i}", "b",
            sample_keys(prepared_keys({"image": f"{i:064x}"}, "folder", "l", CONFIG), CONFIG, IDS),
        )
        for i in range(n)
    ]
    cache = FeatureCache(url)
    rng = np.random.default_rng(n)
    for sample in samples:
        features = rng.standard_normal((2, 9, 4)).astype(np.float32)  # (Y, L, C)
        features /= np.linalg.norm(features, axis=-1, keepdims=True)
        cache.write(sample.keys.snamd_2d, {"features": features}, chunk_rows=1)
    return plan_scoring(batch_blocks(samples, size), CONFIG, budget)


def _run(plan, cap, url):
    computed = cached = 0
    for group in shard_groups(plan, cap):
        blocks = [[s.keys for s in plan.blocks[b]] for b in group.blocks]
        result = score_pairs.fn(blocks, list(group.shards), CONFIG, Runtime(url, "cpu"))
        computed, cached = computed + result.computed, cached + result.cached
    return StageCount("pairs", computed, cached)


def _arrays(url, plan):
    cache = FeatureCache(url)
    return [cache.read(shard.key[0])[0] for shard in plan.shards]


def test_one_task_for_all_shards_writes_the_arrays_of_one_task_per_shard(tmp_path, monkeypatch):
    alone, grouped = str(tmp_path / "alone"), str(tmp_path / "grouped")
    plan = _plan_with_features(alone, 15, 3, 7)
    _plan_with_features(grouped, 15, 3, 7)
    assert _run(plan, 1000, alone).computed == len(plan.shards)

    reads = []
    real = FeatureCache.read_array

    def counting(cache, key, name, selection=None):
        reads.append(key)
        return real(cache, key, name, selection)

    monkeypatch.setattr(FeatureCache, "read_array", counting)
    count = _run(plan, 1, grouped)
    monkeypatch.undo()
    assert (count.computed, count.cached) == (len(plan.shards), 0)
    for left, right in zip(_arrays(alone, plan), _arrays(grouped, plan), strict=True):
        assert left.keys() == right.keys()
        for name in left:
            np.testing.assert_array_equal(left[name], right[name])
    # each shard's first block is read once while the next shards share it; a block that is
    # only a second block is read once per shard
    firsts = [s.a for s in plan.shards]
    runs_of_first = 1 + sum(1 for x, y in zip(firsts, firsts[1:], strict=False) if x != y)
    seconds = sum(1 for s in plan.shards if s.b is not None)
    assert len(reads) == 3 * (runs_of_first + seconds)  # 3 samples per block
    # again: every shard found in the cache
    again = _run(plan, 2, grouped)
    assert (again.computed, again.cached) == (0, len(plan.shards))
