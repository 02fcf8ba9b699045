"""More blocks and shards than the task cap: grouped tasks, the same results."""

import asyncio
import time

import pytest

from musc_core.references import reference_plan
from tasks.planning import groups
from tests.flows.conftest import (
    SMALL,
    assert_matches,
    in_memory,
    pool_order,
    read_scores,
    run_line,
    small_config,
)

pytestmark = pytest.mark.usefixtures("prefect_server")

#: Task names of the stages the planner groups.
STAGE_TASKS = {
    "prepare": ("prepare",),
    "features": ("extract-2d", "aggregate-2d", "group", "extract-3d", "aggregate-3d"),
    "pairs": ("score-pairs",),
    "reduction": ("reduce",),
}


async def _read_task_runs(run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    names = []
    async with get_client() as client:
        offset = 0
        flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        while page := await client.read_task_runs(
            flow_run_filter=flow_filter, limit=200, offset=offset
        ):
            names += [run.name.rsplit("-", 1)[0] for run in page]
            offset += len(page)
    return names


def _stage_runs(run_id, expected_total, patience=60.0):
    """Task runs of the grouped stages the API recorded for the flow run, by stage.

    Task run records reach the server asynchronously: read again until the expected number
    arrived or ``patience`` seconds passed (then the assertion shows what did arrive).
    """
    deadline = time.monotonic() + patience
    while True:
        names = asyncio.run(_read_task_runs(run_id))
        runs = {stage: sum(names.count(n) for n in tasks) for stage, tasks in STAGE_TASKS.items()}
        if sum(runs.values()) >= expected_total or time.monotonic() > deadline:
            return runs
        time.sleep(1.0)


@pytest.mark.slow
def test_grouped_tasks_give_the_in_memory_results_and_the_planned_task_runs(
    line, tmp_path, monkeypatch
):
    store = str(tmp_path / "store")
    ungrouped = run_line(data=str(line), storage=str(tmp_path / "alone"), cluster="threads",
                         shard_size=2, batch="b1", **SMALL)
    monkeypatch.setattr(groups, "MAX_TASKS_PER_STAGE", 3)
    summary = run_line(data=str(line), storage=store, cluster="threads", shard_size=2,
                       batch="b1", **SMALL)
    # 8 samples in 4 blocks of 2, no budget: 10 shards; with a cap of 3 every stage is grouped
    assert summary["counts"]["pairs"] == {"computed": 20, "cached": 0}
    for stage in ("tokens_2d", "snamd_2d", "grouping", "tokens_3d", "snamd_3d", "reduced"):
        assert summary["counts"][stage] == {"computed": 8, "cached": 0}, stage
    planned = groups.planned_task_runs(8, 2, 4, len(reference_plan([2] * 4).block_pairs),
                                       "2d+3d", cap=3)
    assert (planned.prepare, planned.features, planned.pairs, planned.reduction) == (3, 15, 3, 3)
    runs = _stage_runs(summary["run_id"], planned.total)
    assert runs == {"prepare": 3, "features": 15, "pairs": 3, "reduction": 3}
    # grouping is execution only: the same results as one task per block and shard ...
    assert read_scores(summary["outputs"]["scores"]) == read_scores(
        ungrouped["outputs"]["scores"]
    )
    # ... and as the in-memory core pipeline
    config = small_config()
    order = pool_order([line], config)
    reference = in_memory(order, config)
    span = float(reference.maps.max() - reference.maps.min())
    assert_matches(
        summary, reference, [n for _, n in order], map_atol=0.005 * span, score_atol=1e-3
    )
    # a grouped run on the ungrouped run's store finds every entry there: the same keys
    again = run_line(data=str(line), storage=str(tmp_path / "alone"), cluster="threads",
                     shard_size=2, batch="b2", **SMALL)
    for stage, count in again["counts"].items():
        assert count["computed"] == 0, stage
