"""One Prefect API for a run: the configured server, or a local one started for the run.

Prefect without ``PREFECT_API_URL`` starts a temporary server in every process that reports a
task; on a Dask cluster that is one server per worker, serialized on SQLite. So a run that has
no API configured starts one local server (embedded SQLite database in ``PREFECT_HOME``, bound
to 127.0.0.1 on a free port), points this process and every worker it spawns at it, and stops
it at the end. With ``PREFECT_API_URL`` set (a deployment, a shared server) nothing is started.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

#: Telemetry off for the server we start (and its children).
QUIET_ENV = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_server(
    home: str | Path, timeout: float = 90.0, while_starting: Callable[[], object] | None = None
) -> tuple[subprocess.Popen, str]:
    """Start ``prefect server start`` on 127.0.0.1 and wait until it answers.

    Args:
        home: ``PREFECT_HOME`` of the server (its SQLite database and logs live there).
        timeout: seconds to wait for the health check (after ``while_starting``).
        while_starting: called once the server process is launched and before waiting for
            it (e.g. the flow modules' imports, which then overlap the server's own start-up
            of ~8–30 s instead of following it). What it raises stops the server.

    Returns:
        The server process and its API URL (``http://127.0.0.1:<port>/api``).

    Raises:
        RuntimeError: the server exited or did not answer in time (its log is named).
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log_path = home / "server.log"
    with open(log_path, "ab") as server_log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port)],
            env=env,
            stdout=server_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        if while_starting is not None:
            while_starting()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the Prefect server exited at start-up; see {log_path}")
            if _healthy(url):
                return process, url
            time.sleep(0.3)
    except BaseException:  # a signal or a failed while_starting: the server must not outlive us
        stop_server(process, grace=2.0)
        raise
    stop_server(process)
    raise RuntimeError(f"the Prefect server did not answer within {timeout:.0f} s; see {log_path}")


def stop_server(process: subprocess.Popen, grace: float = 10.0) -> None:
    """Terminate a server started by :func:`start_server` (kill it after ``grace`` seconds)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _stop_on_sigterm(process: subprocess.Popen) -> Callable[[], None]:
    """Stop the server when this process is terminated (it runs in its own session).

    Prefect's flow engine turns SIGTERM into a crash of the running flow and then calls the
    handler that was installed before it, which is this one: it stops the server, then hands
    the signal to the handler installed before it when that is a Python function (the
    ``musc`` command's, which says it stopped), else leaves at once, without waiting for
    tasks still running in worker threads (every cache entry is atomic, so a re-run resumes
    from what was stored). Also registered with :mod:`atexit`. Returns a function that undoes
    both.
    """

    def on_exit() -> None:
        stop_server(process, grace=5.0)

    def on_sigterm(signum: int, frame: object) -> None:
        on_exit()
        if callable(previous):
            previous(signum, frame)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)

    atexit.register(on_exit)
    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: atexit only
        previous = None

    def restore() -> None:
        atexit.unregister(on_exit)
        if previous is not None and signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)

    return restore


#: Seconds the run logs and events still queued for a local server may take to be sent.
DRAIN_TIMEOUT = 5.0


def flush_logs() -> None:
    """Send the run logs and events still queued for the API before the server goes away.

    Bounded by :data:`DRAIN_TIMEOUT` each; what is not sent by then is dropped (the run's
    results do not depend on it), so the event and log clients do not retry against a
    stopped server at exit.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=DRAIN_TIMEOUT)
        except Exception as error:  # a log that cannot be sent must not fail the run
            log.debug("could not flush Prefect %s: %s", worker.__name__, error)


@contextmanager
def prefect_api(
    home: str | Path | None = None,
    timeout: float = 90.0,
    while_starting: Callable[[], object] | None = None,
) -> Iterator[str]:
    """The Prefect API URL to use for the enclosed runs.

    Args:
        home: ``PREFECT_HOME`` of a server started here (default: ``~/.prefect``, Prefect's
            own default, so run history accumulates in one place).
        timeout: seconds to wait for a started server.
        while_starting: work to do while a local server starts (see :func:`start_server`);
            called at once when an API is configured.

    Yields:
        The API URL. ``PREFECT_API_URL`` is set in this process's environment (and hence in
        the Dask workers it spawns) for the duration.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = os.environ.get("PREFECT_API_URL", "").strip() or (PREFECT_API_URL.value() or "")
    if configured:
        if while_starting is not None:
            while_starting()
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = configured  # Dask workers inherit it
        try:
            yield configured
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
        return

    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    process, url = start_server(home or Path.home() / ".prefect", timeout, while_starting)
    log.info("started a local Prefect server at %s", url)
    os.environ["PREFECT_API_URL"] = url
    restore = _stop_on_sigterm(process)
    stopped = False  # by a signal or Ctrl-C: no time for a graceful stop
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
        flush_logs()
    except BaseException as error:
        stopped = not isinstance(error, Exception)
        raise
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        restore()
        try:
            stop_server(process, grace=1.0 if stopped else 5.0)
        except Exception as error:  # the runs are over: their outcome stands
            logging.getLogger("musc").warning(
                "the local Prefect server did not stop cleanly: %s", error
            )
