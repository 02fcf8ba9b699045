"""The in-process cache answers every read as the stored cache does, and shares nothing."""

import threading

import numpy as np
import pytest

from tasks.cache.memory import (
    MemoryCache,
    drop_memory_cache,
    is_memory_url,
    memory_cache,
    memory_cache_url,
)
from tasks.cache.store import FeatureCache
from tasks.runtime import feature_cache

KEY, OTHER = "ab" + "1" * 30, "cd" + "2" * 30


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "features": rng.standard_normal((3, 5, 4)).astype(np.float32),
        "index": np.arange(7, dtype=np.int64),
        "mask": (rng.random((4, 4)) > 0.5).astype(np.uint8),
        "score": np.float32(0.25),
    }


SELECTIONS = [None, 1, -1, slice(0, 2), slice(1, 3), (2, slice(None), 0), (slice(0, 2), 3)]


def test_memory_cache_reads_what_the_stored_cache_reads(tmp_path):
    stored, memory = FeatureCache(str(tmp_path / "cache")), MemoryCache("musc-memory://t")
    for cache in (stored, memory):
        assert not cache.has(KEY)
        assert cache.write(KEY, _arrays(0), meta={"score": 0.5, "name": "a"}, chunk_rows=1)
        assert not cache.write(KEY, _arrays(1))  # exists: kept
    assert memory.has(KEY) and stored.has(KEY)
    assert memory.meta(KEY) == stored.meta(KEY)
    (got, meta), (want, want_meta) = memory.read(KEY), stored.read(KEY)
    assert meta == want_meta and set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name])
    for selection in SELECTIONS:
        for name in ("features",):
            np.testing.assert_array_equal(
                memory.read_array(KEY, name, selection), stored.read_array(KEY, name, selection)
            )
            np.testing.assert_array_equal(
                memory.open_entry(KEY).read_array(name, selection),
                stored.open_entry(KEY).read_array(name, selection),
            )
    for cache in (stored, memory):
        assert cache.write(KEY, _arrays(1), overwrite=True)
        np.testing.assert_array_equal(cache.read_array(KEY, "index"), _arrays(1)["index"])
        with pytest.raises(KeyError):
            cache.read_array(KEY, "missing")
        with pytest.raises(KeyError):
            cache.read(OTHER)
        cache.delete(KEY)
        assert not cache.has(KEY)
        cache.delete(KEY)  # twice: no error


def test_memory_cache_shares_no_array_with_writers_or_readers():
    cache = MemoryCache("musc-memory://copies")
    written = _arrays(2)
    cache.write(KEY, written, meta={"list": [1, 2]})
    written["features"][:] = 0
    read = cache.read_array(KEY, "features")
    assert np.abs(read).sum() > 0
    read[:] = 7
    assert not np.any(cache.read_array(KEY, "features") == 7)
    cache.meta(KEY)["list"].append(3)
    assert cache.meta(KEY) == {"list": [1, 2]}
    assert cache.bytes == sum(a.nbytes for a in _arrays(2).values())


def test_memory_cache_refuses_what_a_stored_cache_cannot_hold():
    cache = MemoryCache("musc-memory://refuse")
    with pytest.raises(TypeError):
        cache.write(KEY, {"names": np.array(["a", "b"], dtype=object)})
    with pytest.raises(TypeError):
        cache.write(KEY, {"x": np.zeros(2)}, meta={"not json": object()})
    assert not cache.has(KEY)


def test_feature_cache_gives_every_thread_the_one_memory_cache_until_dropped():
    url = memory_cache_url()
    assert is_memory_url(url) and not is_memory_url("/data/cache")
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(feature_cache(url))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(cache is memory_cache(url) for cache in seen) and len(seen) == 3
    feature_cache(url).write(KEY, {"x": np.ones(3)})
    assert memory_cache(url).has(KEY)
    drop_memory_cache(url)
    with pytest.raises(KeyError, match="in-process cache"):
        feature_cache(url)
    assert memory_cache_url() != url
