import errno
import os
import threading

import numpy as np
import pytest
import zarr

from infra.storage import StorageFull
from tasks.cache.store import RECORD_NAME, CacheCorruption, FeatureCache, cache_key


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def cache(request, tmp_path):
    if request.param == "local":
        url = str(tmp_path / "cache")
    else:
        url = request.getfixturevalue("s3_url")
    with FeatureCache(url, chunk_bytes=1024, attempts=2, base_delay=0.01) as c:
        yield c


# --------------------------------------------------------------------------- helpers
def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.standard_normal((37, 5, 6)).astype(np.float32),
        "centres": rng.standard_normal((20, 3)),
        "index": rng.integers(0, 1000, size=(41,), dtype=np.int64),
        "half": rng.standard_normal((9, 4)).astype(np.float16),
        "scalar": np.array(2.5, dtype=np.float64),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def _chunk_files(c: FeatureCache, key: str, name: str) -> list[str]:
    return sorted(p for p in c.fs.find(c.entry_path(key)) if f"/{name}/c/" in p)


KEY = cache_key({"input": b"\x00\x01bytes", "image_size": 224, "backbone": ("vit", "abc")})


# --------------------------------------------------------------------------- tests
def test_round_trip_exact(cache):
    arrays = _arrays()
    assert not cache.has(KEY)
    assert cache.write(KEY, arrays, {"sample": "good/000", "n": 3}) is True
    assert cache.has(KEY)
    out, meta = cache.read(KEY)
    assert meta == {"sample": "good/000", "n": 3}
    assert cache.meta(KEY) == meta
    assert set(out) == set(arrays)
    for name, a in arrays.items():
        assert out[name].dtype == a.dtype, name
        assert out[name].shape == a.shape, name
        np.testing.assert_array_equal(out[name], a)
    # The big array really is chunked along axis 0.
    assert len(_chunk_files(cache, KEY, "tokens")) > 1


def test_missing_and_half_written_entries_are_not_valid(cache):
    assert not cache.has(KEY)
    with pytest.raises(KeyError):
        cache.read(KEY)
    cache.write(KEY, _arrays(), {})
    # Simulate a writer that died before committing: data present, no completion record.
    cache.fs.rm(f"{cache.entry_path(KEY)}/{RECORD_NAME}")
    assert cache.fs.find(cache.entry_path(KEY))  # the data is still there...
    assert not cache.has(KEY)  # ...but the entry does not count
    with pytest.raises(KeyError):
        cache.read(KEY)
    with pytest.raises(KeyError):
        cache.read_array(KEY, "tokens")
    # A garbled record is as good as none.
    cache.fs.pipe_file(f"{cache.entry_path(KEY)}/{RECORD_NAME}", b'{"version": 1, "ke')
    assert not cache.has(KEY)
    # A fresh write after the crash gives a valid entry.
    assert cache.write(KEY, _arrays(1), {"ok": True}) is True
    np.testing.assert_array_equal(cache.read(KEY)[0]["centres"], _arrays(1)["centres"])


def test_garbled_chunk_raises_corruption(cache):
    cache.write(KEY, _arrays(), {})
    chunk = _chunk_files(cache, KEY, "tokens")[1]
    raw = cache.fs.cat_file(chunk)
    cache.fs.pipe_file(chunk, raw[: len(raw) // 2])  # truncated
    with pytest.raises(CacheCorruption):
        cache.read(KEY)
    cache.fs.pipe_file(chunk, bytes(b ^ 0x5A for b in raw))  # modified bytes
    with pytest.raises(CacheCorruption):
        cache.read(KEY)


def test_decodable_but_wrong_chunk_fails_checksum(cache):
    other = cache_key({"other": 1})
    cache.write(KEY, _arrays(0), {})
    cache.write(other, _arrays(5), {})
    dst = _chunk_files(cache, KEY, "centres")[0]
    src = _chunk_files(cache, other, "centres")[0]
    cache.fs.pipe_file(dst, cache.fs.cat_file(src))  # valid Zarr chunk, other values
    with pytest.raises(CacheCorruption, match="checksum"):
        cache.read(KEY)
    with pytest.raises(CacheCorruption, match="checksum"):
        cache.read_array(KEY, "centres", slice(0, 2))
    # A deleted chunk (read back as fill values) is caught too.
    cache.fs.rm(dst)
    with pytest.raises(CacheCorruption):
        cache.read(KEY)
    # The caller recomputes and overwrites: the entry is valid again.
    assert cache.write(KEY, _arrays(0), {}, overwrite=True) is True
    np.testing.assert_array_equal(cache.read(KEY)[0]["centres"], _arrays(0)["centres"])


def test_write_existing_is_noop_unless_overwrite(cache):
    assert cache.write(KEY, _arrays(0), {"v": 0}) is True
    assert cache.write(KEY, _arrays(1), {"v": 1}) is False
    assert cache.read(KEY)[1] == {"v": 0}
    np.testing.assert_array_equal(cache.read(KEY)[0]["tokens"], _arrays(0)["tokens"])
    assert cache.write(KEY, _arrays(1), {"v": 1}, overwrite=True) is True
    out, meta = cache.read(KEY)
    assert meta == {"v": 1}
    np.testing.assert_array_equal(out["tokens"], _arrays(1)["tokens"])
    # The replaced data prefix was removed: one data prefix per entry.
    prefixes = {p.split("/")[-1] for p in cache.fs.ls(cache.entry_path(KEY), detail=False)}
    assert len(prefixes - {RECORD_NAME}) == 1
    cache.delete(KEY)
    assert not cache.has(KEY)
    assert not cache.fs.exists(cache.entry_path(KEY))
    cache.delete(KEY)  # deleting a missing entry is fine


def test_partial_read_equals_slicing(cache):
    arrays = _arrays()
    cache.write(KEY, arrays, {})
    t = arrays["tokens"]
    for sel in [
        None,
        slice(None),
        slice(3, 29),
        slice(5, 6),
        slice(30, 10, -3),
        slice(2, 37, 7),
        slice(40, 50),
        -1,
        12,
        (4, slice(1, 3)),
        (slice(10, 20), 2, slice(None, None, 2)),
        (slice(None), Ellipsis, 0),
    ]:
        expected = t if sel is None else t[sel]
        got = cache.read_array(KEY, "tokens", sel)
        assert got.dtype == expected.dtype and got.shape == expected.shape, sel
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(cache.read_array(KEY, "scalar"), arrays["scalar"])
    np.testing.assert_array_equal(cache.read_array(KEY, "index", slice(7, 9)), arrays["index"][7:9])
    with pytest.raises(IndexError):
        cache.read_array(KEY, "tokens", 37)
    with pytest.raises(KeyError):
        cache.read_array(KEY, "nope")


def test_partial_read_detects_corruption_only_where_it_reads(cache):
    cache.write(KEY, _arrays(), {})
    rows = cache._load_record(KEY)["arrays"]["tokens"]["chunk_rows"]
    files = _chunk_files(cache, KEY, "tokens")
    last = max(files, key=lambda p: int(p.split("/c/")[1].split("/")[0]))
    cache.fs.pipe_file(last, b"garbage")
    np.testing.assert_array_equal(
        cache.read_array(KEY, "tokens", slice(0, rows)), _arrays()["tokens"][:rows]
    )
    with pytest.raises(CacheCorruption):
        cache.read_array(KEY, "tokens", -1)


def test_concurrent_writers_same_key(tmp_path):
    c = FeatureCache(str(tmp_path / "cache"), chunk_bytes=512)
    arrays = _arrays(3)
    errors = []

    def work():
        try:
            c.write(KEY, arrays, {"w": 1})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    out, meta = c.read(KEY)
    for name, a in arrays.items():
        np.testing.assert_array_equal(out[name], a)
    assert meta == {"w": 1}


def test_cache_key_stable_and_sensitive():
    parts = {
        "input": b"\x89PNG file bytes",
        "points": "sha256:abc",
        "image_size": 224,
        "ratio": 0.3,
        "backbone": ("vit_base_patch16_224.dino", "sha256:weights"),
    }
    key = cache_key(parts)
    assert len(key) == 64 and all(ch in "0123456789abcdef" for ch in key)
    assert cache_key(dict(reversed(list(parts.items())))) == key  # order-independent
    assert cache_key(dict(parts)) == key
    changed = [
        {"input": b"\x89PNG file bytes!"},
        {"points": "sha256:abd"},
        {"image_size": 225},
        {"ratio": 0.30000000000000004},
        {"backbone": ("vit_base_patch16_224.dino", "sha256:weightz")},
        {"backbone": ("vit_small_patch16_224.dino", "sha256:weights")},
        {"extra": 1},
    ]
    keys = {key}
    for change in changed:
        k = cache_key({**parts, **change})
        assert k not in keys, change
        keys.add(k)
    # Types are part of the encoding.
    assert len({cache_key({"a": v}) for v in (1, 1.0, "1", b"1", (1,), True)}) == 6
    with pytest.raises(TypeError):
        cache_key({"a": object()})


def test_failed_write_leaves_no_entry(tmp_path, monkeypatch):
    c = FeatureCache(str(tmp_path / "cache"), attempts=1)
    real = c._write_array
    calls = []

    def failing(path, array, chunk_rows):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk gone")
        return real(path, array, chunk_rows)

    monkeypatch.setattr(c, "_write_array", failing)
    with pytest.raises(OSError, match="disk gone"):
        c.write(KEY, _arrays(), {})
    assert not c.has(KEY)
    assert not c.fs.exists(calls[0].rsplit("/", 1)[0])  # its private prefix was cleaned up


def test_read_survives_concurrent_overwrite(tmp_path, monkeypatch):
    c = FeatureCache(str(tmp_path / "cache"))
    c.write(KEY, _arrays(0), {"v": 0})
    stale = c._load_record(KEY)
    c.write(KEY, _arrays(1), {"v": 1}, overwrite=True)  # removes the stale data
    real = c._load_record
    first = [stale]
    monkeypatch.setattr(c, "_load_record", lambda key: first.pop() if first else real(key))
    out, meta = c.read(KEY)  # started on the stale record, finished on the new one
    assert meta == {"v": 1}
    np.testing.assert_array_equal(out["tokens"], _arrays(1)["tokens"])


def test_chunk_rows_option_sets_one_row_per_chunk(cache):
    arrays = _arrays()
    cache.write(KEY, arrays, {}, chunk_rows=1)
    record = cache._load_record(KEY)
    assert record["arrays"]["tokens"]["chunk_rows"] == 1
    assert len(_chunk_files(cache, KEY, "tokens")) == arrays["tokens"].shape[0]
    out, _ = cache.read(KEY)
    for name, value in arrays.items():
        np.testing.assert_array_equal(out[name], value)
    np.testing.assert_array_equal(cache.read_array(KEY, "tokens", 7), arrays["tokens"][7])


def test_entry_reader_reads_like_read_array_and_opens_once(cache, monkeypatch):
    arrays = _arrays()
    cache.write(KEY, arrays, {}, chunk_rows=1)
    loads = []
    real = cache._load_record
    monkeypatch.setattr(cache, "_load_record", lambda key: loads.append(key) or real(key))
    entry = cache.open_entry(KEY)
    for sel in [3, -1, slice(2, 9), (5, slice(1, 3)), None]:
        expected = arrays["tokens"] if sel is None else arrays["tokens"][sel]
        np.testing.assert_array_equal(entry.read_array("tokens", sel), expected)
    np.testing.assert_array_equal(entry.read_array("centres", 4), arrays["centres"][4])
    assert len(loads) == 1  # the record was read once for all those reads
    with pytest.raises(KeyError):
        cache.open_entry(cache_key({"absent": 1}))
    with pytest.raises(KeyError):
        entry.read_array("nope")


def test_entry_reader_detects_corruption_and_follows_an_overwrite(tmp_path):
    c = FeatureCache(str(tmp_path / "cache"))
    c.write(KEY, _arrays(0), {}, chunk_rows=1)
    entry = c.open_entry(KEY)
    c.write(KEY, _arrays(1), {}, overwrite=True, chunk_rows=1)  # removes the opened data
    np.testing.assert_array_equal(entry.read_array("tokens", 2), _arrays(1)["tokens"][2])
    (chunk,) = [p for p in _chunk_files(c, KEY, "tokens") if "/c/2/" in p]  # row 2's chunk
    c.fs.pipe_file(chunk, b"garbage")
    with pytest.raises(CacheCorruption):
        c.open_entry(KEY).read_array("tokens", 2)
    row = c.open_entry(KEY).read_array("tokens", 3)  # other rows stay readable
    np.testing.assert_array_equal(row, _arrays(1)["tokens"][3])


# --------------------------------------------------------------------------- no space left
def _files(c: FeatureCache, key: str) -> list[str]:
    return sorted(c.fs.find(c.entry_path(key))) if c.fs.exists(c.entry_path(key)) else []


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_no_space_mid_write_leaves_no_entry_and_keeps_the_one_there(tmp_path, monkeypatch):
    url = str(tmp_path / "cache")
    c = FeatureCache(url, chunk_bytes=1024, attempts=4, base_delay=0.01)
    c.write(KEY, _arrays(0), {"v": 0})
    kept = _files(c, KEY)
    real = zarr.storage.LocalStore.set
    chunks: list[str] = []

    async def set_until_full(self, key, value):
        chunks.append(key)
        if len(chunks) >= 4:  # the disk fills up half-way through the first array's chunks
            path = os.path.join(str(self.root), key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(value.to_bytes()[: len(value) // 2])
            raise _no_space()
        return await real(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_until_full)
    other = cache_key({"input": b"another sample"})
    for key, overwrite in ((KEY, True), (other, False)):
        chunks.clear()
        with pytest.raises(StorageFull) as raised:
            c.write(key, _arrays(1), {"v": 1}, overwrite=overwrite)
        assert chunks.count("zarr.json") == 1, "not retried: a retry cannot make room"
        assert raised.value.location == url and raised.value.what == "a cache entry"
        assert isinstance(raised.value.__cause__, OSError)
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real)
    assert _files(c, KEY) == kept  # the entry there before is untouched...
    out, meta = c.read(KEY)  # ...and still complete, every checksum verified
    assert meta == {"v": 0}
    for name, array in _arrays(0).items():
        np.testing.assert_array_equal(out[name], array)
    assert not c.has(other) and _files(c, other) == []  # nothing of the half-written entry


def test_no_space_while_committing_leaves_no_record_cut_short(tmp_path, monkeypatch):
    c = FeatureCache(str(tmp_path / "cache"), attempts=4, base_delay=0.01)
    real = c.fs.pipe_file
    tries = []

    def pipe_until_full(path, data, **options):
        if RECORD_NAME in path:
            tries.append(path)
            real(path, data[: len(data) // 2], **options)
            raise _no_space()
        return real(path, data, **options)

    monkeypatch.setattr(c.fs, "pipe_file", pipe_until_full)
    with pytest.raises(StorageFull):
        c.write(KEY, _arrays(), {})
    assert len(tries) == 1
    assert not c.has(KEY)
    assert _files(c, KEY) == []  # neither the data nor the half record is left
