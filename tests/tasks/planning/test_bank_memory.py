"""The bank in memory: blocks stacked as the shard task stacks them, rows when one is left out."""

import numpy as np
import pytest
import torch

from musc_core.config import MuscConfig
from tasks.cache.keys import PreparedKeys, SampleKeys, pairs_key
from tasks.cache.store import FeatureCache
from tasks.planning.bank_memory import load_bank_memory
from tasks.planning.blocks import PoolSample
from tasks.planning.groups import ShardWork
from tasks.runtime import Runtime
from tasks.scoring import score_pairs, score_pairs_against

CONFIG = MuscConfig(modality="2d", image_size=64, distance_dtype="float32", vit_dtype="float32")


def _sample(index: int) -> PoolSample:
    keys = SampleKeys(PreparedKeys(f"im{index:02d}", None, None), f"tok{index:02d}",
                      f"snamd{index:02d}", None, None, None)
    return PoolSample(f"s{index}", "b1", keys, None, None)


@pytest.fixture()
def bank(tmp_path):
    """A 2D bank of two blocks (3 + 2 samples) in a cache: (cache url, blocks, features)."""
    cache = FeatureCache(str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    blocks = [[_sample(i) for i in range(3)], [_sample(i) for i in range(3, 5)]]
    features = {}
    for index, sample in enumerate(s for block in blocks for s in block):
        array = rng.standard_normal((2, 16, 8)).astype(np.float32)  # (Y, L, C)
        features[sample.keys.snamd_2d] = array
        cache.write(sample.keys.snamd_2d, {"features": array})
        cache.write(f"red{index:02d}", {"salient": np.full(8, index, np.float32)},
                    meta={"score": 0.5 + index})
    return str(tmp_path / "cache"), blocks, features


def test_whole_and_shortened_blocks_hold_the_cached_features_in_block_order(bank):
    url, blocks, features = bank
    reduced = [f"red{i:02d}" for i in range(5)]
    memory = load_bank_memory(FeatureCache(url), blocks, reduced, CONFIG, torch.device("cpu"))
    whole = memory.block_features(blocks[0], 0)
    expected = np.stack([features[s.keys.snamd_2d] for s in blocks[0]])
    assert whole.shape == (3, 2, 16, 8) and np.array_equal(whole.numpy(), expected)
    short = [blocks[0][0], blocks[0][2]]  # the middle sample left out (it equals the part)
    assert np.array_equal(memory.block_features(short, 0).numpy(), expected[[0, 2]])
    assert memory.block_features(blocks[1], 1) is None, "3D is not scored"
    scores, salient = memory.pool(["red04", "red01"])
    assert scores == [4.5, 1.5] and [float(s[0]) for s in salient] == [4.0, 1.0]
    assert memory.bytes == 5 * 2 * 16 * 8 * 4 + 5 * 8 * 4


def test_a_shard_against_the_bank_in_memory_is_the_cached_shard(bank, tmp_path):
    url, blocks, features = bank
    part = _sample(9)
    part_features = np.random.default_rng(1).standard_normal((2, 16, 8)).astype(np.float32)
    cache = FeatureCache(url)
    cache.write(part.keys.snamd_2d, {"features": part_features})
    memory = load_bank_memory(cache, blocks, [], CONFIG, torch.device("cpu"))
    key = pairs_key([part.keys], [s.keys for s in blocks[0]], CONFIG)
    runtime = Runtime(url, "cpu")
    score_pairs.fn(
        [[part.keys], [s.keys for s in blocks[0]]], [ShardWork(0, 1, key)], CONFIG, runtime
    )
    from_cache = cache.read_array(key[0], "d2_ab")
    scratch = str(tmp_path / "scratch")
    FeatureCache(scratch).write(part.keys.snamd_2d, {"features": part_features})
    counted = score_pairs_against(
        [part.keys], [memory.block_features(blocks[0], 0), None], key, CONFIG,
        Runtime(scratch, "cpu"),
    )
    assert counted.computed == 1
    in_memory = FeatureCache(scratch).read_array(key[0], "d2_ab")
    assert from_cache.shape == (1, 2, 16, 3) and np.array_equal(in_memory, from_cache)
    # brute force: each part patch's distance to its nearest patch of each bank sample
    bank_features = np.stack([features[s.keys.snamd_2d] for s in blocks[0]], axis=1)
    distances = np.linalg.norm(
        part_features[:, :, None, None, :] - bank_features[:, None], axis=-1
    ).min(axis=-1)  # (Y, L, B)
    np.testing.assert_allclose(in_memory[0], distances, rtol=1e-4, atol=1e-4)
