"""Shard layout and gathering: each sample gets exactly its references' distances, in order."""

import numpy as np
import pytest

from musc_core.config import MuscConfig
from tasks.cache.keys import Identities, prepared_keys, sample_keys
from tasks.cache.store import FeatureCache
from tasks.planning.blocks import PoolSample, batch_blocks, plan_scoring
from tasks.scoring import ShardReader, gather_distances

CONFIG = MuscConfig(modality="2d")
IDS = Identities("vit:test", None)


def _pool(n):
    samples = [
        PoolSample(
            f"s{i}",
            "b",
            sample_keys(prepared_keys({"image": f"{i:064x}"}, "folder", "l", CONFIG), CONFIG, IDS),
        )
        for i in range(n)
    ]
    return samples


def _write_shards(cache, plan, full, chunk_rows=None):
    """Shard entries laid out as score_pairs writes them, from a known (N, Y, L, N) tensor."""
    starts = np.cumsum([0] + [len(b) for b in plan.blocks])
    for shard in plan.shards:
        a = slice(starts[shard.a], starts[shard.a + 1])
        if shard.b is None:
            inside = full[a][:, :, :, a].copy()
            cache.write(shard.key[0], {"d2": inside}, chunk_rows=chunk_rows)
        else:
            b = slice(starts[shard.b], starts[shard.b + 1])
            cache.write(
                shard.key[0],
                {"d2_ab": full[a][:, :, :, b].copy(), "d2_ba": full[b][:, :, :, a].copy()},
                chunk_rows=chunk_rows,
            )


@pytest.mark.parametrize("chunk_rows", [None, 1])
@pytest.mark.parametrize(
    ("n", "size", "budget"), [(7, 3, None), (9, 2, 4), (6, 6, None), (10, 3, 5)]
)
def test_gathered_distances_are_the_references_columns_in_order(
    tmp_path, n, size, budget, chunk_rows
):
    blocks = batch_blocks(_pool(n), size)
    plan = plan_scoring(blocks, CONFIG, budget)
    full = np.random.default_rng(n).random((n, 2, 3, n)).astype(np.float32)  # (N, Y, L, N)
    cache = FeatureCache(str(tmp_path / "cache"))
    _write_shards(cache, plan, full, chunk_rows)
    items = [item for block in plan.reduce for item in block]
    assert len(items) == n
    shards = ShardReader(cache)
    for index, (item, refs) in enumerate(zip(items, plan.references, strict=True)):
        gathered = gather_distances(shards, item.sources, "2")
        assert gathered.shape == (2, 3, len(refs))
        np.testing.assert_array_equal(gathered.numpy(), full[index][:, :, refs])
        assert item.sample == plan.samples[index].keys


def test_blocks_are_ordered_by_content_key_not_by_name():
    pool = _pool(5)
    reversed_names = [PoolSample(f"z{4 - i}", s.batch, s.keys) for i, s in enumerate(pool)]
    blocks = batch_blocks(reversed_names, 2)
    flat = [s.keys.prepared.content for b in blocks for s in b]
    assert flat == sorted(flat) and [len(b) for b in blocks] == [2, 2, 1]


def test_shard_and_reduction_keys_change_with_what_they_depend_on():
    blocks = batch_blocks(_pool(6), 3)
    base = plan_scoring(blocks, CONFIG, None)
    assert base == plan_scoring(blocks, CONFIG, None)
    other_ratio = plan_scoring(blocks, MuscConfig(modality="2d", interval_ratio=0.5), None)
    assert [s.key for s in other_ratio.shards] == [s.key for s in base.shards]
    assert [i.key for b in other_ratio.reduce for i in b] != [i.key for b in base.reduce for i in b]
    other_dtype = plan_scoring(blocks, MuscConfig(modality="2d", distance_dtype="float32"), None)
    assert {s.key for s in other_dtype.shards}.isdisjoint({s.key for s in base.shards})
