"""Shared test set-up: quiet, offline, deterministic; GPU tests skipped without CUDA."""

import json
import os
import socket

import pytest
import torch

BUCKET = "musc-test-cache"

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------- chaos records
#: File (JSON lines) where chaos tests record what they tried; ``make chaos`` sets it.
CHAOS_LOG_ENV = "MUSC_CHAOS_LOG"


@pytest.fixture
def chaos_record(request):
    """Record one tried input or injected fault for ``make chaos``'s summary table.

    Fields: ``kind`` (``input``, ``fault`` or ``run``), ``what``, ``runs`` started,
    ``completed`` runs, ``samples`` concerned, ``lost`` samples (neither scored nor listed as
    set aside, or missing from a result that should hold them), and any detail. Nothing is
    written unless ``$MUSC_CHAOS_LOG`` names a file.
    """

    def record(**fields) -> None:
        path = os.environ.get(CHAOS_LOG_ENV)
        if path:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"test": request.node.nodeid, **fields}) + "\n")

    return record


# --------------------------------------------------------------------------- S3 (moto server)
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_url(moto_endpoint, monkeypatch, tmp_path):
    # Fake credentials, the local endpoint only; no proxy, no metadata service, no config files.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.delenv("MUSC_S3_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    from infra.storage import open_filesystem

    fs, _ = open_filesystem(f"s3://{BUCKET}")
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    return f"s3://{BUCKET}/{tmp_path.name}/cache"


@pytest.fixture
def s3_env(s3_url):
    """The S3 environment of ``s3_url`` and the bucket's root URL for this test."""
    return s3_url.rsplit("/", 1)[0]


# --------------------------------------------------------------------------- Prefect
@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A Prefect server on 127.0.0.1 for the whole session (embedded SQLite)."""
    from infra.prefect_api import prefect_api

    os.environ.pop("PREFECT_API_URL", None)
    with prefect_api(tmp_path_factory.mktemp("prefect-home"), timeout=90) as url:
        yield url
