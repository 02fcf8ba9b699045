"""Where a dataset's files live: a local folder, or objects under an fsspec URL.

A dataset root (``DATA``) is a local path, a ``file://`` URL (taken as the local path), or
any other fsspec URL: ``s3://bucket/prefix`` and ``s3a://`` through the same storage layer
and credentials as ``--storage`` (:mod:`infra.storage`: the environment or the Prefect
Secret block), other protocols (``memory://``, ``gs://`` with its package installed, ...)
through ``fsspec.filesystem(protocol)`` with that package's own configuration.

For a URL root, the objects below the prefix are listed once (:class:`ObjectTree`) and the
dataset readers walk that listing through :class:`ObjectPath`, a read-only stand-in for the
part of :class:`pathlib.Path` they use. Sample records then hold the objects' URLs, which the
loaders (:func:`read_bytes`) open on whatever machine prepares the sample.

Safety: only objects whose key lies below the prefix (``prefix/``, never ``prefix2/``) are
listed, and a URL whose path inside the root has an empty, ``.`` or ``..`` segment counts as
outside the root (:func:`url_inside`): discovery sets such a sample aside unread, as it does
a local symlink that leads out of the dataset. Object stores have no links.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import fsspec

from infra.storage import (
    ENDPOINT_ENV_VARS,
    SECRET_BLOCK_ENV_VAR,
    SECRET_ENV_VARS,
    s3_storage_options,
    with_retries,
)

#: Protocols taken as the local filesystem.
LOCAL_PROTOCOLS = ("file", "local")
#: Protocols opened with :func:`infra.storage.open_filesystem` (its credentials).
STORAGE_PROTOCOLS = ("s3", "s3a")

_FILESYSTEMS: dict[tuple[int, str, str], fsspec.AbstractFileSystem] = {}
_LOCK = threading.Lock()


def is_url(location: object) -> bool:
    """Whether a dataset location is a non-local URL (``s3://…``, ``memory://…``)."""
    if not isinstance(location, str) or "://" not in location:
        return False
    return location.partition("://")[0].lower() not in LOCAL_PROTOCOLS


def local_path(location: str) -> str:
    """A local location without its ``file://`` / ``local://`` prefix (others unchanged)."""
    protocol, sep, rest = location.partition("://")
    if sep and protocol.lower() in LOCAL_PROTOCOLS:
        return rest
    return location


def split(url: str) -> tuple[str, str]:
    """``(protocol, path)`` of a URL: the path as its filesystem writes it, no trailing ``/``.

    Raises:
        ValueError: a URL without a path (``s3://``), naming it, or a protocol that cannot be
            read.
    """
    protocol, _, rest = url.partition("://")
    protocol = protocol.lower()
    if not rest.strip("/"):
        raise ValueError(f"{url!r}: a URL needs a bucket or folder (e.g. s3://bucket/line)")
    path = filesystem(protocol)._strip_protocol(url).rstrip("/")
    return protocol, path


def filesystem(protocol: str) -> fsspec.AbstractFileSystem:
    """The filesystem of a protocol, kept per process and settings.

    S3 is opened with :func:`infra.storage.s3_storage_options` (the credentials and endpoint
    of ``--storage``); a change of the environment variables they come from opens a new
    filesystem.

    Raises:
        ValueError: a protocol fsspec does not know (or whose package is not installed).
    """
    settings = (*SECRET_ENV_VARS, *ENDPOINT_ENV_VARS, SECRET_BLOCK_ENV_VAR)
    key = (os.getpid(), protocol, repr([os.environ.get(name) for name in settings]))
    with _LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            if protocol in STORAGE_PROTOCOLS:
                import s3fs

                fs = s3fs.S3FileSystem(**s3_storage_options())
            else:
                try:
                    fs = fsspec.filesystem(protocol)
                except (ValueError, ImportError) as error:
                    raise ValueError(
                        f"{protocol}:// URLs cannot be read here ({error}); use a local path "
                        "or s3://bucket/prefix"
                    ) from None
            _FILESYSTEMS[key] = fs
    return fs


def url_inside(url: str, root: str) -> bool:
    """Whether an object URL lies below a root URL, by its literal path.

    The URL must have the root's protocol, start with the root's path and ``/``, and its
    remaining path may not hold an empty, ``.`` or ``..`` segment (no escape by a crafted
    key or a ``../`` in a VisA split file).
    """
    if not (is_url(url) and is_url(root)):
        return False
    protocol, path = url.partition("://")[0].lower(), url.partition("://")[2]
    try:
        root_protocol, root_path = split(root)
    except ValueError:
        return False
    if protocol != root_protocol:
        return False
    path = path.lstrip("/")
    if root_path.startswith("/"):
        path = "/" + path
    if not path.startswith(root_path + "/"):
        return False
    rest = path[len(root_path) + 1 :].split("/")
    return all(part not in ("", ".", "..") for part in rest)


def _retried(fn: Any, what: str) -> Any:
    return with_retries(fn, what=what)


def object_size(url: str) -> int | None:
    """Size in bytes of the object at ``url``, None when it is not a file.

    Raises:
        FileNotFoundError: no object there.
    """
    protocol, path = split(url)
    fs = filesystem(protocol)
    info = _retried(lambda: fs.info(path), f"looking up {url}")
    if info.get("type") != "file":
        return None
    return int(info.get("size") or 0)


def is_folder(location: str) -> bool:
    """Whether a local path or a URL names a folder (for a URL: a prefix holding objects)."""
    if not is_url(location):
        return Path(local_path(location)).is_dir()
    protocol, path = split(location)
    fs = filesystem(protocol)
    return bool(_retried(lambda: fs.isdir(path), f"looking up {location}"))


def content_digest(url: str, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of the object's bytes, read in chunks (never the store's ETag).

    Raises:
        FileNotFoundError: no object there.
        OSError: the store refused the read.
    """
    protocol, path = split(url)
    fs = filesystem(protocol)

    def digest() -> str:
        hashed = hashlib.sha256()
        with fs.open(path, "rb", block_size=chunk) as handle:
            while block := handle.read(chunk):
                hashed.update(block)
        return hashed.hexdigest()

    return _retried(digest, f"reading {url}")


def read_bytes(url: str) -> bytes:
    """The whole content of the object at ``url`` (retried on transient errors).

    Raises:
        FileNotFoundError: no object there.
        OSError: the store refused the read (the message names the URL).
    """
    protocol, path = split(url)
    fs = filesystem(protocol)
    return _retried(lambda: fs.cat_file(path), f"reading {url}")


@dataclass
class ObjectTree:
    """The files below a URL root, listed once.

    Attributes:
        protocol: the URL's protocol (``s3``, ``memory``, ...).
        root: the root's path inside the filesystem (``bucket/prefix``), no trailing ``/``.
        files: every object below the root by path, with its size in bytes.
        dirs: every folder implied by those paths, the root included.
    """

    protocol: str
    root: str
    files: dict[str, int] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)

    @classmethod
    def list(cls, url: str) -> ObjectTree:
        """List the objects below ``url`` (one recursive listing).

        Raises:
            FileNotFoundError: nothing below the URL (no such bucket, or an empty prefix),
                naming the URL.
            ValueError: a URL without a path, or a protocol that cannot be read.
        """
        protocol, root = split(url)
        fs = filesystem(protocol)
        try:
            found = _retried(
                lambda: fs.find(root, withdirs=False, detail=True), f"listing {url}"
            )
        except FileNotFoundError:
            found = {}
        tree = cls(protocol, root)
        for path, info in found.items():
            path = path if protocol not in STORAGE_PROTOCOLS else path.lstrip("/")
            if info.get("type") != "file" or not path.startswith(root + "/"):
                continue
            if path.endswith("/"):
                continue
            tree.files[path] = int(info.get("size") or 0)
            parent = posixpath.dirname(path)
            while parent.startswith(root + "/") and parent not in tree.dirs:
                tree.dirs.add(parent)
                parent = posixpath.dirname(parent)
        if not tree.files:
            raise FileNotFoundError(f"{url}: no objects found (no such bucket or prefix)")
        tree.dirs.add(root)
        return tree

    def children(self, folder: str) -> list[str]:
        """Paths of the files and folders directly inside ``folder``."""
        prefix = folder + "/"
        out = {
            prefix + path[len(prefix) :].split("/", 1)[0]
            for path in self.files
            if path.startswith(prefix)
        }
        return sorted(out)

    def path(self) -> ObjectPath:
        """The root as an :class:`ObjectPath`."""
        return ObjectPath(self, self.root)


@dataclass(frozen=True, eq=False)
class ObjectPath:
    """A path in an :class:`ObjectTree`: the read-only part of ``pathlib.Path`` readers use.

    ``str()`` gives the object's URL.

    Attributes:
        tree: the listing it belongs to.
        key: its path inside the filesystem (``bucket/prefix/…``).
    """

    tree: ObjectTree
    key: str

    def __str__(self) -> str:
        return f"{self.tree.protocol}://{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __lt__(self, other: ObjectPath) -> bool:
        return PurePosixPath(self.key) < PurePosixPath(other.key)

    def __truediv__(self, part: str | os.PathLike) -> ObjectPath:
        return self.joinpath(part)

    def joinpath(self, *parts: str | os.PathLike) -> ObjectPath:
        """The path with ``parts`` appended literally (``..`` is kept, see :func:`url_inside`)."""
        key = self.key
        for part in parts:
            text = os.fspath(part).replace("\\", "/").strip("/")
            if text:
                key = f"{key}/{text}"
        return ObjectPath(self.tree, key)

    @property
    def name(self) -> str:
        """Last path segment."""
        return PurePosixPath(self.key).name

    @property
    def stem(self) -> str:
        """Last segment without its suffix."""
        return PurePosixPath(self.key).stem

    @property
    def suffix(self) -> str:
        """Suffix of the last segment (``.png``)."""
        return PurePosixPath(self.key).suffix

    @property
    def parent(self) -> ObjectPath:
        """The folder holding this path."""
        return ObjectPath(self.tree, posixpath.dirname(self.key))

    def relative_to(self, other: ObjectPath) -> PurePosixPath:
        """This path relative to ``other``.

        Raises:
            ValueError: not below ``other``.
        """
        return PurePosixPath(self.key).relative_to(PurePosixPath(other.key))

    def resolve(self) -> ObjectPath:
        """Itself: object stores have no links."""
        return self

    def exists(self) -> bool:
        """Whether an object or a folder of objects is there."""
        return self.is_file() or self.is_dir()

    def is_dir(self) -> bool:
        """Whether objects lie below this path."""
        return self.key in self.tree.dirs

    def is_file(self) -> bool:
        """Whether an object has this path."""
        return self.key in self.tree.files

    def is_symlink(self) -> bool:
        """Never: object stores have no links."""
        return False

    def iterdir(self) -> Iterator[ObjectPath]:
        """The files and folders directly inside this folder, sorted."""
        for key in self.tree.children(self.key):
            yield ObjectPath(self.tree, key)

    def walk_files(self) -> list[ObjectPath]:
        """Every object below this folder, sorted."""
        prefix = self.key + "/"
        return sorted(ObjectPath(self.tree, k) for k in self.tree.files if k.startswith(prefix))

    def open(self, mode: str = "rb", newline: str | None = None, encoding: str | None = None
             ) -> IO:
        """The object's content in memory (read once), as bytes or text.

        Raises:
            FileNotFoundError: no such object.
        """
        import io

        data = read_bytes(str(self))
        if "b" in mode:
            return io.BytesIO(data)
        return io.StringIO(data.decode(encoding or "utf-8"), newline=newline)
