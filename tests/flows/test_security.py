"""Security of a run: pickled code in a checkpoint is never run, and credentials never leave
the environment (not in output, logs, result files, Prefect logs, artifacts or database).

Covered elsewhere: ``torch.load(weights_only=True)`` at the loader level
(tests/core/test_point_mae.py::test_pickled_code_in_a_checkpoint_is_refused_and_not_run,
tests/core/test_features_2d.py::test_pickle_payload_is_refused); reading only below the
dataset root and writing only below ``--out``/``--storage``, and the escaping of a
``<script>`` sample name in the report (tests/flows/test_bad_inputs.py,
tests/tasks/test_discover.py).
"""

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import torch

from flows.cli import main
from infra.storage import open_filesystem
from tests.flows.chaos import TcpProxy, cli_args, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
REPO = Path(__file__).resolve().parents[2]
OUTAGE_SECONDS = 3.0


class _Payload:
    """Unpickling this runs ``pathlib.Path(marker).write_text('pwned')``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({self.marker!r}).write_text('pwned')",))


def test_a_checkpoint_with_pickled_code_stops_the_run_without_running_it(line, tmp_path):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "pointmae.pth"
    torch.save({"base_model": {}, "extra": _Payload(str(marker))}, evil)
    args = cli_args()
    args[args.index("--weights-3d") + 1] = str(evil)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        status = main(["score", str(line), "--out", str(tmp_path / "out"), "--storage",
                       str(tmp_path / "store"), *args])
    assert status == 2
    assert "weights_only" in stderr.getvalue() and str(evil) in stderr.getvalue()
    assert not marker.exists()


async def _server_records(api_url: str) -> list[object]:
    """Every log line, artifact, flow run and task run the Prefect server holds."""
    from prefect.client.orchestration import get_client

    records: list[object] = []
    async with get_client() as client:
        assert str(client.api_url).rstrip("/") == api_url.rstrip("/")
        offset = 0
        while page := await client.read_logs(limit=200, offset=offset):
            records += page
            offset += len(page)
        records += await client.read_artifacts()
        records += await client.read_flow_runs()
        records += await client.read_task_runs()
    return records


@pytest.mark.s3
@pytest.mark.chaos
def test_credentials_appear_in_no_output_log_result_or_record(
    line, s3_env, moto_endpoint, prefect_server, tmp_path_factory, tmp_path, chaos_record
):
    secret = f"musc-secret-{uuid.uuid4().hex}"
    token = f"musc-token-{uuid.uuid4().hex}"
    proxy = TcpProxy(int(moto_endpoint.rsplit(":", 1)[1]))
    threads = str(torch.get_num_threads())
    env = {
        **os.environ, "PREFECT_API_URL": prefect_server, "DO_NOT_TRACK": "1",
        "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": token,
        "AWS_ENDPOINT_URL": proxy.url, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(REPO),
    }
    fs, root = open_filesystem(s3_env)
    log = tmp_path / "cli.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "score", str(line), "--storage",
             f"{s3_env}/store", "--out", f"{s3_env}/out", *cli_args("b1", 2)],
            cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
        )
    try:  # an outage once features are stored: retries log their (redacted) errors
        wait_for(
            lambda: process.poll() is not None
            or len([p for p in fs.find(f"{root}/store/cache") if p.endswith("_complete.json")])
            >= 20,
            timeout=300, what="20 cache entries in the bucket",
        )
        proxy.down()
        restore = threading.Timer(OUTAGE_SECONDS, proxy.up)
        restore.start()
        restore.join()
        process.wait(timeout=500)
    finally:
        process.kill()
        proxy.close()
    output = log.read_bytes()
    assert process.returncode == 0, output.decode(errors="replace")
    assert b"samples scored" in output

    places: dict[str, bytes] = {"musc score stdout/stderr": output}
    for path in fs.find(root):
        places[f"s3://{path}"] = fs.cat_file(path)
    assert any(p.endswith("/out/part/report.html") for p in places)
    assert any("/store/cache/" in p for p in places)
    records = asyncio.run(_server_records(prefect_server))
    places["Prefect logs, artifacts, flow and task runs"] = "\n".join(
        json.dumps(r.model_dump(mode="json")) for r in records
    ).encode()
    assert b"Beginning flow run" in places["Prefect logs, artifacts, flow and task runs"]
    for home in tmp_path_factory.getbasetemp().glob("prefect-home*"):
        for path in home.rglob("*"):
            if path.is_file():
                places[str(path)] = path.read_bytes()
    assert any(p.endswith("prefect.db") for p in places), "the server's database was searched"
    for where, data in places.items():
        for value in (secret, token):
            assert value.encode() not in data, f"{value} found in {where}"
    chaos_record(kind="fault", what="credentials searched in output, bucket, Prefect server",
                 injected=1, runs=1, completed=1, samples=8, lost=0, places=len(places),
                 outages=proxy.outages)
