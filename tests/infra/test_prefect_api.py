"""The local Prefect server of a command: work done while it starts, and its shutdown."""

from __future__ import annotations

import subprocess

import pytest

import infra.prefect_api as prefect_api
from infra.prefect_api import start_server, stop_server


@pytest.fixture
def launched(monkeypatch):
    """The server processes :func:`start_server` launches in a test."""
    processes: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen(*args, **options):
        process = real_popen(*args, **options)
        processes.append(process)
        return process

    monkeypatch.setattr(prefect_api.subprocess, "Popen", popen)
    yield processes
    for process in processes:
        stop_server(process, grace=2.0)


def test_work_runs_after_the_launch_and_before_the_health_wait(tmp_path, monkeypatch, launched):
    events: list[str] = []

    def healthy(url: str) -> bool:
        events.append("health check")
        return True

    def work() -> None:
        assert len(launched) == 1 and launched[0].poll() is None  # the server is starting
        events.append("work")

    monkeypatch.setattr(prefect_api, "_healthy", healthy)
    process, url = start_server(tmp_path, while_starting=work)
    assert events == ["work", "health check"]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
    stop_server(process, grace=2.0)


def test_failed_work_stops_the_server_and_is_raised(tmp_path, launched):
    def work() -> None:
        raise ImportError("no module named 'flows.nothing'")

    with pytest.raises(ImportError, match="flows.nothing"):
        start_server(tmp_path, while_starting=work)
    assert len(launched) == 1
    assert launched[0].poll() is not None  # stopped, not left behind


def test_a_configured_api_runs_the_work_and_starts_nothing(monkeypatch, launched):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    done: list[str] = []
    with prefect_api.prefect_api(while_starting=lambda: done.append("work")) as url:
        assert url == "http://127.0.0.1:9/api"
    assert done == ["work"] and launched == []
