"""Where a run's results go: a local folder or an ``s3://`` prefix, written through fsspec.

Nothing is ever written outside the configured output prefix: every relative path is checked
(no absolute paths, no ``..``), and sample names become file names only through
:func:`safe_file_stem`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
import uuid
from collections.abc import Sequence

import numpy as np
from PIL import Image

from infra.storage import open_filesystem, split_url, with_retries
from tasks.choices import RANDOM_WEIGHTS_WARNING as RANDOM_WEIGHTS_WARNING  # re-exported

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_stem(name: str) -> str:
    """A file-name-safe version of a sample name (no separators, no '..', stable).

    Args:
        name: sample name, e.g. ``"crack/003"``.

    Returns:
        E.g. ``"crack__003"``; never empty, never starting with a dot.
    """
    parts = [_UNSAFE.sub("_", p) for p in re.split(r"[/\\]+", name) if p not in ("", ".", "..")]
    stem = "__".join(p for p in parts if p).lstrip(".")
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
        """
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


def unique_stems(names: Sequence[str]) -> list[str]:
    """File stems for sample names: safe, and distinct even when two names map to one stem."""
    stems: list[str] = []
    used: set[str] = set()
    for index, name in enumerate(names):
        stem = safe_file_stem(name)
        while stem in used:
            stem = f"{stem}_{index}"
        used.add(stem)
        stems.append(stem)
    return stems
