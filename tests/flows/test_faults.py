"""Faults during and between runs: corrupted cache entries are detected and recomputed; an
S3 outage, a killed Dask worker, a killed flow process, a storage that fills up and two
concurrent runs on one cache lose nothing and change no result."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from infra.storage import open_filesystem
from musc_core.config import MuscConfig
from tasks.cache.store import FeatureCache
from tasks.records.batch_record import list_batches, read_batch_record
from tasks.reporting.history_page import line_nights
from tests.flows.chaos import (
    PARAMS,
    CpuLoad,
    TcpProxy,
    WorkerKiller,
    cli_args,
    complete_entries,
    fill,
    grouped_work,
    kind_counts,
    leftovers,
    small_filesystem,
    used_bytes,
    wait_for,
)
from tests.flows.conftest import SMALL, read_scores, run_line

pytestmark = pytest.mark.usefixtures("prefect_server")


def _entries_with(cache_root: Path, array: str) -> list[Path]:
    """Entry folders whose completion record lists ``array``."""
    found = []
    for record in sorted(cache_root.glob("*/*/_complete.json")):
        if array in json.loads(record.read_text())["arrays"]:
            found.append(record.parent)
    return found


def _chunks(entry: Path, array: str) -> list[Path]:
    return sorted(p for p in entry.glob(f"*/{array}/c/**/*") if p.is_file())


def _damage(chunk: Path, how: str) -> None:
    data = chunk.read_bytes()
    if how == "truncate":
        chunk.write_bytes(data[: len(data) // 2])
    else:
        chunk.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupted_entries_are_detected_and_recomputed_never_used(
    line, tmp_path, how, chaos_record
):
    store = tmp_path / "store"
    run_line(data=str(line), storage=str(store), cluster="threads", batch="b1", **SMALL)
    cache = store / "cache"
    damaged = {}
    for array in ("features", "d2", "map"):
        entry = _entries_with(cache, array)[0]
        # A SNAMD entry holds one chunk per layer; every new reduction reads the salient
        # layer's (whichever modality the entry is), so that is the chunk damaged.
        chunk = MuscConfig().salient_layer if array == "features" else 0
        _damage(_chunks(entry, array)[chunk], how)
        damaged[array] = entry.name
    # A new Interval Average ratio re-reads shards and features (new reductions); the
    # damaged reduction of the old ratio is not needed.
    second = run_line(
        data=str(line),
        storage=str(store),
        cluster="threads",
        batch="b2",
        interval_ratio=0.5,
        **SMALL,
    )
    # Each corrupted entry the run reads stops that attempt, is deleted and recomputed in the
    # next one; the counts are the last attempt's, whose order of detection follows the keys.
    computed = {stage: c["computed"] for stage, c in second["counts"].items()}
    assert computed["tokens_2d"] == 0 and computed["tokens_3d"] == 0
    assert computed["snamd_2d"] + computed["snamd_3d"] <= 1
    reread = FeatureCache(str(cache))
    for array in ("features", "d2"):  # read again in full, every checksum verified
        arrays, _meta = reread.read(damaged[array])
        assert array in arrays
    fresh = run_line(
        data=str(line),
        storage=str(tmp_path / "fresh"),
        cluster="threads",
        batch="b1",
        interval_ratio=0.5,
        **SMALL,
    )
    assert read_scores(second["outputs"]["scores"]) == read_scores(fresh["outputs"]["scores"])
    chaos_record(kind="fault", what=f"3 cache entries corrupted ({how}) between runs",
                 injected=3, runs=3, completed=3, samples=8,
                 lost=8 - len(read_scores(second["outputs"]["scores"])))


@pytest.mark.slow
@pytest.mark.chaos
def test_corrupted_reduction_is_recomputed_when_the_report_reads_it(
    line, tmp_path, chaos_record
):
    store = tmp_path / "store"
    first = run_line(data=str(line), storage=str(store), cluster="threads", batch="b1", **SMALL)
    _damage(_chunks(_entries_with(store / "cache", "map")[0], "map")[0], "flip")
    second = run_line(data=str(line), storage=str(store), cluster="threads", batch="b2", **SMALL)
    assert second["counts"]["reduced"] == {"computed": 1, "cached": 7}
    assert read_scores(first["outputs"]["scores"]) == read_scores(second["outputs"]["scores"])
    chaos_record(kind="fault", what="a reduction corrupted, found by the report's checksum",
                 injected=1, runs=2, completed=2, samples=8,
                 lost=8 - len(read_scores(second["outputs"]["scores"])))


# --------------------------------------------------------------------------- injected faults
#: The fault runs lay 8 samples out in 4 blocks: 10 pair shards, enough to stop half-way.
FAULT = {**PARAMS, "shard_size": 2}
OUTAGE_SECONDS = 5.0
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def undisturbed(line, tmp_path_factory):
    """The fault runs' configuration run once without any fault (thread pool, local disk)."""
    store = tmp_path_factory.mktemp("undisturbed")
    return run_line(data=str(line), storage=str(store), cluster="threads", batch="b1", **FAULT)


def _results(summary: dict, fs=None) -> tuple[dict, dict]:
    """scores.csv rows and maps of a run (local, or through an fsspec filesystem)."""
    out = summary["out"].removeprefix("s3://")

    def read(relative: str) -> bytes:
        path = f"{out}/{relative}"
        return fs.cat_file(path) if fs is not None else Path(path).read_bytes()

    text = read("scores.csv").decode("utf-8")
    rows = [r for r in csv.reader(io.StringIO(text)) if r and not r[0].startswith("#")]
    scores = {r[1]: dict(zip(rows[0], r, strict=True)) for r in rows[1:]}
    maps = {name: np.load(io.BytesIO(read(row["map_file"]))) for name, row in scores.items()}
    return scores, maps


def assert_same_results(summary: dict, reference: dict, fs=None) -> int:
    """The run's rows and maps equal the reference run's; returns the samples it lacks."""
    scores, maps = _results(summary, fs)
    want_scores, want_maps = _results(reference)
    assert scores == want_scores
    for name, heat in want_maps.items():
        np.testing.assert_array_equal(maps[name], heat, err_msg=name)
    return len(set(want_scores) - set(scores))


def _cli_env(api_url: str) -> dict[str, str]:
    """Environment of a ``musc score`` subprocess: this session's Prefect server, no
    telemetry, and this process's thread count (equal floating-point results)."""
    threads = str(torch.get_num_threads())
    return {
        **os.environ, "PREFECT_API_URL": api_url, "DO_NOT_TRACK": "1",
        "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONPATH": str(REPO),
    }


def _musc_score(
    line: Path, out: Path, store: Path, api_url: str, log: Path, batch: str | None = "b1"
) -> subprocess.Popen:
    """``musc score`` in a process of its own; ``batch`` None leaves the batch id to it."""
    options = cli_args(batch or "", FAULT["shard_size"])
    if batch is None:
        del options[options.index("--batch"):options.index("--batch") + 2]
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "score", str(line), "--out", str(out),
             "--storage", str(store), *options],
            cwd=REPO, env=_cli_env(api_url), stdout=handle, stderr=subprocess.STDOUT,
        )


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.chaos
def test_an_s3_outage_mid_run_is_bridged_by_retries(
    line, undisturbed, s3_env, moto_endpoint, monkeypatch, chaos_record
):
    proxy = TcpProxy(int(moto_endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    timers: list[threading.Timer] = []
    lock = threading.Lock()
    write = FeatureCache.write

    def write_during_outage(self, key, arrays, *args, **kwargs):
        with lock:  # the first pair shard's write starts the outage
            if not timers and any(name.startswith(("d2", "d3")) for name in arrays):
                proxy.down()
                timers.append(threading.Timer(OUTAGE_SECONDS, proxy.up))
                timers[0].start()
        return write(self, key, arrays, *args, **kwargs)

    monkeypatch.setattr(FeatureCache, "write", write_during_outage)
    try:
        summary = run_line(
            data=str(line), storage=f"{s3_env}/store", cluster="threads", batch="b1", **FAULT
        )
    finally:
        for timer in timers:
            timer.join()
        proxy.close()
    assert proxy.outages == 1 and proxy.refused + proxy.cut > 0, "the outage hit the run"
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    fs, _ = open_filesystem(s3_env)
    lost = assert_same_results(summary, undisturbed, fs)
    chaos_record(kind="fault", what=f"S3 refuses connections for {OUTAGE_SECONDS:.0f} s mid-run",
                 injected=1, runs=1, completed=1, samples=8, lost=lost,
                 refused=proxy.refused, cut=proxy.cut)


@pytest.mark.slow
@pytest.mark.chaos
def test_a_killed_dask_worker_is_replaced_and_the_results_are_unchanged(
    line, tmp_path, monkeypatch, chaos_record
):
    from prefect_dask import DaskTaskRunner

    runners: list = []
    enter = DaskTaskRunner.__enter__

    def entered(self):
        runners.append(enter(self))
        return runners[-1]

    monkeypatch.setattr(DaskTaskRunner, "__enter__", entered)
    store = tmp_path / "store"
    killer = WorkerKiller(runners, store / "cache", kind="pairs", after=1)
    killer.start()
    try:
        summary = run_line(
            data=str(line), storage=str(store), cluster="local", workers=2, batch="b1", **FAULT
        )
    finally:
        killer.stop()
        killer.join()
    assert killer.error is None, killer.error
    assert len(killer.killed) == 1, "a worker was killed while it ran a task"
    undisturbed = run_line(
        data=str(line), storage=str(tmp_path / "undisturbed"), cluster="local", workers=2,
        batch="b1", **FAULT,
    )
    lost = assert_same_results(summary, undisturbed)
    assert summary["scored"] == 8
    chaos_record(kind="fault", what="a Dask worker killed (SIGKILL) while running a task",
                 injected=1, runs=1, completed=1, samples=8, lost=lost,
                 task=killer.busy_with)


@pytest.mark.slow
@pytest.mark.chaos
def test_a_killed_flow_process_is_resumed_computing_only_missing_entries(
    line, undisturbed, tmp_path, prefect_server, chaos_record
):
    store = tmp_path / "store"
    process = _musc_score(line, tmp_path / "out", store, prefect_server, tmp_path / "cli.log")
    try:  # killed while the features of the line's 4 blocks are being computed
        wait_for(
            lambda: process.poll() is not None
            or kind_counts(complete_entries(store / "cache")).get("snamd", 0) >= 4,
            timeout=300, what="4 SNAMD entries in the cache",
        )
    finally:
        process.kill()
        process.wait()
    log = (tmp_path / "cli.log").read_text(errors="replace")
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{log}"
    stored = kind_counts(complete_entries(store / "cache"))
    assert stored.get("reduced", 0) == 0 and stored["snamd"] < 16, "killed mid-run"
    summary = run_line(data=str(line), storage=str(store), cluster="threads", batch="b2", **FAULT)
    final = kind_counts(complete_entries(store / "cache"))
    work = grouped_work(summary["counts"])
    assert set(work) == {"tokens", "snamd", "grouping", "pairs", "reduced", "decisions"}
    for kind, count in work.items():
        assert count == {"computed": final[kind] - stored.get(kind, 0),
                         "cached": stored.get(kind, 0)}, kind
    assert work["snamd"]["cached"] >= 4 and work["pairs"]["computed"] > 0
    lost = assert_same_results(summary, undisturbed)
    chaos_record(kind="fault", what="the flow process killed (SIGKILL) mid-run, then re-run",
                 outcome="resumed", injected=1, runs=2, completed=1, samples=8, lost=lost,
                 reused=sum(stored.values()))


@pytest.mark.slow
@pytest.mark.chaos
def test_two_runs_sharing_one_cache_at_once_both_complete_with_equal_results(
    line, undisturbed, tmp_path, prefect_server, chaos_record
):
    """Two ``musc score`` of one line on one storage started together: both complete with
    the results of an undisturbed run, each under a batch id of its own, and the line's
    history holds both batches."""
    store = tmp_path / "store"
    processes = [
        _musc_score(line, tmp_path / f"out{i}", store, prefect_server, tmp_path / f"cli{i}.log",
                    batch=None)
        for i in range(2)
    ]
    try:
        for process in processes:
            process.wait(timeout=580)
    finally:
        for process in processes:
            process.kill()
    logs = [(tmp_path / f"cli{i}.log").read_text(errors="replace") for i in range(2)]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(logs)
    runs = [
        json.loads((tmp_path / f"out{i}" / "run.json").read_text())["lines"][0] for i in range(2)
    ]
    lost = sum(assert_same_results(run, undisturbed) for run in runs)
    entries = complete_entries(store / "cache")
    cache = FeatureCache(str(store / "cache"))
    for key in entries:
        cache.read(key)  # every checksum verified: no entry is corrupted
    computed = [sum(c["computed"] for c in run["counts"].values()) for run in runs]
    stages = len([k for k in entries if entries[k] != "prepared"])
    assert sum(computed) >= stages, "every entry was computed by one of the runs"
    batches = sorted(run["batch"] for run in runs)
    assert batches[0] != batches[1]
    assert list_batches(str(store), "part") == batches
    assert [night.batch for night in line_nights(str(store), "part")] == batches
    page = (store / "results" / "part" / "history.html").read_text(encoding="utf-8")
    assert all(f"<td>{batch}</td>" in page for batch in batches)
    for run in runs:
        assert read_batch_record(str(store), "part", run["batch"]).out == run["out"]
    chaos_record(kind="fault", what="two runs of one line on one cache at the same time",
                 injected=1, runs=2, completed=2, samples=16, lost=lost,
                 computed_twice=sum(computed) - stages)


@pytest.mark.slow
@pytest.mark.chaos
def test_sigterm_stops_the_command_and_its_own_prefect_server(line, tmp_path):
    """Unattended jobs are stopped with SIGTERM: the command ends promptly with status 143 and
    the Prefect server it started for itself does not outlive it."""
    import psutil

    store, home = tmp_path / "store", tmp_path / "home"
    env = {k: v for k, v in _cli_env("unused").items() if k != "PREFECT_API_URL"}
    env["HOME"] = str(home)  # the command's own server keeps its database in ~/.prefect
    with open(tmp_path / "cli.log", "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "score", str(line), "--out", str(tmp_path / "o"),
             "--storage", str(store), *cli_args("b1", FAULT["shard_size"])],
            cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: process.poll() is not None
            or kind_counts(complete_entries(store / "cache")).get("prepared", 0) >= 1,
            timeout=300, what="a first cache entry",
        )
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=60)
    finally:
        process.kill()
    log = (tmp_path / "cli.log").read_text()
    assert status == 143, log
    assert "musc: stopped" in log and "re-run to resume" in log, log

    def own_server(candidate: psutil.Process) -> bool:
        try:
            cmdline = " ".join(candidate.cmdline())
            return "prefect" in cmdline and "server" in cmdline and (
                candidate.environ().get("PREFECT_HOME", "").startswith(str(home))
            )
        except psutil.Error:
            return False

    wait_for(lambda: not any(own_server(p) for p in psutil.process_iter()), timeout=30,
             what="the command's Prefect server to stop")


# --------------------------------------------------------------------------- full storage
@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.parametrize(
    ("when", "share"), [("mid-run", 0.5), ("while preparing the samples", 0.04)]
)
def test_a_storage_that_fills_up_fails_with_one_line_and_a_rerun_after_freeing_space_completes(
    line, undisturbed, tmp_path, capsys, when, share, chaos_record
):
    """``--storage`` and ``--out`` on a small filesystem that another file has filled up to
    a share of what the run needs: the run stops with one ``musc: error`` line naming the
    storage and saying it is full (status 1), no sample set aside; every entry it left is
    complete and verified, and nothing else is left; once the other file is deleted the same
    command completes, reuses those entries and gives the undisturbed run's results, bit for
    bit."""
    from flows.cli import main

    needed = used_bytes(Path(undisturbed["out"]).parents[2])  # <store>/results/<line>/<batch>
    with small_filesystem(tmp_path / "small", 3 * needed) as small:
        store, out = small / "store", small / "out"
        free = fill(small / "other-file", leave=int(share * needed))
        argv = ["score", str(line), "--out", str(out), "--storage", str(store),
                *cli_args("b1", FAULT["shard_size"])]
        status = main(argv)
        captured = capsys.readouterr()
        err = captured.err
        errors = [x for x in err.splitlines() if x.startswith("musc: error")]
        assert status == 1, err
        assert len(errors) == 1, err
        assert f"the storage {store} (--storage) is full: no space left" in errors[0], err
        assert "free space there" in errors[0] and "re-run" in errors[0], err
        assert "Traceback" not in err, err
        assert "set aside" not in captured.out + err, "no sample is set aside for the storage"
        stored = complete_entries(store / "cache")
        assert stored, f"the storage filled up {when}, after some entries were stored"
        assert len(stored) < len(complete_entries(Path(undisturbed["out"]).parents[2] / "cache"))
        cache = FeatureCache(str(store / "cache"))
        for key in stored:
            cache.read(key)  # complete: every checksum verified
        assert leftovers(store / "cache") == []
        assert not [p for p in small.rglob("*.tmp-*")], "no temporary file is left"

        (small / "other-file").unlink()
        assert main(argv) == 0, capsys.readouterr().err
        run = json.loads((out / "run.json").read_text())["lines"][0]
        lost = assert_same_results(run, undisturbed)
        work = grouped_work(run["counts"])
        reused = kind_counts(stored)
        for kind, count in work.items():
            assert count["cached"] == reused.get(kind, 0), kind
    chaos_record(kind="fault", what=f"the storage fills up {when} (a small tmpfs); space "
                 "freed, same command re-run",
                 outcome=f"exit 1, one line; re-run completed, reused {len(stored)} entries",
                 injected=1, runs=2, completed=1, samples=8, lost=lost,
                 free_bytes=free, needed_bytes=needed)


# --------------------------------------------------------------------------- under load
@pytest.mark.slow
@pytest.mark.chaos
def test_a_finished_run_under_load_is_a_success_when_closing_the_cluster_times_out(
    line, tmp_path, monkeypatch, capsys, chaos_record
):
    """The shutdown of issue 13: every result written, then the local Dask cluster's close
    times out on a loaded machine. The command still succeeds, prints its summary, writes the
    top-level run.json and metrics.json, and says so in one warning line."""
    from distributed.deploy.cluster import Cluster

    from flows.cli import main

    close = Cluster.__exit__
    timed_out: list[str] = []

    def close_timing_out(self, *exc):
        try:  # on a loaded machine the real close may time out by itself first
            close(self, *exc)
        finally:
            timed_out.append(type(self).__name__)
        raise TimeoutError("SpecCluster._correct_state_internal: Worker process still alive")

    monkeypatch.setattr(Cluster, "__exit__", close_timing_out)
    argv = cli_args("b1", FAULT["shard_size"])
    argv[argv.index("--cluster") + 1] = "local"
    out = tmp_path / "out"
    with CpuLoad(per_core=4, seconds=400):
        status = main(["score", str(line), "--out", str(out), "--storage",
                       str(tmp_path / "store"), *argv])
    captured = capsys.readouterr()
    assert timed_out == ["LocalCluster"], "the cluster was closed (and timed out)"
    assert status == 0, captured.err
    assert "run summary:" in captured.out and "scores:" in captured.out
    run = json.loads((out / "run.json").read_text())
    assert run["lines"][0]["scored"] == 8 and (out / "metrics.json").exists()
    warnings = [x for x in captured.err.splitlines()
                if x.startswith("musc: WARNING") and "random backbone weights" not in x]
    assert len(warnings) == 1 and "Dask cluster" in warnings[0], captured.err
    assert "Traceback" not in captured.err
    lost = 8 - len(read_scores(out / "part" / "scores.csv"))
    chaos_record(kind="fault", what="loaded machine (4 busy processes per core); closing the "
                 "Dask cluster times out after the results", outcome="exit 0, summary, run.json",
                 injected=1, runs=1, completed=1, samples=8, lost=lost)


@pytest.mark.slow
@pytest.mark.chaos
def test_sigterm_under_load_stops_at_once_and_a_rerun_computes_only_missing_entries(
    line, undisturbed, tmp_path, prefect_server, chaos_record
):
    store = tmp_path / "store"
    with CpuLoad(per_core=4, seconds=500):
        process = _musc_score(line, tmp_path / "out", store, prefect_server, tmp_path / "cli.log")
        try:  # stopped while the features of the line's 4 blocks are being computed
            wait_for(
                lambda: process.poll() is not None
                or kind_counts(complete_entries(store / "cache")).get("snamd", 0) >= 4,
                timeout=480, what="4 SNAMD entries in the cache",
            )
            process.send_signal(signal.SIGTERM)
            # Generous: the behaviour is "within seconds", also with the machine loaded.
            status = process.wait(timeout=60)
        finally:
            process.kill()
            process.wait()
    log = (tmp_path / "cli.log").read_text(errors="replace")
    assert status == 143, log
    assert "musc: stopped" in log and "re-run to resume" in log and "Traceback" not in log, log
    stored = kind_counts(complete_entries(store / "cache"))
    assert stored.get("reduced", 0) == 0 and stored["snamd"] < 16, "stopped mid-run"
    summary = run_line(data=str(line), storage=str(store), cluster="threads", batch="b2", **FAULT)
    final = kind_counts(complete_entries(store / "cache"))
    work = grouped_work(summary["counts"])
    for kind, count in work.items():
        assert count == {"computed": final[kind] - stored.get(kind, 0),
                         "cached": stored.get(kind, 0)}, kind
    assert work["snamd"]["cached"] >= 4 and work["pairs"]["computed"] > 0
    lost = assert_same_results(summary, undisturbed)
    recomputed = sum(c["computed"] for c in work.values())
    reused = sum(c["cached"] for c in work.values())
    chaos_record(kind="fault", what="SIGTERM mid-run on a loaded machine, then re-run",
                 outcome=f"exit 143; re-run computed only the {recomputed} missing, "
                 f"reused {reused}", injected=1, runs=2, completed=1, samples=8, lost=lost)


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.chaos
def test_s3_gone_for_good_mid_run_fails_in_bounded_time_with_one_line(
    line, tmp_path, s3_env, moto_endpoint, monkeypatch, capsys, chaos_record
):
    """The endpoint stops listening at the first pair shard's write (connections refused from
    then on): the run is not retried for minutes but fails within tens of seconds, with one
    ``musc: error`` line saying the storage cannot be reached, and status 1."""
    import time

    from flows.cli import main

    proxy = TcpProxy(int(moto_endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    gone: list[float] = []
    write = FeatureCache.write

    def write_after_the_end(self, key, arrays, *args, **kwargs):
        if not gone and any(name.startswith(("d2", "d3")) for name in arrays):
            gone.append(time.monotonic())
            proxy.close()
        return write(self, key, arrays, *args, **kwargs)

    monkeypatch.setattr(FeatureCache, "write", write_after_the_end)
    status = main(["score", str(line), "--out", str(tmp_path / "out"), "--storage",
                   f"{s3_env}/store", *cli_args("b1", FAULT["shard_size"])])
    failed_after = time.monotonic() - gone[0]
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("musc: error")]
    assert gone, "the storage went away mid-run"
    assert status == 1, err
    assert len(errors) == 1 and "cannot be reached" in errors[0], err
    assert "testing-secret" not in err
    assert failed_after < 180, f"gave up after {failed_after:.0f} s (was 704 s)"  # generous
    chaos_record(kind="fault", what="S3 endpoint gone for good mid-run (connections refused)",
                 outcome=f"exit 1 after {failed_after:.0f} s, one line", injected=1, runs=1,
                 completed=0, samples=8, lost=0)
