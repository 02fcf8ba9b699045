"""Where a run's results go: a local folder or an ``s3://`` prefix, written through fsspec.

Nothing is ever written outside the configured output prefix: every relative path is checked
(no absolute paths, no ``..``), and sample names become file names only through
:func:`safe_file_stem`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import posixpath
import re
import unicodedata
import uuid
from collections.abc import Sequence

import numpy as np
from PIL import Image

from infra.storage import create_file, full_names, open_filesystem, split_url, with_retries
from tasks.choices import RANDOM_WEIGHTS_WARNING as RANDOM_WEIGHTS_WARNING  # re-exported

#: Characters that common filesystems refuse in a name (Windows' list; ``/`` and ``\\`` split).
_ILLEGAL = frozenset('<>:"|?*')
#: Bidirectional embedding, override and isolate controls (they make a name display falsely).
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
#: Unicode categories replaced: control, surrogate (not encodable), line/paragraph separator.
_REPLACED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
#: Names Windows reserves for devices, whatever the extension (compared case-insensitively).
_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"}
    | {f"{port}{n}" for port in ("COM", "LPT") for n in (*"123456789", "¹", "²", "³")}
)
#: Longest stem in UTF-8 bytes: room for a collision suffix and an extension under the
#: 255-byte file-name limit of common filesystems.
MAX_STEM_BYTES = 200


def _replaced(char: str) -> bool:
    return (
        char in _ILLEGAL
        or char in _BIDI_CONTROLS
        or unicodedata.category(char) in _REPLACED_CATEGORIES
    )


def _clean_part(part: str) -> str:
    """One path component with its unsafe characters replaced (a run of them by one ``_``)."""
    out: list[str] = []
    for char in part:
        if not _replaced(char):
            out.append(char)
        elif not out or out[-1] != "_":
            out.append("_")
    return "".join(out).rstrip(" .")  # Windows drops trailing dots and spaces


def _truncated(stem: str) -> str:
    """The stem cut to at most ``MAX_STEM_BYTES`` UTF-8 bytes, at a character boundary."""
    data = stem.encode("utf-8")
    if len(data) <= MAX_STEM_BYTES:
        return stem
    return data[:MAX_STEM_BYTES].decode("utf-8", errors="ignore").rstrip(" .")


def safe_file_stem(name: str) -> str:
    r"""A file name for a sample (or line) name that keeps its letters, whatever the script.

    The name is NFC-normalized; path separators (``/``, ``\\``) split it into parts joined
    by ``__``, and ``.``/``..`` parts are dropped; control characters, bidirectional controls
    and the characters common filesystems refuse (``<>:"|?*``) become ``_``; trailing dots and
    spaces of a part and leading dots of the stem are removed; a Windows device name (``CON``,
    ``nul.txt``, ``COM1``…) gets a ``_`` after its base. Everything else — letters of any
    script, digits, spaces, punctuation — is kept. Distinct names can still give one stem
    (``a/b`` and ``a__b``, ``é`` composed or not): :func:`unique_stems` resolves that.

    Args:
        name: sample name, e.g. ``"crack/003"`` or ``"ünïcødé 名前"``.

    Returns:
        E.g. ``"crack__003"`` or ``"ünïcødé 名前"``; never empty, never starting with a dot,
        at most ``MAX_STEM_BYTES`` UTF-8 bytes.
    """
    name = unicodedata.normalize("NFC", name)
    parts = [_clean_part(p) for p in re.split(r"[/\\]+", name) if p not in ("", ".", "..")]
    stem = _truncated("__".join(p for p in parts if p).lstrip("."))
    base, dot, rest = stem.partition(".")
    if base.rstrip(" ").upper() in _RESERVED:
        stem = f"{base}_{dot}{rest}"
    return stem or "sample"


class ResultStore:
    """Writes result files under one output URL (local path, ``file://`` or ``s3://``).

    Args:
        url: the output prefix; created when missing.
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.protocol, self.root = split_url(url)
        self.fs, _ = open_filesystem(url)
        if self.protocol == "file":
            with full_names(self.url, "the output folder"):
                self.fs.makedirs(self.root, exist_ok=True)

    def path(self, relative: str) -> str:
        """The storage path of a file below the prefix.

        Raises:
            ValueError: an absolute path or one that climbs out of the prefix.
        """
        clean = posixpath.normpath(relative)
        if relative.startswith("/") or clean == ".." or clean.startswith("../"):
            raise ValueError(f"refusing to write outside the output prefix: {relative!r}")
        return f"{self.root}/{clean}"

    def location(self, relative: str) -> str:
        """A user-facing location of a file (local path, or ``s3://bucket/...``)."""
        path = self.path(relative)
        return path if self.protocol == "file" else f"s3://{path}"

    def read_bytes(self, relative: str) -> bytes:
        """Read one file below the prefix (retrying transient storage errors).

        Raises:
            FileNotFoundError: no such file.
        """
        path = self.path(relative)
        return with_retries(lambda: self.fs.cat_file(path), what=f"read {relative}")

    def list(self, relative: str) -> list[str]:
        """Names of the files directly below a folder of the prefix (empty when it is absent)."""
        path = self.path(relative)

        def listing() -> list[str]:
            try:
                entries = self.fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
            return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)

        return with_retries(listing, what=f"list {relative}")

    def write_bytes(self, relative: str, data: bytes) -> str:
        """Write one file atomically (retrying transient storage errors); returns its location.

        Readers and concurrent runs see the old file or the whole new one, never a mix: a
        local file is written beside its place and renamed over it, an S3 object is one PUT.

        Raises:
            StorageFull: no space left; the file is as it was (the temporary one removed).
        """
        with full_names(self.url, relative):
            return self._write_bytes(relative, data)

    def _write_bytes(self, relative: str, data: bytes) -> str:
        """:meth:`write_bytes` without the naming of a full storage."""
        path = self.path(relative)
        if self.protocol != "file":
            with_retries(lambda: self.fs.pipe_file(path, data), what=f"write {relative}")
            return self.location(relative)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)

        def write_and_rename() -> None:
            temporary = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                self.fs.pipe_file(temporary, data)
                os.replace(temporary, path)
            finally:
                if os.path.exists(temporary):
                    os.remove(temporary)

        with_retries(write_and_rename, what=f"write {relative}")
        return self.location(relative)

    def exists(self, relative: str) -> bool:
        """Whether a file below the prefix exists (retrying transient storage errors)."""
        path = self.path(relative)
        return with_retries(lambda: bool(self.fs.exists(path)), what=f"look up {relative}")

    def create_bytes(self, relative: str, data: bytes) -> str:
        """Create a file that must not exist yet; returns its location.

        The file appears complete or not at all and is never replaced
        (:func:`infra.storage.create_file`: a hard link on a local disk, a conditional put on
        S3). A transient error is retried; a retry that finds the file holding exactly
        ``data`` takes it as its own earlier try's.

        Raises:
            FileExistsError: the file is there already (another writer's, or an earlier run's).
            StorageFull: no space left; the file was not created.
        """
        path = self.path(relative)
        tries = 0

        def create() -> None:
            nonlocal tries
            tries += 1
            try:
                create_file(self.fs, self.protocol, path, data)
            except FileExistsError:
                if tries > 1 and self.fs.cat_file(path) == data:
                    return
                raise

        with full_names(self.url, relative):
            with_retries(create, what=f"create {relative}")
        return self.location(relative)

    def write_text(self, relative: str, text: str) -> str:
        """Write a UTF-8 text file."""
        return self.write_bytes(relative, text.encode("utf-8"))

    def write_json(self, relative: str, payload: object) -> str:
        """Write an indented JSON file."""
        return self.write_text(relative, json.dumps(payload, indent=2, allow_nan=True))

    def write_npy(self, relative: str, array: np.ndarray) -> str:
        """Write a NumPy ``.npy`` file."""
        buffer = io.BytesIO()
        np.save(buffer, array)
        return self.write_bytes(relative, buffer.getvalue())

    def write_png(self, relative: str, rgb: np.ndarray) -> str:
        """Write an (H, W, 3) uint8 image as PNG."""
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG")
        return self.write_bytes(relative, buffer.getvalue())

    def write_csv(self, relative: str, rows: Sequence[Sequence[object]], comment: str = "") -> str:
        """Write rows as CSV, optionally after a ``# comment`` line."""
        buffer = io.StringIO()
        if comment:
            buffer.write(f"# {comment}\n")
        csv.writer(buffer).writerows(rows)
        return self.write_text(relative, buffer.getvalue())


def _suffixed(stem: str, name: str, used: set[str]) -> str:
    """``stem`` with a suffix from the digest of ``name`` that no used stem has (case-folded)."""
    digest = hashlib.sha256(name.encode("utf-8", errors="surrogatepass")).hexdigest()
    candidates = itertools.chain(
        (f"{stem}_{digest[:n]}" for n in (8, 16, 64)),
        (f"{stem}_{digest}_{n}" for n in itertools.count(2)),
    )
    chosen = next(c for c in candidates if c.casefold() not in used)
    used.add(chosen.casefold())
    return chosen


def unique_stems(names: Sequence[str]) -> list[str]:
    """File stems for sample names: safe, and distinct even when names map to one stem.

    Stems are compared case-folded (``A.npy`` and ``a.npy`` are one file on Windows and macOS
    disks). Of the names sharing a stem, the first in sorted order keeps it and each other one
    gets ``_`` and the first 8 hex digits of the SHA-256 of its name (longer if that is taken
    too), so a sample's file name depends on its name and on the names it collides with, never
    on the order of the samples.

    Args:
        names: sample names.

    Returns:
        One distinct stem per name, in the same order.
    """
    stems = [safe_file_stem(n) for n in names]
    groups: dict[str, list[int]] = {}
    for index, stem in enumerate(stems):
        groups.setdefault(stem.casefold(), []).append(index)
    used = set(groups)
    out = list(stems)
    for members in groups.values():
        for index in sorted(members, key=lambda i: (names[i], i))[1:]:
            out[index] = _suffixed(stems[index], names[index], used)
    return out
