"""Deployment the way users do it: a process work pool, `prefect deploy` from prefect.yaml,
`prefect deployment run --watch` served by a worker, results checked in the bucket."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from infra.storage import open_filesystem
from tests.flows.conftest import upload_tree

pytestmark = [pytest.mark.slow, pytest.mark.s3]
ROOT = Path(__file__).resolve().parents[2]


def _prefect(*args, env, timeout=300):
    result = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_deploy_and_run_a_line_from_prefect_yaml(prefect_server, line, s3_env, tmp_path):
    pool = f"musc-test-{uuid.uuid4().hex[:8]}"
    storage = f"{s3_env}/deployed"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "MUSC_WORK_POOL": pool,
        "MUSC_LINE_DATA": upload_tree(line, f"{s3_env}/line-data"),  # the data in a bucket too
        "MUSC_STORAGE": storage,
        "MUSC_POINT_MAE_WEIGHTS": "random",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    _prefect("work-pool", "create", pool, "--type", "process", env=env)
    out = _prefect("--no-prompt", "deploy", "--name", "synthetic-line", env=env)
    assert "synthetic-line" in out
    worker_log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool],
        cwd=tmp_path, env=env, stdout=worker_log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        run = _prefect(
            "deployment", "run", "score-line/synthetic-line", "--param", "batch=deployed1",
            "--watch", "--watch-timeout", "400", env=env, timeout=450,
        )
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        worker_log.close()
    assert "Completed" in run, run + (tmp_path / "worker.log").read_text()
    fs, root = open_filesystem(storage)
    written = fs.find(root)
    assert any(p.endswith("/results/part/deployed1/scores.csv") for p in written)
    assert any(p.endswith("/results/part/deployed1/report.html") for p in written)
    assert any(p.endswith("/lines/part/batches/deployed1.json") for p in written)
    scores = fs.cat_file(f"{root}/results/part/deployed1/scores.csv").decode()
    # plain CSV (header and 8 rows): random weights stated in a column of every row
    rows = scores.splitlines()
    assert rows[0].endswith(",random_weights") and len(rows) == 9
    assert all(row.endswith(",1") for row in rows[1:])
