"""Content-addressed cache of named arrays, stored as chunked Zarr v3 arrays on any fsspec URL.

Layout of one entry with key ``k`` under the cache root::

    <root>/<k[:2]>/<k>/_complete.json       completion record (written last)
    <root>/<k[:2]>/<k>/<token>/<name>/...   one Zarr v3 array per name, chunked along axis 0

Atomicity: every write goes into a fresh, unique data prefix ``<token>`` (never shared by two
writers), and only when all arrays are written does the writer commit the entry by writing the
completion record, which names the token and holds each array's shape, dtype, SHA-256 of the
whole array and SHA-256 of every chunk of rows. The record is a single object put on S3 (atomic
there) and a write-to-temporary-then-rename locally. Hence:

- an entry without a (parseable) record does not exist (:meth:`FeatureCache.has` is False), so a
  writer that dies half-way leaves only an unreferenced prefix that :meth:`FeatureCache.delete`
  or a later write clears;
- concurrent writers of one key never touch each other's data; the last record wins, and every
  record points to complete data that matches its checksums. A writer that finds a valid record
  just before committing drops its own data and keeps the existing entry;
- readers verify checksums and raise :class:`CacheCorruption` when the stored data no longer
  matches (a truncated or modified chunk): the caller recomputes and rewrites with
  ``overwrite=True``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
import zarr

from infra.storage import (
    full_names,
    is_transient,
    is_unreachable,
    open_async_filesystem,
    open_filesystem,
    redact,
    split_url,
    with_retries,
)

RECORD_NAME = "_complete.json"
RECORD_VERSION = 1
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{2,128}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_KEY_DOMAIN = "musc-cache-key-v1"
T = TypeVar("T")


class CacheCorruption(RuntimeError):
    """A cache entry's stored data does not match its completion record (recompute it).

    Attributes:
        key: the corrupted entry's key, so that the caller can delete and recompute it.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key

    def __reduce__(self) -> tuple:
        return (type(self), (str(self), self.key))  # keeps the key across process boundaries


def _encode(value: Any) -> Any:
    # Type-tagged, so 1, 1.0, True, "1" and b"1" never collide.
    if isinstance(value, bool):
        return ["?", value]
    if isinstance(value, int):
        return ["i", str(value)]
    if isinstance(value, float):
        return ["f", float(value).hex()]
    if isinstance(value, str):
        return ["s", value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ["b", bytes(value).hex()]
    if isinstance(value, (tuple, list)):
        return ["t", [_encode(v) for v in value]]
    if value is None:
        return ["n"]
    raise TypeError(f"cache_key: unsupported value type {type(value).__name__}")


def cache_key(parts: Mapping[str, str | bytes | int | float | tuple]) -> str:
    """Stable content address of a cache entry.

    Args:
        parts: named ingredients, e.g. ``{"input": sha256_of_file_bytes, "image_size": 224,
            "backbone": ("vit_base_patch16_224.dino", weights_digest)}``. Values may be str,
            bytes, int, float, bool, None or (nested) tuples/lists of those. Key order does not
            matter; value types do (``1`` and ``"1"`` give different keys).

    Returns:
        The SHA-256 hex digest (64 characters) of a canonical JSON encoding of ``parts``.

    Raises:
        TypeError: for a non-string part name or an unsupported value type.
    """
    items = []
    for name in sorted(parts):
        if not isinstance(name, str):
            raise TypeError(f"cache_key: part names must be str, got {type(name).__name__}")
        items.append([name, _encode(parts[name])])
    blob = json.dumps([_KEY_DOMAIN, items], separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _chunk_hashes(array: np.ndarray, rows: int) -> list[str]:
    if array.ndim == 0:
        return [_sha256(array)]
    return [_sha256(array[i : i + rows]) for i in range(0, array.shape[0], rows)]


#: Seconds a failed array write waits for the chunk writes it started alongside.
SETTLE_SECONDS = 5.0


def _settle(timeout: float = SETTLE_SECONDS) -> None:
    """Wait (up to ``timeout`` s) for the work in flight in Zarr's event loop to end.

    Zarr writes an array's chunks concurrently and, when one write fails (no space left),
    raises at once while the others still run: one of them could create its chunk file
    after the caller removed the entry's data prefix, leaving an orphan on a full disk.
    """
    from zarr.core.sync import sync

    async def drain() -> None:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=timeout)

    try:
        sync(drain())
    except Exception:  # waiting is best effort: the prefix is unreferenced anyway
        pass


class FeatureCache:
    """Content-addressed cache of named numeric arrays on a local path or ``s3://`` URL.

    Args:
        url: cache root: a local path, ``file://…`` or ``s3://bucket/prefix`` (S3 endpoint and
            credentials come from the environment, see :mod:`infra.storage`).
        chunk_bytes: target size of one chunk; chunks span whole rows of the first axis.
        attempts: tries per storage operation (exponential backoff on transient errors).
        base_delay: seconds before the first retry.
    """

    def __init__(
        self,
        url: str,
        *,
        chunk_bytes: int = 8 << 20,
        attempts: int = 4,
        base_delay: float = 0.2,
    ) -> None:
        self.url = url
        self.protocol, self.root = split_url(url)
        self.fs, _ = open_filesystem(url)
        self.chunk_bytes = int(chunk_bytes)
        self.attempts = attempts
        self.base_delay = base_delay
        self._async_fs = None

    def __repr__(self) -> str:
        return f"FeatureCache({redact(self.url)!r})"

    def close(self) -> None:
        """Close the async S3 session used by Zarr (if any); the cache stays usable."""
        afs, self._async_fs = self._async_fs, None
        s3 = getattr(afs, "_s3", None)
        if s3 is not None:
            from zarr.core.sync import sync

            try:
                sync(s3.__aexit__(None, None, None))
            except Exception:  # closing is best effort
                pass

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------- paths
    def entry_path(self, key: str) -> str:
        """Path of an entry's prefix inside the filesystem."""
        if not _KEY_RE.match(key):
            raise ValueError(f"invalid cache key {key!r}")
        return f"{self.root}/{key[:2]}/{key}"

    def _record_path(self, key: str) -> str:
        return f"{self.entry_path(key)}/{RECORD_NAME}"

    def _retry(self, fn, what: str):
        return with_retries(fn, attempts=self.attempts, base_delay=self.base_delay, what=what)

    def _store(self, path: str, read_only: bool):
        if self.protocol == "file":
            return zarr.storage.LocalStore(path, read_only=read_only)
        if self._async_fs is None:
            self._async_fs, _ = open_async_filesystem(self.url)
        return zarr.storage.FsspecStore(self._async_fs, path=path, read_only=read_only)

    # ----------------------------------------------------------------------------- record
    def _load_record(self, key: str) -> dict | None:
        path = self._record_path(key)

        def load() -> bytes | None:
            try:
                return self.fs.cat_file(path)
            except FileNotFoundError:
                return None

        raw = self._retry(load, f"read {RECORD_NAME}")
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
        if (
            not isinstance(record, dict)
            or record.get("version") != RECORD_VERSION
            or record.get("key") != key
            or not isinstance(record.get("arrays"), dict)
            or not isinstance(record.get("data"), str)
        ):
            return None
        return record

    def _commit_record(self, key: str, record: dict) -> None:
        payload = json.dumps(record, sort_keys=True, indent=1).encode()
        path = self._record_path(key)
        if self.protocol == "file":
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                self._retry(lambda: self.fs.pipe_file(tmp, payload), "write record")
                self.fs.mv(tmp, path)  # rename: atomic on one local filesystem
            except BaseException:
                self._rm(tmp)  # a record cut short (no space left) is never left behind
                raise
        else:
            # A single PUT is atomic on S3: readers see the old object, or the whole new one.
            self._retry(lambda: self.fs.pipe_file(path, payload), "write record")

    def _rm(self, path: str) -> None:
        def rm() -> None:
            try:
                self.fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass

        self._retry(rm, "delete")

    # ----------------------------------------------------------------------------- API
    def has(self, key: str) -> bool:
        """Whether a complete entry exists (its completion record exists and parses)."""
        return self._load_record(key) is not None

    def meta(self, key: str) -> dict:
        """The metadata stored with an entry (no array is read).

        Raises:
            KeyError: no complete entry under ``key``.
        """
        record = self._load_record(key)
        if record is None:
            raise KeyError(key)
        return record["meta"]

    def write(
        self,
        key: str,
        arrays: Mapping[str, np.ndarray],
        meta: dict | None = None,
        *,
        overwrite: bool = False,
        chunk_rows: int | None = None,
    ) -> bool:
        """Write an entry: all arrays into a fresh prefix, then the completion record.

        Args:
            key: entry key, usually from :func:`cache_key`.
            arrays: named numeric arrays (names: letters, digits, ``_.-``, not starting with
                ``_`` or ``.``). Stored with their exact dtype and shape.
            meta: JSON-serializable metadata stored in the record.
            overwrite: replace an existing complete entry (otherwise writing is a no-op).
            chunk_rows: rows of axis 0 per chunk for every array; None sizes chunks by
                ``chunk_bytes``. One row per chunk suits arrays read row by row (a partial
                read touches, decodes and hashes only the chunks it needs).

        Returns:
            True if this call committed the entry, False if a complete entry already existed.

        Raises:
            StorageFull: the storage has no space left; nothing of this write is left
                behind (the entry is as it was before the call).
        """
        meta = dict(meta or {})
        json.dumps(meta)  # fail early on non-JSON metadata, before writing anything
        prepared: dict[str, np.ndarray] = {}
        for name, array in arrays.items():
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise ValueError(f"invalid array name {name!r}")
            array = np.asarray(array)
            if array.dtype.kind not in "biufc":
                raise TypeError(f"array {name!r}: unsupported dtype {array.dtype}")
            prepared[name] = array
        old = self._load_record(key)
        if old is not None and not overwrite:
            return False

        with full_names(self.url, "a cache entry"):
            return self._write_entry(key, prepared, meta, old, overwrite, chunk_rows)

    def _write_entry(
        self,
        key: str,
        prepared: dict[str, np.ndarray],
        meta: dict,
        old: dict | None,
        overwrite: bool,
        chunk_rows: int | None,
    ) -> bool:
        """:meth:`write` once the arguments are checked: data, record, old data removed."""
        token = f"d-{uuid.uuid4().hex}"
        data_path = f"{self.entry_path(key)}/{token}"
        entries: dict[str, dict] = {}
        try:
            for name, array in prepared.items():
                entries[name] = self._write_array(f"{data_path}/{name}", array, chunk_rows)
            if not overwrite and self.has(key):  # another writer committed meanwhile
                self._rm(data_path)
                return False
            record = {
                "version": RECORD_VERSION,
                "key": key,
                "data": token,
                "arrays": entries,
                "meta": meta,
            }
            self._commit_record(key, record)
        except BaseException:
            try:
                self._rm(data_path)
            except Exception:  # best effort; the prefix is unreferenced anyway
                pass
            raise
        if old is not None and old["data"] != token:
            self._rm(f"{self.entry_path(key)}/{old['data']}")
        return True

    def _write_array(self, path: str, array: np.ndarray, chunk_rows: int | None) -> dict:
        if array.ndim == 0:
            chunks: tuple[int, ...] = ()
            rows = 1
        else:
            if chunk_rows is None:
                row_bytes = max(1, array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64)))
                chunk_rows = self.chunk_bytes // row_bytes
            rows = int(max(1, min(max(array.shape[0], 1), chunk_rows)))
            chunks = (rows, *(max(1, s) for s in array.shape[1:]))

        def write() -> None:
            z = zarr.create_array(
                store=self._store(path, read_only=False),
                shape=array.shape,
                chunks=chunks,
                dtype=array.dtype,
                zarr_format=3,
                overwrite=True,
            )
            try:
                z[...] = array
            except BaseException:
                _settle()  # the failed chunk's siblings may still be writing: let them end
                raise

        self._retry(write, f"write array {path.rsplit('/', 1)[-1]}")
        return {
            "shape": list(array.shape),
            "dtype": array.dtype.str,
            "chunk_rows": rows,
            "sha256": _sha256(array),
            "chunk_sha256": _chunk_hashes(array, rows),
        }

    def _open(self, key: str, record: dict, name: str):
        info = record["arrays"].get(name)
        if info is None:
            raise KeyError(f"no array {name!r} in cache entry {key}")
        path = f"{self.entry_path(key)}/{record['data']}/{name}"

        def open_() -> Any:
            return zarr.open_array(store=self._store(path, read_only=True), mode="r")

        try:
            z = self._retry(open_, f"open array {name}")
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise CacheCorruption(f"entry {key}: array {name!r} is missing ({exc})", key) from exc
        if list(z.shape) != info["shape"] or np.dtype(z.dtype).str != info["dtype"]:
            raise CacheCorruption(f"entry {key}: array {name!r} has wrong shape/dtype", key)
        return z, info

    def _get(self, key: str, name: str, z, selection) -> np.ndarray:
        try:
            return np.asarray(self._retry(lambda: z[selection], f"read array {name}"))
        except Exception as exc:
            if isinstance(exc, CacheCorruption) or is_transient(exc) or is_unreachable(exc):
                raise  # storage still failing after the retries: not a corruption
            # Undecodable chunk (truncated / garbled compressed bytes).
            raise CacheCorruption(
                f"entry {key}: array {name!r} cannot be decoded: {redact(str(exc))}", key
            ) from exc

    def read(self, key: str) -> tuple[dict[str, np.ndarray], dict]:
        """Read a whole entry and verify every array's checksum.

        Returns:
            ``(arrays, meta)``.

        Raises:
            KeyError: no complete entry under ``key``.
            CacheCorruption: stored data does not match the completion record.
        """
        return self.open_entry(key).read()

    def _read_all(
        self, key: str, record: dict, opened: Callable[[str], tuple]
    ) -> tuple[dict[str, np.ndarray], dict]:
        out: dict[str, np.ndarray] = {}
        for name in record["arrays"]:
            z, info = opened(name)
            value = self._get(key, name, z, ...)
            if _sha256(value) != info["sha256"]:
                raise CacheCorruption(f"entry {key}: checksum mismatch in array {name!r}", key)
            out[name] = value
        return out, record["meta"]

    def read_array(self, key: str, name: str, selection: Any = None) -> np.ndarray:
        """Read one array, or part of it, verifying the checksums of the chunks it touches.

        Args:
            key: entry key.
            name: array name.
            selection: None (the whole array) or a NumPy basic index whose first element is an
                int or a slice over axis 0 (e.g. ``slice(10, 20)`` or ``(3, slice(None), 0)``);
                only the row chunks covering it are read.

        Returns:
            ``array[selection]`` exactly as NumPy would give it.

        Raises:
            KeyError: no complete entry, or no such array.
            CacheCorruption: a touched chunk does not match its checksum.
        """
        return self.open_entry(key).read_array(name, selection)

    def _read_part(self, key: str, name: str, opened: tuple, selection: Any) -> np.ndarray:
        z, info = opened
        sel = selection if isinstance(selection, tuple) else (selection,)
        first = sel[0] if sel else None
        if z.ndim == 0 or first is None or first is Ellipsis or not isinstance(first, (int, slice)):
            value = self._get(key, name, z, ...)
            if _sha256(value) != info["sha256"]:
                raise CacheCorruption(f"entry {key}: checksum mismatch in array {name!r}", key)
            return value if selection is None else value[selection]
        n, rows = z.shape[0], info["chunk_rows"]
        if isinstance(first, int):
            if not -n <= first < n:
                raise IndexError(f"index {first} out of range for axis 0 of size {n}")
            idx = np.array([first % n])
        else:
            idx = np.arange(*first.indices(n))
        if idx.size == 0:
            return np.empty((n, *z.shape[1:]), dtype=z.dtype)[selection]
        c0, c1 = int(idx.min()) // rows, int(idx.max()) // rows + 1
        lo, hi = c0 * rows, min(c1 * rows, n)
        block = self._get(key, name, z, slice(lo, hi))
        for c in range(c0, c1):
            part = block[(c - c0) * rows : (c - c0 + 1) * rows]
            if _sha256(part) != info["chunk_sha256"][c]:
                raise CacheCorruption(f"entry {key}: checksum mismatch in {name!r} chunk {c}", key)
        rest = sel[1:]
        if isinstance(first, int):
            return block[(first % n - lo, *rest)]
        return block[idx - lo][(slice(None), *rest)]

    def open_entry(self, key: str) -> EntryReader:
        """Open a complete entry for several reads (record and arrays opened once).

        Raises:
            KeyError: no complete entry under ``key``.
        """
        record = self._load_record(key)
        if record is None:
            raise KeyError(f"no complete cache entry {key}")
        return EntryReader(self, key, record)

    def delete(self, key: str) -> None:
        """Remove an entry (record first, so it turns invalid before its data goes)."""
        self._rm(self._record_path(key))
        self._rm(self.entry_path(key))


class EntryReader:
    """One complete cache entry opened once for many reads.

    Reading rows of the same entry again and again (a sample's distances from a pair shard)
    through :meth:`FeatureCache.read_array` loads the completion record and opens the Zarr array
    every time: two round trips on object storage per read. The reader keeps both; every read
    still verifies the checksums of what it reads. An overwrite may replace the entry (and
    remove its old data) while it is open: a read that fails its checks re-opens the entry once
    and, if a new record appeared, reads that; otherwise the corruption is real.
    """

    def __init__(self, cache: FeatureCache, key: str, record: dict) -> None:
        self.cache = cache
        self.key = key
        self._record = record
        self._arrays: dict[str, tuple] = {}

    def _checked(self, read: Callable[[], T]) -> T:
        try:
            return read()
        except CacheCorruption:
            fresh = self.cache._load_record(self.key)
            if fresh is None or fresh["data"] == self._record["data"]:
                raise
            self._record, self._arrays = fresh, {}
            return read()

    def _opened(self, name: str) -> tuple:
        if name not in self._arrays:
            self._arrays[name] = self.cache._open(self.key, self._record, name)
        return self._arrays[name]

    def read(self) -> tuple[dict[str, np.ndarray], dict]:
        """Like :meth:`FeatureCache.read` on this entry."""
        return self._checked(
            lambda: self.cache._read_all(self.key, self._record, self._opened)
        )

    def read_array(self, name: str, selection: Any = None) -> np.ndarray:
        """Like :meth:`FeatureCache.read_array` on this entry.

        Raises:
            KeyError: no such array.
            CacheCorruption: a touched chunk does not match its checksum.
        """
        return self._checked(
            lambda: self.cache._read_part(self.key, name, self._opened(name), selection)
        )
