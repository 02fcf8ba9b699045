"""Fault injection helpers for the chaos tests: a TCP proxy that can refuse connections, a
Dask worker killer, a CPU load generator, a small filesystem that a run fills, and a view of a
local cache's complete entries."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.flows.conftest import SIZE, SMALL

#: score_line parameters of the chaos runs: the small test configuration with the test ViT's
#: own patch size (``musc score`` has no option for it), so the CLI runs the same thing.
PARAMS = {k: v for k, v in SMALL.items() if k != "patch_size_2d"}


def cli_args(batch: str = "b1", shard_size: int = 16) -> list[str]:
    """``musc score`` options equal to :data:`PARAMS` (after the data folder)."""
    return [
        "--shard-size", str(shard_size),
        "--format", "mvtec3d", "--category", "part", "--modality", "2d+3d",
        "--image-size", str(SIZE), "--backbone-2d", "vit_tiny_patch16_224", "--weights-2d",
        "random", "--weights-3d", "random", "--num-groups", "32", "--group-size", "16",
        "--ipg-step", "8", "--distance-dtype", "float32", "--vit-dtype", "float32",
        "--point-dtype", "float32",
        "--cluster", "threads", "--batch", batch, "--quiet",
    ]


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 in front of a server, able to simulate an outage.

    While down it cuts every open connection and resets each new one at once (the client
    sees its connection refused or reset, as when the server is gone); the server behind it
    keeps running, with its data (moto loses its data when it restarts).

    Args:
        target_port: port of the server on 127.0.0.1.
    """

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.outages = 0
        self.refused = 0
        self.cut = 0
        self._down = False
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        """The proxy's HTTP endpoint."""
        return f"http://127.0.0.1:{self.port}"

    def down(self) -> None:
        """Start an outage: cut the open connections, refuse new ones."""
        with self._lock:
            self.outages += 1
        self._cut_all()

    def _cut_all(self) -> None:
        with self._lock:
            self._down = True
            sockets, self._sockets = self._sockets, set()
            self.cut += len(sockets) // 2
        for sock in sockets:
            _reset(sock)

    def up(self) -> None:
        """End the outage."""
        with self._lock:
            self._down = False

    def close(self) -> None:
        """Stop for good (not counted as an outage)."""
        self._cut_all()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                down = self._down
                if down:
                    self.refused += 1
            if down:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets.discard(source)
                self._sockets.discard(sink)
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (linger 0), as a refused or dropped connection looks."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


# --------------------------------------------------------------------------- small filesystem
def used_bytes(root: Path) -> int:
    """Bytes the files below ``root`` take on their filesystem (allocated blocks)."""
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer can still write on the filesystem of ``path``."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


@contextmanager
def small_filesystem(mount_point: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted at ``mount_point`` for the enclosed block.

    Skips the test where this process may not mount one (not root, or without
    ``CAP_SYS_ADMIN``, e.g. in an unprivileged container). Unmounted at the end, lazily when
    something still holds it open.
    """
    import pytest

    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN) and mount(8)")
    mount_point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mount_point)],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        unmount = shutil.which("umount") or "umount"
        if subprocess.run([unmount, str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run([unmount, "-l", str(mount_point)], capture_output=True, check=True)


def fill(path: Path, leave: int) -> int:
    """Fill the filesystem of ``path`` with the file ``path`` until ``leave`` bytes are free.

    Returns:
        The bytes free afterwards (``leave`` up to a block).
    """
    size = free_bytes(path.parent) - leave
    if size <= 0:
        raise ValueError(f"{path.parent} has less than {leave} bytes free")
    with open(path, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, size)
    return free_bytes(path.parent)


def leftovers(cache_root: Path) -> list[Path]:
    """Files of a local cache that no complete entry holds: records cut short, temporary
    files, data prefixes without a record (or not the one their record names)."""
    found = []
    for path in sorted(p for p in cache_root.rglob("*") if p.is_file()):
        entry = path.relative_to(cache_root).parts
        record = cache_root.joinpath(*entry[:2], "_complete.json")
        try:
            token = json.loads(record.read_text())["data"]
        except (OSError, ValueError, KeyError):
            found.append(path)
            continue
        if path != record and (len(entry) < 4 or entry[2] != token):
            found.append(path)
    return found


# --------------------------------------------------------------------------- cache entries
#: Work-count stages of a run summary, by the kind of cache entry they write.
STAGE_GROUPS = {
    "tokens_2d": "tokens",
    "tokens_3d": "tokens",
    "snamd_2d": "snamd",
    "snamd_3d": "snamd",
    "grouping": "grouping",
    "pairs": "pairs",
    "reduced": "reduced",
    "decisions": "decisions",
}


def entry_kind(arrays: dict) -> str:
    """The kind of a cache entry, from the array names of its completion record."""
    names = set(arrays)
    if any(n.startswith(("d2", "d3")) for n in names):
        return "pairs"
    if "score_rescored" in names:
        return "decisions"
    if "map" in names:
        return "reduced"
    if "centres" in names:
        return "grouping"
    if "tokens" in names:
        return "tokens"
    if "features" in names:
        return "snamd"
    return "prepared"


def complete_entries(cache_root: Path) -> dict[str, str]:
    """Key and kind of every complete entry of a local cache (record present and parseable)."""
    entries = {}
    for record in cache_root.glob("*/*/_complete.json"):
        try:
            arrays = json.loads(record.read_text())["arrays"]
        except (OSError, ValueError, KeyError):
            continue  # replaced or removed while listing
        entries[record.parent.name] = entry_kind(arrays)
    return entries


def kind_counts(entries: dict[str, str]) -> dict[str, int]:
    """Number of entries of each kind."""
    return dict(Counter(entries.values()))


def grouped_work(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """A summary's ``counts`` summed by entry kind (2D and 3D tokens together, ...)."""
    total: dict[str, dict[str, int]] = {}
    for stage, count in counts.items():
        entry = total.setdefault(STAGE_GROUPS[stage], {"computed": 0, "cached": 0})
        entry["computed"] += count["computed"]
        entry["cached"] += count["cached"]
    return total


def wait_for(condition, timeout: float, what: str, poll: float = 0.05) -> None:
    """Poll until ``condition()`` is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


# --------------------------------------------------------------------------- Dask workers
class WorkerKiller(threading.Thread):
    """Kills (SIGKILL) one Dask worker process that is running a task, once, mid-run.

    It watches the Dask client of the run's task runner (handed over by ``runners``) and the
    cache; when at least ``after`` entries of kind ``kind`` are complete and a worker is
    processing a task, it asks that worker for its process id and kills the process.

    Args:
        runners: list that receives the run's entered ``DaskTaskRunner``.
        cache_root: local cache folder of the run.
        kind: entry kind to wait for (see :func:`entry_kind`).
        after: how many entries of that kind first.
    """

    def __init__(self, runners: list, cache_root: Path, kind: str, after: int) -> None:
        super().__init__(daemon=True)
        self.runners = runners
        self.cache_root = cache_root
        self.kind = kind
        self.after = after
        self.killed: list[int] = []
        self.busy_with: list[str] = []
        self.error: BaseException | None = None
        self._done = threading.Event()

    def stop(self) -> None:
        """Give up (the run ended)."""
        self._done.set()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as error:  # reported by the test
            self.error = error

    def _run(self) -> None:
        while not self._done.is_set():
            client = self.runners[0]._client if self.runners else None
            ready = kind_counts(complete_entries(self.cache_root)).get(self.kind, 0)
            if client is not None and ready >= self.after:
                busy = {a: keys for a, keys in client.processing().items() if keys}
                if busy:
                    address = sorted(busy)[0]
                    pid = client.run(os.getpid, workers=[address])[address]
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                    self.busy_with = [str(k) for k in busy[address]]
                    return
            time.sleep(0.02)


# --------------------------------------------------------------------------- CPU load
class CpuLoad:
    """Busy processes that load every core, for a bounded time.

    Each process spins for at most ``seconds`` and then exits by itself, so a test that dies
    leaves no load behind; :meth:`stop` (or leaving the ``with`` block) ends them at once.

    Args:
        per_core: busy processes per core (4: a load of about 4 × cores).
        seconds: the most each process runs.
    """

    def __init__(self, per_core: int = 4, seconds: float = 300.0) -> None:
        self.count = per_core * (os.cpu_count() or 1)
        self.seconds = seconds
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> CpuLoad:
        spin = (
            f"import time\nend = time.monotonic() + {self.seconds}\n"
            "while time.monotonic() < end: pass\n"
        )
        self.processes = [
            subprocess.Popen([sys.executable, "-c", spin]) for _ in range(self.count)
        ]
        return self

    def stop(self) -> None:
        """End every busy process now."""
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
