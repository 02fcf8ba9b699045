import errno
import logging
import os
import pickle

import pytest
from botocore.exceptions import ClientError

from infra import storage
from infra.storage import open_filesystem, redact, split_url, with_retries


@pytest.fixture
def fake_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEKEYID123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake/secret+value/xyz")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok-fake-session")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("MUSC_S3_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_redact_masks_secret_values(fake_env):
    text = (
        "key=AKIAFAKEKEYID123 secret='fake/secret+value/xyz' token=tok-fake-session "
        "endpoint=http://127.0.0.1:9"
    )
    out = redact(text)
    assert "AKIAFAKEKEYID123" not in out
    assert "fake/secret+value/xyz" not in out
    assert "tok-fake-session" not in out
    assert out.count("***") == 3
    assert "http://127.0.0.1:9" in out  # the endpoint is not a secret
    assert redact("nothing to hide") == "nothing to hide"


def test_redact_without_secrets_in_env(monkeypatch):
    for name in storage.SECRET_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert redact("abc") == "abc"


def test_s3_filesystem_uses_env_endpoint_and_credentials(fake_env):
    fs, root = open_filesystem("s3://bucket/some/prefix/")
    assert root == "bucket/some/prefix"
    assert fs.endpoint_url == "http://127.0.0.1:9"
    assert fs.key == "AKIAFAKEKEYID123"
    assert fs.secret == "fake/secret+value/xyz"
    assert fs.dircache.use_listings_cache is False
    # No instance cache: a second open is a fresh object.
    assert open_filesystem("s3://bucket/some/prefix")[0] is not fs


def test_musc_endpoint_takes_precedence(fake_env, monkeypatch):
    monkeypatch.setenv("MUSC_S3_ENDPOINT_URL", "http://127.0.0.1:10")
    fs, _ = open_filesystem("s3://bucket")
    assert fs.endpoint_url == "http://127.0.0.1:10"


def test_async_filesystem_for_zarr(fake_env):
    fs, root = storage.open_async_filesystem("s3://bucket/p")
    assert fs.asynchronous and fs.endpoint_url == "http://127.0.0.1:9" and root == "bucket/p"
    with pytest.raises(ValueError):
        storage.open_async_filesystem("/tmp/x")


def test_local_paths(tmp_path):
    fs, root = open_filesystem(str(tmp_path / "cache"))
    assert root == str(tmp_path / "cache")
    assert fs.protocol[0] == "file"
    assert open_filesystem(f"file://{tmp_path}/c/")[1] == f"{tmp_path}/c"
    assert split_url("s3://b/x/") == ("s3", "b/x")
    with pytest.raises(ValueError):
        split_url("gs://b/x")
    with pytest.raises(ValueError):
        split_url("s3://")


def test_with_retries_backs_off_on_transient_errors_and_redacts(fake_env, caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset talking with secret fake/secret+value/xyz")
        return "ok"

    with caplog.at_level(logging.WARNING, logger="infra.storage"):
        assert with_retries(flaky, attempts=3, base_delay=0.001) == "ok"
    assert len(calls) == 3
    assert "fake/secret+value/xyz" not in caplog.text and "***" in caplog.text


def test_with_retries_gives_up_and_skips_permanent_errors():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("x")

    with pytest.raises(FileNotFoundError):
        with_retries(missing, attempts=5, base_delay=0.001)
    assert len(calls) == 1

    def down():
        calls.append(1)
        raise OSError("down")

    calls.clear()
    with pytest.raises(OSError):
        with_retries(down, attempts=3, base_delay=0.001)
    assert len(calls) == 3


@pytest.mark.s3
def test_s3_credentials_from_a_prefect_secret_block(prefect_server, s3_url, monkeypatch):
    import json
    import uuid

    from prefect.blocks.system import Secret

    from infra.storage import s3_storage_options

    key, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    name = f"musc-s3-{uuid.uuid4().hex[:8]}"
    value = {"aws_access_key_id": key, "aws_secret_access_key": secret, "endpoint_url": endpoint}
    Secret(value=json.dumps(value)).save(name)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("MUSC_S3_SECRET_BLOCK", name)
    options = s3_storage_options()
    assert options["key"] == key and options["endpoint_url"] == endpoint
    fs, root = open_filesystem(s3_url)
    fs.pipe_file(f"{root}/block.txt", b"ok")
    assert fs.cat_file(f"{root}/block.txt") == b"ok"
    assert secret not in redact(f"failed with {secret}")
    Secret(value=json.dumps({"aws_access_key_id": key})).save(name, overwrite=True)
    with pytest.raises(ValueError, match="must hold") as error:
        s3_storage_options()
    assert key not in str(error.value)


# --------------------------------------------------------------------------- no space left
def _no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_storage_without_space_is_recognised_however_the_error_is_wrapped():
    assert storage.is_full(_no_space())
    assert storage.is_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise _no_space()
        except OSError as error:
            raise RuntimeError("zarr could not write a chunk") from error
    except RuntimeError as wrapped:
        assert storage.is_full(wrapped)
    minio = ClientError(
        {"Error": {"Code": "XMinioStorageFull", "Message": "Storage backend has reached its "
                   "minimum free drive threshold."},
         "ResponseMetadata": {"HTTPStatusCode": 507}}, "PutObject")
    assert storage.is_full(minio)
    assert not storage.is_full(OSError(errno.EIO, "Input/output error"))
    assert not storage.is_full(PermissionError(errno.EACCES, "Permission denied"))
    assert not storage.is_full(ValueError("No space left on device"))  # only the errno counts


def test_no_space_left_is_not_retried(fake_env):
    calls = []

    def write():
        calls.append(1)
        raise _no_space()

    with pytest.raises(OSError) as raised:
        with_retries(write, attempts=4, base_delay=0.001)
    assert raised.value.errno == errno.ENOSPC and len(calls) == 1
    assert not storage.is_transient(_no_space())
    assert not storage.is_transient(storage.StorageFull("/mnt/cache", "a cache entry"))


def test_full_names_turns_no_space_into_one_error_naming_the_storage(fake_env):
    url = "s3://bucket/store?secret=fake/secret+value/xyz"
    with pytest.raises(storage.StorageFull) as raised:
        with storage.full_names(url, "a cache entry"):
            raise _no_space()
    full = raised.value
    assert full.location == "s3://bucket/store?secret=***" and full.what == "a cache entry"
    assert str(full).startswith("no space left on the storage s3://bucket/store?secret=***")
    assert "free space there" in str(full) and "fake/secret" not in str(full)
    assert isinstance(full.__cause__, OSError)
    copy = pickle.loads(pickle.dumps(full))  # as a Dask worker hands it back
    assert (type(copy), copy.location, copy.what, str(copy)) == (
        storage.StorageFull, full.location, full.what, str(full)
    )
    with pytest.raises(OSError) as other:  # any other error passes unchanged
        with storage.full_names(url, "a cache entry"):
            raise OSError(errno.EIO, "Input/output error")
    assert other.value.errno == errno.EIO
