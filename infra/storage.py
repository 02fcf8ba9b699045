"""Filesystems for the cache and results: local paths, ``file://`` and ``s3://`` URLs.

The S3 endpoint and credentials come only from the environment, never from code or arguments:

- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN`` if set),
- ``MUSC_S3_ENDPOINT_URL`` (takes precedence) or ``AWS_ENDPOINT_URL`` for S3-compatible servers,

or, when the key variables are not set, from a Prefect ``Secret`` block named by
``MUSC_S3_SECRET_BLOCK`` whose value is a JSON object with ``aws_access_key_id``,
``aws_secret_access_key`` and optionally ``aws_session_token`` and ``endpoint_url``.

Every filesystem is opened with ``skip_instance_cache=True`` and ``use_listings_cache=False`` so a
long-lived process (a Dask worker, a Prefect server) sees entries written by other processes.
Nothing here logs credentials; use :func:`redact` before logging any text that might contain
them (exception messages, storage options).
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Environment variables whose values are secrets and are masked by :func:`redact`.
SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
#: Environment variables naming an S3 endpoint, in order of precedence.
ENDPOINT_ENV_VARS = ("MUSC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
_MASK = "***"


#: Environment variable naming a Prefect Secret block with S3 credentials.
SECRET_BLOCK_ENV_VAR = "MUSC_S3_SECRET_BLOCK"
_BLOCK_SECRETS: set[str] = set()


def _block_credentials() -> dict[str, str]:
    """S3 credentials from the Prefect Secret block named by ``MUSC_S3_SECRET_BLOCK`` ({} if unset).

    Raises:
        ValueError: the block does not hold the expected JSON object (the message names the
            block and the missing fields, never a value).
    """
    name = os.environ.get(SECRET_BLOCK_ENV_VAR, "").strip()
    if not name:
        return {}
    from prefect.blocks.system import Secret

    value = Secret.load(name).get()
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError:
            value = None
    required = ("aws_access_key_id", "aws_secret_access_key")
    if not isinstance(value, dict) or any(not value.get(k) for k in required):
        raise ValueError(
            f"Prefect Secret block {name!r} must hold a JSON object with {required} "
            "(and optionally aws_session_token, endpoint_url)"
        )
    credentials = {k: str(v) for k, v in value.items() if v}
    _BLOCK_SECRETS.update(
        credentials[k] for k in (*required, "aws_session_token") if k in credentials
    )
    return credentials


def redact(text: str) -> str:
    """Mask the values of the secret environment variables wherever they appear in ``text``.

    Args:
        text: any string about to be logged or shown (an error message, a repr of options).

    Returns:
        ``text`` with every occurrence of the current values of :data:`SECRET_ENV_VARS`
        replaced by ``***`` (longest values first, so a secret containing another is masked
        whole).
    """
    secrets = [os.environ.get(name, "") for name in SECRET_ENV_VARS] + sorted(_BLOCK_SECRETS)
    for value in sorted((v for v in secrets if v), key=len, reverse=True):
        text = text.replace(value, _MASK)
    return text


def s3_endpoint_url() -> str | None:
    """The S3 endpoint URL from the environment, or None for AWS's default endpoint."""
    for name in ENDPOINT_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def s3_storage_options(asynchronous: bool = False) -> dict[str, Any]:
    """s3fs constructor options built from the environment (or the Prefect Secret block).

    Args:
        asynchronous: open the filesystem in async mode (what Zarr's ``FsspecStore`` needs).

    Returns:
        Keyword arguments for ``s3fs.S3FileSystem``. They contain the credentials, so never log
        them (pass any text made from them through :func:`redact`).
    """
    options: dict[str, Any] = {
        "skip_instance_cache": True,
        "use_listings_cache": False,
        "asynchronous": asynchronous,
    }
    endpoint = s3_endpoint_url()
    key = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    token = os.environ.get("AWS_SESSION_TOKEN")
    if not (key and secret):
        block = _block_credentials()
        key, secret = block.get("aws_access_key_id"), block.get("aws_secret_access_key")
        token = block.get("aws_session_token")
        endpoint = endpoint or block.get("endpoint_url")
    if endpoint:
        options["endpoint_url"] = endpoint
    if key and secret:
        options["key"] = key
        options["secret"] = secret
        if token:
            options["token"] = token
    return options


def split_url(url: str) -> tuple[str, str]:
    """Split a storage URL into ``(protocol, root_path)``.

    Args:
        url: a local path, ``file://…`` or ``s3://bucket/prefix``.

    Returns:
        ``("file", absolute_path)`` or ``("s3", "bucket/prefix")`` (no trailing slash).

    Raises:
        ValueError: for an unsupported protocol or an S3 URL without a bucket.
    """
    protocol, _, rest = url.partition("://")
    if not _:
        return "file", os.path.abspath(os.path.expanduser(url)).rstrip("/") or "/"
    protocol = protocol.lower()
    if protocol in ("file", "local"):
        return "file", os.path.abspath(rest).rstrip("/") or "/"
    if protocol in ("s3", "s3a"):
        root = rest.strip("/")
        if not root:
            raise ValueError(f"S3 URL without a bucket: {url!r}")
        return "s3", root
    raise ValueError(f"unsupported storage protocol {protocol!r} in {url!r} (use a path or s3://)")


def open_filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Open the filesystem of a storage URL.

    Args:
        url: a local path, ``file://…`` or ``s3://bucket/prefix``.

    Returns:
        ``(fs, root_path)``: a synchronous fsspec filesystem (no instance or listings cache) and
        the root path inside it (absolute local path, or ``bucket/prefix`` for S3).
    """
    protocol, root = split_url(url)
    if protocol == "file":
        return LocalFileSystem(skip_instance_cache=True, use_listings_cache=False), root
    import s3fs

    return s3fs.S3FileSystem(**s3_storage_options(asynchronous=False)), root


def open_async_filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Like :func:`open_filesystem`, but an async filesystem for Zarr's ``FsspecStore`` (S3 only).

    Args:
        url: an ``s3://bucket/prefix`` URL.

    Returns:
        ``(fs, root_path)`` with ``fs`` created with ``asynchronous=True``.

    Raises:
        ValueError: for local URLs (use a Zarr ``LocalStore`` there).
    """
    protocol, root = split_url(url)
    if protocol != "s3":
        raise ValueError("async filesystems are only used for s3:// URLs")
    import s3fs

    return s3fs.S3FileSystem(**s3_storage_options(asynchronous=True)), root


def _importable(*names: tuple[str, str]) -> list[type[BaseException]]:
    """The exception classes among ``(module, class name)`` pairs whose module is installed."""
    found = []
    for module, name in names:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except ImportError:  # pragma: no cover - botocore and aiohttp come with s3fs
            continue
    return found


def _transient_types() -> tuple[type[BaseException], ...]:
    return (
        OSError,
        ConnectionError,
        TimeoutError,
        *_importable(
            ("botocore.exceptions", "BotoCoreError"),
            ("botocore.exceptions", "ClientError"),
            ("aiohttp", "ClientError"),
        ),
    )


#: Errors that are never transient even though they subclass OSError.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


#: S3 error codes worth retrying (throttling, timeouts, server trouble).
TRANSIENT_S3_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
     "InternalError", "ServiceUnavailable", "503", "500"}
)


def _permanent_botocore(exc: BaseException) -> bool:
    """Credential and parameter errors, and S3 client errors that a retry cannot fix."""
    try:
        from botocore.exceptions import (
            ClientError,
            NoCredentialsError,
            ParamValidationError,
            PartialCredentialsError,
        )
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        return False
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, ParamValidationError)):
        return True
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return not (error.get("Code") in TRANSIENT_S3_CODES or status >= 500 or status == 429)
    return False


#: Seconds a storage call keeps retrying an endpoint that refuses connections or whose name
#: does not resolve, before :class:`StorageUnreachable` is raised.
UNREACHABLE_SECONDS = 20.0


class StorageUnreachable(RuntimeError):
    """The storage endpoint refused connections (or its name did not resolve) for a while.

    Not a transient error: the call was already retried for :data:`UNREACHABLE_SECONDS`, so
    neither :func:`with_retries` nor Prefect retries it again.
    """


def _unreachable_types() -> tuple[type[BaseException], ...]:
    return (
        ConnectionRefusedError,
        socket.gaierror,
        *_importable(
            ("botocore.exceptions", "EndpointConnectionError"),
            ("aiohttp", "ClientConnectorError"),
        ),
    )


def _chain(exc: BaseException, depth: int = 8) -> Iterator[BaseException]:
    """An error and the ones it was raised from (``__cause__``, else a kept ``__context__``)."""
    seen: BaseException | None = exc
    for _ in range(depth):
        if seen is None:
            return
        yield seen
        if seen.__cause__ is not None:
            seen = seen.__cause__
        else:
            seen = None if seen.__suppress_context__ else seen.__context__


def is_unreachable(exc: BaseException) -> bool:
    """Whether an error (or one it was raised from) says the endpoint is not there at all.

    Refused connections and failed name lookups, as opposed to a dropped connection, a
    timeout or a 5xx of a server that is there.
    """
    types = (StorageUnreachable, *_unreachable_types())
    return any(isinstance(seen, types) for seen in _chain(exc))


#: ``errno`` values of a storage without room: no space left on the device, or the user's
#: disk quota spent.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: S3 error codes (and HTTP status) of an S3-compatible store without room left.
NO_SPACE_S3_CODES = frozenset({"XMinioStorageFull", "InsufficientStorage", "507"})


class StorageFull(RuntimeError):
    """No space is left on a storage (``ENOSPC``, or a disk quota spent).

    Not a transient error: a retry cannot make room, so neither :func:`with_retries` nor
    Prefect retries it. The message names the storage and says what to do.

    Attributes:
        location: the storage (a path or an ``s3://`` URL, redacted) that is full.
        what: what was being written when the space ran out.
    """

    def __init__(self, location: str, what: str) -> None:
        self.location = redact(location)
        self.what = what
        super().__init__(
            f"no space left on the storage {self.location} (while writing {what}); free space "
            "there or use a larger storage, and re-run: what was stored is reused"
        )

    def __reduce__(self) -> tuple:
        return (type(self), (self.location, self.what))  # across process boundaries


def is_full(exc: BaseException) -> bool:
    """Whether an error (or one it was raised from) says the storage has no space left.

    A :class:`StorageFull`, an ``OSError`` with ``errno`` ``ENOSPC`` or ``EDQUOT``, or an S3
    error of a store without room (MinIO's ``XMinioStorageFull``, HTTP 507).
    """
    return any(
        isinstance(seen, StorageFull)
        or (isinstance(seen, OSError) and seen.errno in NO_SPACE_ERRNOS)
        or any(part in NO_SPACE_S3_CODES for part in _s3_error(seen))
        for seen in _chain(exc)
    )


@contextmanager
def full_names(location: str, what: str) -> Iterator[None]:
    """Raise a storage-has-no-space error of the enclosed writes as :class:`StorageFull`.

    Args:
        location: the storage written to (a path or URL; redacted in the message).
        what: what is written, for the message (``"a cache entry"``).

    Raises:
        StorageFull: from the original error, when :func:`is_full` says so; any other error
            passes unchanged.
    """
    try:
        yield
    except StorageFull:
        raise
    except Exception as error:
        if is_full(error):
            raise StorageFull(location, what) from error
        raise


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying (network, throttling, 5xx).

    Missing files, refused permissions, missing credentials, a storage without space left
    and other client errors are not: they fail at once with their message; nor is
    :class:`StorageUnreachable` (already retried).
    """
    if isinstance(exc, (StorageUnreachable, *PERMANENT_ERRORS)) or _permanent_botocore(exc):
        return False
    if is_full(exc):
        return False
    return isinstance(exc, _transient_types())


def tcp_reachable(url: str, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the host and port of ``url`` opens within ``timeout`` s.

    A failed name lookup, a refused connection and a timeout all count as unreachable. The
    name lookup is bounded too (it runs in a daemon thread): a resolver that hangs counts as
    a timeout.
    """
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    opened: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((parts.hostname or "", port), timeout=timeout):
                opened.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, name="storage probe", daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(opened)


def _unreachable(what: str, error: BaseException, seconds: float) -> StorageUnreachable:
    endpoint = s3_endpoint_url() or "the default AWS endpoint"
    return StorageUnreachable(
        f"{what}: the storage cannot be reached ({redact(f'{type(error).__name__}: {error}')}; "
        f"tried for {seconds:.0f} s); check that {endpoint} is up (MUSC_S3_ENDPOINT_URL / "
        "AWS_ENDPOINT_URL) and re-run: what was stored is reused"
    )


def require_s3_endpoint() -> None:
    """Check, within 2 s, that the configured S3 endpoint accepts a TCP connection.

    Raises:
        StorageUnreachable: the endpoint refused the connection or did not resolve.
    """
    endpoint = s3_endpoint_url() or "https://s3.amazonaws.com"
    if not tcp_reachable(endpoint):
        raise StorageUnreachable(
            f"the S3 endpoint {endpoint} refuses connections or does not resolve; start it or "
            "point MUSC_S3_ENDPOINT_URL / AWS_ENDPOINT_URL at it"
        )


def _user() -> str:
    """This process's effective user, for messages: ``user nobody (uid 65534)``."""
    uid = os.geteuid()
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def check_writable(url: str) -> None:
    """Check that a storage URL can be written, quickly and without retries.

    Local: the nearest existing folder must be writable by this process's user, the folder is
    created when missing and a probe file written and removed. S3: the
    endpoint must accept a TCP connection within 2 s, then a probe object is written and
    removed with one try (credentials, bucket and write permission in one go).

    Raises:
        NotADirectoryError: a local path that is (or lies below) a file.
        PermissionError: the folder cannot be written, or S3 refused the credentials.
        FileNotFoundError: the S3 bucket does not exist.
        StorageUnreachable: the S3 endpoint refused the connection or did not resolve.
        ValueError: an unsupported URL.
    """
    protocol, root = split_url(url)
    probe = f".musc-write-probe-{uuid.uuid4().hex}"
    if protocol == "file":
        path = root
        while not os.path.exists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            raise NotADirectoryError(f"{path} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"the folder {path} is not writable by {_user()}")
        os.makedirs(root, exist_ok=True)
        target = os.path.join(root, probe)
        with open(target, "wb"):
            pass
        os.remove(target)
        return
    require_s3_endpoint()
    import s3fs

    options = s3_storage_options()
    options["config_kwargs"] = {
        "connect_timeout": 3, "read_timeout": 10, "retries": {"max_attempts": 1},
    }
    fs = s3fs.S3FileSystem(**options)
    fs.retries = 1
    try:
        fs.pipe_file(f"{root}/{probe}", b"")
        fs.rm_file(f"{root}/{probe}")
    except Exception as error:
        if isinstance(error, PERMANENT_ERRORS):
            raise
        if is_unreachable(error):
            raise StorageUnreachable(redact(str(error))) from error
        raise PermissionError(redact(f"{type(error).__name__}: {error}")) from error


#: S3 error codes of a store that refuses a conditional put (``If-None-Match: *``) instead of
#: honouring it (an HTTP status 501 says the same).
CONDITIONAL_PUT_REFUSED = frozenset({"NotImplemented", "InvalidArgument", "InvalidRequest"})
#: ``errno`` values of a local filesystem without hard links (``os.link``).
_NO_HARD_LINKS = frozenset(
    {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}
)


def _exists_already(where: str) -> FileExistsError:
    return FileExistsError(errno.EEXIST, "exists already (files created once are never replaced)",
                           where)


def _create_local(path: str, data: bytes) -> None:
    """Create a local file that must not exist, complete or not at all.

    The data goes to a temporary file beside the target, is flushed to disk and hard-linked
    to the target (which fails if the target exists); a filesystem without hard links gets
    an exclusive create (``O_EXCL``) and the data written into it instead.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(temporary, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise _exists_already(path) from None
        except OSError as error:
            if error.errno not in _NO_HARD_LINKS:
                raise
            _create_exclusive(path, data)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _create_exclusive(path: str, data: bytes) -> None:
    """``O_CREAT | O_EXCL`` and a write: the fallback where hard links are not supported."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        raise _exists_already(path) from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.remove(path)
        raise


def _s3_error(error: BaseException) -> tuple[str, str]:
    """The S3 error code and HTTP status behind an error (``("", "")`` when there is none)."""
    seen: BaseException | None = error
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            return code, str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        seen = seen.__cause__
    return "", ""


def _refused_condition(error: BaseException) -> bool:
    """Whether an S3 error says the store does not take ``If-None-Match`` on a put."""
    if isinstance(error, NotImplementedError):
        return True
    code, status = _s3_error(error)
    if code or status:
        return code in CONDITIONAL_PUT_REFUSED or status == "501"
    return isinstance(error, OSError) and error.errno == errno.ENOSYS


def _create_object(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Create an S3 object that must not exist: a conditional put, else a checked put.

    The object is looked up first (any store: a re-run finds it), then put with
    ``If-None-Match: *`` (AWS S3 and the stores that implement it refuse the put when the
    object appeared meanwhile). A store that refuses the condition gets a plain put after the
    look-up: two writers could then both create the object only when they name it in the same
    instant, which random ids make practically impossible.
    """
    where = f"s3://{path}"
    if fs.exists(path):
        raise _exists_already(where)
    try:
        fs.pipe_file(path, data, mode="create")
        return
    except FileExistsError:
        raise _exists_already(where) from None
    except Exception as error:
        code, status = _s3_error(error)
        if code == "PreconditionFailed" or status == "412":
            raise _exists_already(where) from None
        if not _refused_condition(error):
            raise
        log.warning(
            "the object store refused a conditional put (%s); %s was looked up before a plain "
            "put instead", redact(f"{type(error).__name__}: {error}"), where,
        )
    if fs.exists(path):
        raise _exists_already(where)
    fs.pipe_file(path, data)


def create_file(fs: fsspec.AbstractFileSystem, protocol: str, path: str, data: bytes) -> None:
    """Create a file that must not exist yet; it appears complete or not at all. One try.

    Args:
        fs: the filesystem (:func:`open_filesystem`).
        protocol: ``"file"`` or ``"s3"`` (:func:`split_url`).
        path: the file's path in ``fs`` (absolute local path, or ``bucket/key``).
        data: the file's bytes.

    Raises:
        FileExistsError: the file is there already (it is left as it is).
    """
    if protocol == "file":
        _create_local(path, data)
    else:
        _create_object(fs, path, data)


def with_retries(
    fn: Callable[[], T],
    *,
    attempts: int = 4,
    base_delay: float = 0.2,
    max_delay: float = 5.0,
    what: str = "storage operation",
) -> T:
    """Call ``fn`` and retry it with exponential backoff (and jitter) on transient errors.

    Args:
        fn: the operation, without arguments.
        attempts: total number of tries (>= 1).
        base_delay: seconds before the second try; doubled for each further one.
        max_delay: cap on a single wait, seconds.
        what: a short description used in the (redacted) log message.

    Returns:
        What ``fn`` returns.

    Raises:
        StorageUnreachable: the endpoint refused connections (or did not resolve) on every
            try, or for more than :data:`UNREACHABLE_SECONDS`.
        Exception: the last error once the attempts are spent, or at once any non-transient
            error (see :func:`is_transient`).
    """
    attempts = max(1, int(attempts))
    first_failure: float | None = None
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if is_unreachable(exc) and not isinstance(exc, StorageUnreachable):
                first_failure = first_failure or time.monotonic()
                waited = time.monotonic() - first_failure
                if attempt == attempts or waited > UNREACHABLE_SECONDS:
                    raise _unreachable(what, exc, waited) from exc
            if attempt == attempts or not is_transient(exc):
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            log.warning(
                "%s failed (attempt %d/%d: %s); retrying in %.2fs",
                what,
                attempt,
                attempts,
                redact(f"{type(exc).__name__}: {exc}"),
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
