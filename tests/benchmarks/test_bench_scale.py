"""The scale benchmark at a tiny N: the real flow, the task runs the planner says."""

import argparse

import pytest

from benchmarks import bench_scale
from tasks.planning import groups


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_scale_benchmark_runs_a_tiny_line_and_counts_the_planned_task_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(groups, "MAX_TASKS_PER_STAGE", 4)  # 6 blocks, 12 shards: all grouped
    args = argparse.Namespace(budget=5, shard_size=4, image_size=32, cluster="threads", workers=1)
    row = bench_scale.run_size(tmp_path, 24, args)
    planned = row["planned"]
    assert (planned["blocks"], planned["shards"]) == (6, 12)  # own block, then the next one
    assert row["scored"] == 24
    assert row["task_runs_grouped_stages"] == {
        "prepare": 4, "features": 8, "pairs": 4, "reduction": 4
    }
    assert row["task_runs"] > planned["total"]  # discovery, decisions, report, ...
    assert row["peak_rss_flow_mib"] > 0 and row["processes_started"] == 0  # threads: no worker
