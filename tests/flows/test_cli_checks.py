"""The musc command refuses what cannot work before anything starts, and a finished run stays
a success: option checks, offline weights, exit statuses, unreachable storage, stage lines,
signals, and the cost of ``--help``."""

import errno
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from contextlib import ExitStack, redirect_stderr
from datetime import datetime, timezone
from pathlib import Path

import pytest

import flows.cli as cli
import infra.prefect_api
from flows.checks import UsageError, check_weights, config_from_args
from infra import hub
from infra.cluster import bounded_dask_runner, close_quietly
from infra.storage import StorageUnreachable, is_transient, with_retries
from tasks.records.batch_record import BatchExists, write_batch_record
from tasks.stage import retry_on_storage_error
from tasks.synthetic.generator import generate_line
from tests.records import hand_record

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--format", "mvtec3d", "--category", "a", "--modality", "2d+3d", "--image-size", "64",
    "--backbone-2d", "vit_tiny_patch16_224", "--weights-2d", "random", "--weights-3d", "random",
    "--num-groups", "32", "--group-size", "16", "--ipg-step", "8", "--cluster", "threads",
    "--quiet",
]


@pytest.fixture(scope="module")
def two_lines(tmp_path_factory):
    """A dataset root with two tiny categories, ``a`` and ``b``."""
    root = tmp_path_factory.mktemp("two")
    for category in ("a", "b"):
        generate_line(root, category=category, num_samples=2, image_size=32, seed=1)
    return root


@pytest.fixture
def nothing_starts(monkeypatch):
    """Fail the test if a Prefect server or a flow run is started."""

    def refuse(*args, **options):
        raise AssertionError("a Prefect server or a flow was started")

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(infra.prefect_api, "start_server", refuse)
    monkeypatch.setattr(cli, "with_flow_progress", refuse)


def _in_process(args, run, modules=(), first=None):
    """``with_flow_progress`` without a server: the command's first work, then its flows."""
    if first is not None:
        first()
    return run()


def _free_closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the socket is


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("musc: error")]


def _score(two_lines, tmp_path, *extra):
    return cli.main(["score", str(two_lines), "--out", str(tmp_path / "out"), "--storage",
                     str(tmp_path / "store"), *TINY, *extra])


BAD_OPTIONS = {
    "interval ratio above 1": (["--interval-ratio", "1.5"], "--interval-ratio"),
    "shard size 0": (["--shard-size", "0"], "--shard-size"),
    "no workers": (["--workers", "0"], "--workers"),
    "negative reference budget": (["--reference-budget", "-3"], "--reference-budget"),
    "flag k of 0": (["--flag-k", "0"], "--flag-k"),
    "group size 1": (["--group-size", "1"], "--group-size"),
    "unknown cluster": (["--cluster", "mycluster"], "--cluster"),
    "absent category": (["--category", "nope"], "--category"),
    "image size the patch does not divide": (["--image-size", "60"], "--image-size"),
    "missing 2D checkpoint": (["--weights-2d", "/no/such/vit.pth"], "--weights-2d"),
    "missing 3D checkpoint": (["--weights-3d", "/no/such/pointmae.pth"], "--weights-3d"),
}


@pytest.mark.chaos
@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_a_bad_option_is_one_error_line_naming_it_before_anything_starts(
    two_lines, tmp_path, capsys, nothing_starts, chaos_record, case
):
    extra, option = BAD_OPTIONS[case]
    status = _score(two_lines, tmp_path, *extra)
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert status == 2
    assert line.startswith(f"musc: error: argument {option}:"), line
    assert "Traceback" not in err
    chaos_record(kind="input", what=f"option: {case}", outcome="exit 2, nothing started",
                 runs=0, completed=0, samples=0, lost=0)


@pytest.mark.chaos
@pytest.mark.parametrize("option", ["--out", "--storage"])
def test_a_file_where_a_folder_is_needed_is_refused(
    two_lines, tmp_path, capsys, nothing_starts, chaos_record, option
):
    afile = tmp_path / "a-file"
    afile.write_text("not a folder")
    argv = ["score", str(two_lines), "--out", str(tmp_path / "out"), "--storage",
            str(tmp_path / "store"), *TINY]
    argv[argv.index(option) + 1] = str(afile / "below")
    status = cli.main(argv)
    (line,) = _error_lines(capsys.readouterr().err)
    assert status == 2 and f"argument {option}:" in line and "is a file" in line
    assert afile.read_text() == "not a folder"
    chaos_record(kind="input", what=f"{option} names an existing file",
                 outcome="exit 2, nothing started", runs=0, completed=0, samples=0, lost=0)


def _as_nobody(argv: list[str]) -> tuple[int, str]:
    """``musc`` with ``argv`` in a forked child running as user ``nobody``: (status, stderr).

    The child cannot read the interpreter's library once it is ``nobody``: the caller runs
    the same checks first, as itself, so that every module they need is imported.
    """
    import pwd

    nobody = pwd.getpwnam("nobody")
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.close(reader)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            err = io.StringIO()
            with redirect_stderr(err):
                status = cli.main(argv)
            payload = [status, err.getvalue()]
        except BaseException as error:  # noqa: BLE001 - anything the child met goes back
            payload = [-1, repr(error)]
        os.write(writer, json.dumps(payload).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        data = pipe.read()
    os.waitpid(child, 0)
    status, err = json.loads(data)
    return status, err


@pytest.fixture
def shared_folder():
    """A folder every user can read and enter (pytest's own are its user's only)."""
    folder = Path(tempfile.mkdtemp(prefix="musc-shared-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.mark.chaos
@pytest.mark.parametrize("option", ["--out", "--storage"])
def test_a_folder_this_user_cannot_write_is_refused_naming_option_and_path(
    shared_folder, capsys, nothing_starts, chaos_record, option
):
    """As a user without write permission (``nobody`` when the tests run as root), an
    ``--out`` or ``--storage`` below a read-only folder is refused before anything starts."""
    as_root = os.geteuid() == 0
    generate_line(shared_folder / "data", category="a", num_samples=2, image_size=32, seed=1)
    locked, free = shared_folder / "locked", shared_folder / "free"
    locked.mkdir(mode=0o555)
    free.mkdir(mode=0o777)
    locked.chmod(0o555)
    free.chmod(0o777)
    if not as_root and os.access(locked, os.W_OK):
        pytest.skip("this user writes into read-only folders (a capability)")
    argv = ["score", str(shared_folder / "data"), *TINY]
    ok = [*argv, "--out", str(free / "root-out"), "--storage", str(free / "root-store")]
    places = {"--out": str(free / "out"), "--storage": str(free / "store")}
    places[option] = str(locked / "below")
    refused = [*argv, "--out", places["--out"], "--storage", places["--storage"]]
    if as_root:
        cli.check_args(cli.build_parser().parse_args(ok))  # imports what the checks need
        status, err = _as_nobody(refused)
    else:
        status = cli.main(refused)
        err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert status == 2, err
    assert line.startswith(f"musc: error: argument {option}: '{locked / 'below'}' cannot be")
    assert f"the folder {locked} is not writable by" in line and "permissions" in line
    assert "user nobody" in line or not as_root
    assert not (locked / "below").exists()
    chaos_record(kind="input", what=f"{option} in a folder this user cannot write",
                 outcome="exit 2, nothing started", runs=0, completed=0, samples=0, lost=0)


def test_an_unwritable_folder_is_refused_as_os_access_says(tmp_path, monkeypatch):
    from flows.checks import check_location

    real = os.access
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if Path(path) == locked else real(path, mode)
    )
    with pytest.raises(UsageError, match=rf"^argument --storage: '{locked}/s' cannot be written"):
        check_location(str(locked / "s"), "--storage")
    assert not (locked / "s").exists()
    check_location(str(tmp_path / "free"), "--storage")


@pytest.mark.chaos
def test_an_unreachable_s3_endpoint_is_refused_up_front(
    two_lines, tmp_path, capsys, nothing_starts, monkeypatch, chaos_record
):
    port = _free_closed_port()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("MUSC_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    status = _score(two_lines, tmp_path, "--storage", "s3://nobucket/musc")
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert status == 2 and "argument --storage:" in line and f"127.0.0.1:{port}" in line
    assert "testing-secret" not in err
    chaos_record(kind="input", what="--storage on S3 at a closed port of 127.0.0.1",
                 outcome="exit 2, nothing started", runs=0, completed=0, samples=0, lost=0)


@pytest.mark.s3
def test_a_missing_bucket_is_refused_up_front(
    two_lines, tmp_path, capsys, nothing_starts, s3_url
):
    status = _score(two_lines, tmp_path, "--storage", "s3://no-such-bucket-here/musc")
    (line,) = _error_lines(capsys.readouterr().err)
    assert status == 2 and "argument --storage:" in line and "bucket" in line


@pytest.mark.s3
def test_a_writable_bucket_passes_the_check_and_keeps_no_probe(s3_url):
    from flows.checks import check_location
    from infra.storage import open_filesystem

    check_location(s3_url, "--storage")
    fs, root = open_filesystem(s3_url)
    assert not [p for p in fs.find(root.split("/")[0]) if ".musc-write-probe" in p]


# --------------------------------------------------------------------------- batch ids
def _recorded(storage: Path, line: str, batch: str) -> Path:
    write_batch_record(str(storage), hand_record(line, batch, [], data="the first run"))
    return storage / "lines" / line / "batches" / f"{batch}.json"


@pytest.mark.chaos
@pytest.mark.parametrize("line", ["a", "b"])
def test_an_explicit_batch_the_line_has_recorded_is_refused_and_kept(
    two_lines, tmp_path, capsys, nothing_starts, chaos_record, line
):
    record = _recorded(tmp_path / "store", line, "n1")
    before = record.read_bytes()
    status = _score(two_lines, tmp_path, "--category", "all", "--batch", "n1")
    (error,) = _error_lines(capsys.readouterr().err)
    assert status == 2
    assert error.startswith(f"musc: error: argument --batch: line {line!r} has a batch 'n1'")
    assert str(record) in error and "pass another --batch, or leave it out" in error
    assert record.read_bytes() == before
    chaos_record(kind="input", what=f"--batch a batch line {line!r} (of a, b) has recorded",
                 outcome="exit 2, nothing started, the record kept", runs=0, completed=0,
                 samples=0, lost=0)


def test_the_batch_is_looked_up_on_the_line_the_run_records(
    two_lines, tmp_path, capsys, nothing_starts, monkeypatch
):
    _recorded(tmp_path / "store", "line-7", "n1")
    assert _score(two_lines, tmp_path, "--batch", "n1", "--line", "line-7") == 2
    assert "line 'line-7' has a batch 'n1'" in _error_lines(capsys.readouterr().err)[0]
    monkeypatch.setattr(cli, "with_flow_progress", lambda args, run, modules=(), first=None: [])
    assert _score(two_lines, tmp_path, "--batch", "n1") == 0  # line 'a' has no batch n1


def test_a_deployed_run_of_a_recorded_batch_is_refused_before_any_work(two_lines, tmp_path):
    from flows.line_request import line_request
    from flows.settings import Algorithm, Backbones, LineInput, LineRun, RollingBank

    record = _recorded(tmp_path / "store", "a", "n1")
    before = record.read_bytes()

    def request(batch):
        return line_request(
            LineInput(data=str(two_lines), data_format="mvtec3d", category="a"), batch,
            Backbones(weights_2d="random", weights_3d="random"), Algorithm(), RollingBank(),
            LineRun(storage=str(tmp_path / "store")),
        )

    with pytest.raises(BatchExists, match=r"line 'a' has a batch 'n1' already"):
        request("n1")
    assert record.read_bytes() == before
    assert request("n2").batch == "n2" and request(None).batch != request(None).batch


def test_an_invalid_batch_id_is_refused_up_front(two_lines, tmp_path, capsys, nothing_starts):
    assert _score(two_lines, tmp_path, "--batch", "../n1") == 2
    (error,) = _error_lines(capsys.readouterr().err)
    assert error.startswith("musc: error: argument --batch: invalid batch id '../n1'")


def test_eval_refuses_an_id_one_of_its_runs_has_recorded(two_lines, tmp_path, capsys,
                                                          nothing_starts):
    _recorded(tmp_path / "store", "eval-b", "e1-s1-2of2")  # seed 1, subset 2 of 2
    argv = ["eval", str(two_lines), "--format", "mvtec3d", "--out", str(tmp_path / "out"),
            "--storage", str(tmp_path / "store"), *TINY[4:], "--category", "a", "b",
            "--subsets", "2", "--seeds", "2", "--batch", "e1"]
    assert cli.main(argv) == 2
    assert "line 'eval-b' has a batch 'e1-s1-2of2'" in _error_lines(capsys.readouterr().err)[0]
    assert cli.main([*argv[:-1], "e2"]) == 1  # not refused: nothing_starts stops the run


def test_score_new_refuses_to_record_as_an_existing_batch(tmp_path, capsys, nothing_starts):
    record = _recorded(tmp_path / "store", "a", "n1")
    status = cli.main(["score-new", "a", str(tmp_path / "part.png"), "--record-as", "n1",
                       "--storage", str(tmp_path / "store"), "--quiet"])
    (error,) = _error_lines(capsys.readouterr().err)
    assert status == 2 and error.startswith("musc: error: argument --record-as: line 'a'")
    assert str(record) in error and "pass another --record-as" in error


def test_runs_started_in_one_second_get_distinct_batches_sorted_by_start(
    two_lines, tmp_path, monkeypatch
):
    import flows.score_line

    batches: list[str] = []

    def score_line(data, batch, backbones, algorithm, bank, run):
        batches.append(batch)
        return _fake_summary(data.category, run.out)

    monkeypatch.setattr(flows.score_line, "score_line", score_line)
    monkeypatch.setattr(cli, "with_flow_progress", _in_process)
    started = datetime.now(timezone.utc)
    for _ in range(3):
        assert _score(two_lines, tmp_path) == 0
    assert len(set(batches)) == 3 and sorted(batches) == batches
    for batch in batches:
        moment = datetime.strptime(batch[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        assert abs((moment - started).total_seconds()) < 60
        assert re.fullmatch(r"\d{8}T\d{6}Z-\d{3}-[0-9a-f]{8}", batch), batch


# --------------------------------------------------------------------------- offline weights
@pytest.mark.chaos
@pytest.mark.parametrize("why", ["HF_HUB_OFFLINE", "hub unreachable"])
def test_default_weights_without_hub_or_cache_are_refused_naming_the_alternatives(
    two_lines, tmp_path, capsys, nothing_starts, monkeypatch, chaos_record, why
):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    if why == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        probed = []
        monkeypatch.setattr(hub, "tcp_reachable", lambda url, timeout: probed.append(url))
    argv = list(TINY)
    del argv[argv.index("--weights-2d"):argv.index("--weights-2d") + 2]  # the default then
    status = cli.main(["score", str(two_lines), "--out", str(tmp_path / "out"), "--storage",
                       str(tmp_path / "store"), *argv])
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert status == 2 and "argument --weights-2d:" in line
    assert "--weights-2d random" in line and "--weights-2d /path/to/checkpoint.pth" in line
    if why != "HF_HUB_OFFLINE":
        assert probed == ["https://huggingface.co"] and "cannot be reached" in line
    chaos_record(kind="input", what=f"default pretrained weights, {why}, empty cache",
                 outcome="exit 2, nothing started", runs=0, completed=0, samples=0, lost=0)


def test_cached_weights_are_used_offline_without_a_download(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--timm--vit_small_patch16_224.dino" / "snapshots" / "x"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "tcp_reachable", lambda url, timeout: False)
    assert hub.pretrained_weights_problem("vit_small_patch16_224.dino") is None
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert hub.pretrained_weights_problem("vit_small_patch16_224") is None  # any tag
    assert "not in the local cache" in hub.pretrained_weights_problem("vit_base_patch8_224.dino")


def test_a_reachable_hub_lets_timm_download(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "tcp_reachable", lambda url, timeout: True)
    assert hub.pretrained_weights_problem("vit_base_patch8_224.dino") is None


def test_config_errors_name_the_option():
    args = cli.build_parser().parse_args(
        ["score", "d", "--out", "o", "--ipg-step", "0", "--weights-3d", "random"]
    )
    with pytest.raises(UsageError, match=r"^argument --ipg-step: must be in \(0, --group-size\]"):
        config_from_args(args)
    args = cli.build_parser().parse_args(["score", "d", "--out", "o", "--modality", "3d"])
    with pytest.raises(UsageError, match="argument --weights-3d: .*--weights-3d random"):
        check_weights(args, config_from_args(args))


# --------------------------------------------------------------------------- exit statuses
def _fake_summary(line: str, out: str) -> dict:
    return {
        "line": line, "scored": 2, "seconds": 1.0, "pool": 2, "batch": "b1", "flagged": [],
        "set_aside": [], "timings": {"features": 1.0}, "counts": {}, "out": out,
        "outputs": {"scores": f"{out}/scores.csv"}, "random_weights": True,
        "metrics": {"image_auroc": 1.0},
    }


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RuntimeError("a bug"), 1),
        (StorageUnreachable("the storage cannot be reached (connection refused)"), 1),
        (ValueError("checkpoint refused"), 2),
        (BatchExists("b", "n1", "/s/lines/b/batches/n1.json"), 2),
    ],
)
def test_a_failed_line_keeps_the_scored_ones_in_run_json_and_sets_the_status(
    two_lines, tmp_path, capsys, monkeypatch, error, status
):
    import flows.score_line

    def score_line(data, batch, backbones, algorithm, bank, run):
        if data.category == "b":
            raise error
        return _fake_summary(data.category, run.out)

    monkeypatch.setattr(flows.score_line, "score_line", score_line)
    monkeypatch.setattr(cli, "with_flow_progress", _in_process)
    code = _score(two_lines, tmp_path, "--category", "all")
    captured = capsys.readouterr()
    assert code == status
    assert _error_lines(captured.err) == [f"musc: error: {error}"]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [line["line"] for line in run["lines"]] == ["a", "b"]
    assert run["lines"][0]["scored"] == 2 and run["lines"][1]["failed"]
    assert (tmp_path / "out" / "metrics.json").exists()
    assert "[a] 2 samples scored" in captured.out and "[b] FAILED" in captured.out


def test_a_line_not_scored_is_status_4(two_lines, tmp_path, capsys, monkeypatch):
    import flows.score_line
    from flows.score_line import LineNotScored

    def score_line(data, batch, backbones, algorithm, bank, run):
        if data.category == "b":
            raise LineNotScored("b", 1, [])
        return _fake_summary(data.category, run.out)

    monkeypatch.setattr(flows.score_line, "score_line", score_line)
    monkeypatch.setattr(cli, "with_flow_progress", _in_process)
    assert _score(two_lines, tmp_path, "--category", "all") == 4
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["lines"][1]["error"] and run["lines"][0]["scored"] == 2
    assert "[b] NOT SCORED" in capsys.readouterr().out


# --------------------------------------------------------------------------- storage retries
def test_an_endpoint_that_refuses_connections_is_retried_briefly_then_unreachable(monkeypatch):
    import infra.storage

    monkeypatch.setattr(infra.storage.time, "sleep", lambda seconds: None)
    calls = []

    def refused():
        calls.append(1)
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(StorageUnreachable, match="cannot be reached") as caught:
        with_retries(refused, attempts=3, what="write entry")
    assert len(calls) == 3 and isinstance(caught.value.__cause__, ConnectionRefusedError)
    assert not is_transient(caught.value)

    class State:
        def result(self):
            raise caught.value

    class Raw:
        def result(self):
            raise ConnectionRefusedError(111, "Connection refused")

    assert retry_on_storage_error(None, None, State()) is False
    assert retry_on_storage_error(None, None, Raw()) is False


def test_a_dropped_connection_is_still_retried(monkeypatch):
    import infra.storage

    monkeypatch.setattr(infra.storage.time, "sleep", lambda seconds: None)
    outcomes = iter([ConnectionResetError(104, "reset"), "ok"])

    def flaky():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert with_retries(flaky, attempts=3) == "ok"


# --------------------------------------------------------------------------- shutdown
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_failing_or_hanging_shutdown_is_one_warning_and_never_raises():
    def failing():
        raise TimeoutError("SpecCluster._correct_state_internal")

    release = threading.Event()
    records = _Records()
    logging.getLogger("musc").addHandler(records)
    try:
        assert close_quietly(failing, "the Dask cluster") is False
        assert close_quietly(release.wait, "the Dask cluster", timeout=0.2) is False
        assert close_quietly(lambda: None, "the Dask cluster") is True
    finally:
        logging.getLogger("musc").removeHandler(records)
        release.set()
    warnings = [r.getMessage() for r in records.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "TimeoutError" in warnings[0] and "results are kept" in warnings[0]
    assert "did not shut down" in warnings[1]


def test_the_dask_runner_exit_swallows_a_close_timeout():
    runner = bounded_dask_runner()(address="tcp://127.0.0.1:1")
    closed = []

    def close_timing_out():
        closed.append(True)
        raise TimeoutError("Worker process still alive after 4.0 seconds")

    with runner:
        runner._exit_stack.callback(close_timing_out)
    assert closed == [True]
    assert type(runner.duplicate()) is type(runner)


# --------------------------------------------------------------------------- machine logs
def test_stage_lines_say_start_end_counts_elapsed_and_beat():
    now = [100.0]
    stream = io.StringIO()
    stages = cli.StageLog(heartbeat=60, stream=stream, clock=lambda: now[0])
    stages("features", 0, 4)
    now[0] += 30
    stages.tick()  # nothing yet
    stages("features", 1, 4)
    now[0] += 61
    stages.tick()
    stages("features", 4, 4)
    stages.tick()
    assert stream.getvalue().splitlines() == [
        "musc: features started: 4 task(s)",
        "musc: features running: 1/4 task(s) done after 91 s",
        "musc: features done: 4/4 task(s) in 91.0 s",
    ]


def test_help_imports_nothing_heavy_and_shows_defaults_and_statuses():
    heavy = ("torch", "prefect", "dask", "distributed", "timm", "open3d", "s3fs", "zarr")
    code = (
        "import sys, contextlib, io\n"
        "import flows.cli\n"
        "for argv in (['--help'], ['score', '--help'], ['eval', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out, "
        "contextlib.suppress(SystemExit):\n"
        "        flows.cli.main(argv)\n"
        "    print(out.getvalue())\n"
        f"print('LOADED', sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout
    assert "samples per block (default: 16)" in result.stdout
    assert "default: 2d+3d" in result.stdout
    assert "4    a line was not scored" in result.stdout and "143" in result.stdout


# --------------------------------------------------------------------------- signals
@pytest.mark.parametrize(("sig", "name"), [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")])
def test_a_signal_interrupts_the_wait_for_a_busy_flow(sig, name):
    busy = threading.Event()
    timer = threading.Timer(0.3, os.kill, (os.getpid(), sig))
    with ExitStack() as stack:
        stack.callback(busy.set)
        with pytest.raises(cli.Stopped, match=name) as caught:
            with cli.signals_stop():
                timer.start()
                cli.run_in_thread(busy.wait, lambda: None, poll=0.05)
    timer.join()
    assert caught.value.signum == sig
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored


@pytest.mark.parametrize("option", ["--distance-dtype", "--vit-dtype"])
def test_explicit_bfloat16_without_native_bf16_is_refused_up_front(
    two_lines, tmp_path, capsys, nothing_starts, monkeypatch, option
):
    from musc_core import hardware

    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    status = _score(two_lines, tmp_path, option, "bfloat16", "--device", "cpu")
    (line,) = _error_lines(capsys.readouterr().err)
    assert status == 2
    assert line.startswith(f"musc: error: argument {option}:"), line
    assert "needs native bfloat16" in line and f"{option} auto" in line


def test_weights_for_the_weight_free_3d_backbone_are_refused(
    two_lines, tmp_path, capsys, nothing_starts
):
    status = _score(two_lines, tmp_path, "--backbone-3d", "fpfh")  # TINY passes --weights-3d
    (line,) = _error_lines(capsys.readouterr().err)
    assert status == 2 and line.startswith("musc: error: argument --weights-3d:"), line
    assert "--backbone-3d point-mae" in line


def test_a_full_storage_is_one_line_naming_the_option_and_root_with_status_1(monkeypatch):
    """The line names the most specific of ``--storage`` and ``--out`` that holds the full
    location (``--out`` may lie below ``--storage``), masks credentials, and says what to do;
    the status is 1, as for a storage lost mid-run."""
    import argparse

    from infra.storage import StorageFull

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake/secret+value/xyz")
    args = argparse.Namespace(storage="/mnt/small/store", out="/mnt/small/store/results")
    cache = StorageFull("/mnt/small/store/cache", "a cache entry")
    assert cli.full_storage_message(cache, args) == (
        "the storage /mnt/small/store (--storage) is full: no space left on the device while "
        "writing a cache entry; free space there or point --storage at a larger one, and "
        "re-run: what was stored is reused"
    )
    result = StorageFull("/mnt/small/store/results/part", "scores.csv")
    assert cli.full_storage_message(result, args).startswith(
        "the storage /mnt/small/store/results (--out) is full: no space left on the device "
        "while writing scores.csv; free space there or point --out at a larger one"
    )
    s3 = argparse.Namespace(storage="s3://bucket/fake/secret+value/xyz", out=None)
    line = cli.full_storage_message(
        StorageFull("s3://bucket/fake/secret+value/xyz/cache", "a cache entry"), s3
    )
    assert line.startswith("the storage s3://bucket/*** (--storage) is full")
    elsewhere = cli.full_storage_message(OSError(errno.ENOSPC, "No space left on device"), args)
    assert elsewhere.startswith("the storage is full: no space left on the device; free space")
    for error in (cache, OSError(errno.ENOSPC, "No space left on device")):
        assert cli._classify(error) == cli.EXIT_INTERNAL == 1
