"""An in-process feature cache: the same interface as :class:`~tasks.cache.store.FeatureCache`.

The inspection station (``musc serve``) computes one part's entries per request and drops
them after it: they never need to outlive the process, be shared with another process or
survive a crash, so encoding them as Zarr arrays and checksumming every chunk would only cost
time (about a third of a second per 2D+3D part). A :class:`MemoryCache` keeps each entry's
arrays as NumPy copies in a dictionary. Task functions reach it through
:func:`tasks.runtime.feature_cache` with a URL from :func:`memory_cache_url`, so they run the
same code as on a stored cache.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

#: URL scheme of in-process caches (not an fsspec protocol: nothing is stored).
MEMORY_SCHEME = "musc-memory://"

_REGISTRY: dict[str, MemoryCache] = {}
_REGISTRY_LOCK = threading.Lock()


class MemoryCache:
    """Entries of named arrays held in this process (see the module docstring).

    Arrays are copied on write and on read, so neither the writer nor a reader can change
    what another reader gets.

    Attributes:
        url: the cache's ``musc-memory://`` URL.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._entries: dict[str, tuple[dict[str, np.ndarray], dict]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryCache({self.url!r}, {len(self._entries)} entries)"

    def close(self) -> None:
        """Nothing to close (kept for the interface)."""

    def has(self, key: str) -> bool:
        """Whether an entry exists under ``key``."""
        return key in self._entries

    def _entry(self, key: str) -> tuple[dict[str, np.ndarray], dict]:
        entry = self._entries.get(key)
        if entry is None:
            raise KeyError(f"no complete cache entry {key}")
        return entry

    def meta(self, key: str) -> dict:
        """An entry's metadata (a copy)."""
        return json.loads(json.dumps(self._entry(key)[1]))

    def write(
        self,
        key: str,
        arrays: Mapping[str, np.ndarray],
        meta: dict | None = None,
        *,
        overwrite: bool = False,
        chunk_rows: int | None = None,
    ) -> bool:
        """Store an entry (``chunk_rows`` is accepted for the interface and ignored).

        Returns:
            True if this call stored the entry, False if one existed and ``overwrite`` is off.
        """
        del chunk_rows
        meta = json.loads(json.dumps(dict(meta or {})))  # JSON only, as a stored cache
        copies: dict[str, np.ndarray] = {}
        for name, array in arrays.items():
            array = np.array(array, copy=True)
            if array.dtype.kind not in "biufc":
                raise TypeError(f"array {name!r}: unsupported dtype {array.dtype}")
            copies[name] = array
        with self._lock:
            if key in self._entries and not overwrite:
                return False
            self._entries[key] = (copies, meta)
            return True

    def read(self, key: str) -> tuple[dict[str, np.ndarray], dict]:
        """Every array of an entry and its metadata (copies)."""
        arrays, meta = self._entry(key)
        return {name: array.copy() for name, array in arrays.items()}, self.meta(key)

    def read_array(self, key: str, name: str, selection: Any = None) -> np.ndarray:
        """One array of an entry, or ``array[selection]`` (a copy)."""
        arrays, _ = self._entry(key)
        if name not in arrays:
            raise KeyError(f"no array {name!r} in cache entry {key}")
        array = arrays[name]
        return np.array(array if selection is None else array[selection], copy=True)

    def open_entry(self, key: str) -> MemoryEntry:
        """The entry opened for several reads."""
        self._entry(key)
        return MemoryEntry(self, key)

    def delete(self, key: str) -> None:
        """Remove an entry (no error when there is none)."""
        with self._lock:
            self._entries.pop(key, None)

    @property
    def bytes(self) -> int:
        """Bytes held by the arrays of every entry."""
        return sum(a.nbytes for arrays, _ in self._entries.values() for a in arrays.values())


class MemoryEntry:
    """One entry of a :class:`MemoryCache`, as :class:`~tasks.cache.store.EntryReader` reads."""

    def __init__(self, cache: MemoryCache, key: str) -> None:
        self.cache = cache
        self.key = key

    def read(self) -> tuple[dict[str, np.ndarray], dict]:
        """Every array and the metadata."""
        return self.cache.read(self.key)

    def read_array(self, name: str, selection: Any = None) -> np.ndarray:
        """One array, or part of it."""
        return self.cache.read_array(self.key, name, selection)


def memory_cache_url() -> str:
    """A new, empty in-process cache, by its URL (give it back with :func:`drop_memory_cache`)."""
    url = f"{MEMORY_SCHEME}{uuid.uuid4().hex}"
    with _REGISTRY_LOCK:
        _REGISTRY[url] = MemoryCache(url)
    return url


def is_memory_url(url: str) -> bool:
    """Whether ``url`` names an in-process cache."""
    return url.startswith(MEMORY_SCHEME)


def memory_cache(url: str) -> MemoryCache:
    """The in-process cache of a URL from :func:`memory_cache_url`.

    Raises:
        KeyError: no such cache in this process (dropped, or made in another process).
    """
    with _REGISTRY_LOCK:
        cache = _REGISTRY.get(url)
    if cache is None:
        raise KeyError(
            f"no in-process cache {url!r} here: such caches live in the process that made "
            "them and are gone once dropped"
        )
    return cache


def drop_memory_cache(url: str) -> None:
    """Free an in-process cache and everything in it (no error when it is gone already)."""
    with _REGISTRY_LOCK:
        _REGISTRY.pop(url, None)
