"""Stage-by-stage composition of tasks, shared by every flow (score-line, rescore, score-new).

Each function submits one stage's tasks to the flow's task runner, waits for all of them while
reporting progress, and returns the tasks' work counts. A task takes one block or shard, or a
group of consecutive ones when there are more than :data:`tasks.planning.groups.MAX_TASKS_PER_STAGE`
(:mod:`tasks.planning.groups`), so a flow's task runs stay bounded whatever the pool size. The
stages are separated by these waits, so their wall times are measured one by one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import NamedTuple

from prefect import get_run_logger
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run

from flows.locations import cache_url
from flows.progress import StageTracker
from infra.cluster import on_every_worker
from infra.storage import is_full, is_unreachable
from musc_core.config import MuscConfig
from musc_core.hardware import DTYPE_SETTINGS
from tasks.backbones import BackboneSpec
from tasks.cache.keys import Identities, decisions_key, prepared_keys, sample_keys
from tasks.decisions import decide
from tasks.discover import DiscoveredSample
from tasks.features import (
    aggregate_2d,
    aggregate_3d,
    extract_2d,
    extract_3d,
    group_samples,
    prepare_samples,
)
from tasks.formats.prepare import PLANE_ALREADY_REMOVED, SetAside
from tasks.layout import lay_out_pool
from tasks.planning import groups
from tasks.planning.blocks import PoolSample, ScoringPlan, plan_scoring
from tasks.records.run_summary import RunFacts
from tasks.results import LineResult, RunInfo, report_line
from tasks.runtime import Runtime, agreed_dtypes, worker_dtypes
from tasks.scoring import reduce_samples, score_pairs
from tasks.stage import StageCount, add_counts


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall seconds of the enclosed block to ``timings[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def wait_stage(tracker: StageTracker, stage: str, futures: list[PrefectFuture]) -> list:
    """Wait for a stage's futures (progress reported as they finish); their results in order.

    A task that failed because the storage cannot be reached, or has no space left, fails
    the stage at once: the tasks still queued would each spend their own retries on the same
    endpoint first, or fill what space is left without a chance to finish.
    """
    for future in tracker.track(stage, futures):
        if future.state.is_failed():
            try:
                future.result()
            except Exception as error:
                if is_unreachable(error) or is_full(error):
                    raise
    return [future.result() for future in futures]


def compute_features(
    blocks: list[list[PoolSample]],
    spec: BackboneSpec | None,
    config: MuscConfig,
    runtime: Runtime,
    tracker: StageTracker,
) -> list[StageCount]:
    """Make sure every pool sample's features are cached, one chain of tasks per group of blocks.

    The chains: 2D tokens then 2D SNAMD; IPG grouping, 3D tokens, then 3D SNAMD. A task works
    block by block (one batch each).

    Args:
        blocks: the pool, block by block.
        spec: the backbones; None when every feature must already be cached (re-scoring):
            then nothing is submitted and a missing entry fails the reduction.
        config: the stages' settings.
        runtime: cache and device of the tasks.
        tracker: progress of the run.

    Returns:
        The tasks' work counts.
    """
    if spec is None:
        return []
    futures: list[PrefectFuture] = []
    for span in groups.contiguous_groups(len(blocks)):
        keys = [[s.keys for s in blocks[b]] for b in span]
        if config.uses_2d:
            tokens = extract_2d.submit(
                [[(k.prepared.image, k.tokens_2d) for k in block] for block in keys],
                spec, config, runtime,
            )
            futures += [
                tokens,
                aggregate_2d.submit(
                    [[(k.tokens_2d, k.snamd_2d) for k in block] for block in keys],
                    config, runtime, wait_for=[tokens],
                ),
            ]
        if config.uses_3d:
            grouped = group_samples.submit(
                [[(k.prepared.points, k.grouping) for k in block] for block in keys],
                config, runtime,
            )
            tokens_3d = extract_3d.submit(
                [[(k.grouping, k.tokens_3d) for k in block] for block in keys],
                spec, config, runtime, wait_for=[grouped],
            )
            futures += [
                grouped,
                tokens_3d,
                aggregate_3d.submit(
                    [[(k.tokens_3d, k.grouping, k.snamd_3d) for k in block] for block in keys],
                    config, runtime, wait_for=[tokens_3d],
                ),
            ]
    return wait_stage(tracker, "features", futures)


def score_all_pairs(
    plan: ScoringPlan, config: MuscConfig, runtime: Runtime, tracker: StageTracker
) -> list[StageCount]:
    """Compute the plan's pair-distance shards that are not cached yet (groups of shards)."""
    futures = [
        score_pairs.submit(
            [[s.keys for s in plan.blocks[b]] for b in group.blocks],
            list(group.shards),
            config,
            runtime,
        )
        for group in groups.shard_groups(plan)
    ]
    return wait_stage(tracker, "pair scoring", futures)


def reduce_all(
    plan: ScoringPlan, config: MuscConfig, runtime: Runtime, tracker: StageTracker
) -> list[StageCount]:
    """Reduce every pool sample (CAE, Interval Average, maps, salient feature), groups of blocks."""
    futures = [
        reduce_samples.submit(items, config, runtime)
        for items in groups.reduce_groups(plan)
    ]
    return wait_stage(tracker, "reduction", futures)


class ScoredPool(NamedTuple):
    """What :func:`score_pool` did.

    Attributes:
        samples: the pool's samples in the order they were scored (block after block).
        reduced: the key of each one's reduced entry, in that order.
        counts: the stages' work counts.
        blocks: the blocks they were scored in (with similar references, each batch's
            samples laid out again: tonight's come first still, in other blocks).
    """

    samples: list[PoolSample]
    reduced: list[str]
    counts: list[StageCount]
    blocks: list[list[PoolSample]]


def lay_out(
    blocks: list[list[PoolSample]], config: MuscConfig, budget: int | None, runtime: Runtime
) -> tuple[list[list[PoolSample]], list[list[int]] | None]:
    """The blocks the references are planned on, and each block's preferred blocks.

    Under a budget smaller than the pool with ``reference_choice="similar"``, the
    ``lay-out-references`` task lays every batch out in blocks of alike samples; otherwise the
    blocks are kept and the references follow the cycle order (None).
    """
    pool = sum(len(block) for block in blocks)
    if budget is None or budget >= pool - 1 or config.reference_choice != "similar":
        return blocks, None
    flat = [s for block in blocks for s in block]
    layout, preferred = lay_out_pool.submit(
        [s.keys.features for s in flat],
        [(s.keys.prepared.content, s.name) for s in flat],
        [block[0].batch for block in blocks],
        [len(block) for block in blocks],
        budget,
        config,
        runtime,
    ).result()
    return [[flat[i] for i in block] for block in layout], preferred


def score_pool(
    blocks: list[list[PoolSample]],
    spec: BackboneSpec | None,
    config: MuscConfig,
    budget: int | None,
    runtime: Runtime,
    tracker: StageTracker,
    timings: dict[str, float],
) -> ScoredPool:
    """Features (when ``spec`` is given), shards and reductions of a pool.

    Args:
        blocks: the pool, block by block (tonight's first, then the bank's).
        spec: the backbones, or None to use cached features only.
        config: the run's settings.
        budget: references per sample, None for all.
        runtime: cache and device of the tasks.
        tracker: progress of the run.
        timings: stage wall times, updated.

    Returns:
        The pool's samples in order, the key of each one's reduced entry, the counts and the
        blocks.
    """
    with timed(timings, "features"):
        counts = compute_features(blocks, spec, config, runtime, tracker)
    laid_out, preferred = lay_out(blocks, config, budget, runtime)
    plan = plan_scoring(laid_out, config, budget, preferred)
    with timed(timings, "pair_scoring"):
        counts += score_all_pairs(plan, config, runtime, tracker)
    with timed(timings, "reduction"):
        counts += reduce_all(plan, config, runtime, tracker)
    reduced = [item.key for items in plan.reduce for item in items]
    return ScoredPool(plan.samples, reduced, counts, plan.blocks)


def begin_run(storage: str, device: str, stages: int) -> tuple[
    dict[str, float], datetime, Runtime, StageTracker
]:
    """What every flow's stages start with.

    Args:
        storage: the storage root (the feature cache is below it).
        device: ``auto``, ``cpu`` or ``cuda:N`` for every task.
        stages: how many stages the run reports progress for.

    Returns:
        Empty stage timings, the UTC start time, the tasks' runtime and the progress tracker.
    """
    runtime = Runtime(cache_url(storage), device)
    return {}, datetime.now(timezone.utc), runtime, StageTracker(total_stages=stages)


def run_dtypes(
    config: MuscConfig, runtime: Runtime, settings: tuple[str, ...] = DTYPE_SETTINGS
) -> MuscConfig:
    """The settings with each dtype setting as the run's workers compute it.

    Asks every worker of the flow's task runner what it resolves the settings to on the tasks'
    device (:func:`tasks.runtime.worker_dtypes`) and takes what they agree on, float32 where
    workers of different kinds disagree (:func:`tasks.runtime.agreed_dtypes`, one warning
    each). Run before any key is derived: the keys name these dtypes, never ``auto``, so an
    entry's key says what it holds whichever worker wrote it.

    Args:
        config: the settings as given.
        runtime: the tasks' device.
        settings: the dtype settings to resolve (the others are kept as given).

    Returns:
        The settings the run's tasks get, each of ``settings`` ``float32`` or ``bfloat16``.

    Raises:
        ValueError: a worker without native bf16 for an explicit ``bfloat16``.
    """
    answers = on_every_worker(worker_dtypes, config, runtime.device, settings)
    resolved, warnings = agreed_dtypes(config, answers, settings)
    for warning in warnings:
        get_run_logger().warning(warning)
    return resolved


def prepare_pool_samples(
    found: list[DiscoveredSample],
    data_format: str,
    config: MuscConfig,
    identities: Identities,
    batch: str,
    shard_size: int,
    runtime: Runtime,
    tracker: StageTracker,
    set_aside: list[SetAside],
) -> tuple[list[PoolSample], dict[str, str]]:
    """Prepare the discovered samples in chunks of ``shard_size`` (groups of chunks per task).

    What cannot be used is set aside.

    Args:
        found: the discovered samples with their input digests.
        data_format: their dataset layout.
        config: the run's settings.
        identities: the backbones' identities (they enter the samples' keys).
        batch: the batch the samples belong to in the pool.
        shard_size: samples per preparation chunk.
        runtime: cache and device of the tasks.
        tracker: progress of the run.
        set_aside: the run's set-aside samples; the ones that fail preparation are added.

    Returns:
        The usable samples as pool samples, and the cleaning applied by sample name (for
        :func:`preparation_summary`).
    """
    keys = [prepared_keys(s.digests, data_format, s.record.category, config) for s in found]
    pairs = list(zip(found, keys, strict=True))
    chunks = -(-len(pairs) // shard_size)
    futures = [
        prepare_samples.submit(
            pairs[span.start * shard_size : span.stop * shard_size], data_format, config, runtime
        )
        for span in groups.contiguous_groups(chunks)
    ]
    outcomes = [o for chunk in wait_stage(tracker, "prepare", futures) for o in chunk]
    current: list[PoolSample] = []
    cleaning: dict[str, str] = {}
    for sample, key, (name, problem, cleaned) in zip(found, keys, outcomes, strict=True):
        record = sample.record
        if problem is not None:
            main = record.image_path or record.xyz_path or record.depth_path or name
            set_aside.append(SetAside(name, str(main), problem))
            continue
        if cleaned is not None:
            cleaning[name] = cleaned
        current.append(
            PoolSample(name, batch, sample_keys(key, config, identities), record.label,
                       record.defect_type)
        )
    return current, cleaning


def run_info(
    line: str,
    batch: str,
    started: datetime,
    out: str,
    random_weights: bool,
    identities: Identities,
    settings: dict[str, object],
) -> RunInfo:
    """The facts of this flow run that its result files record (:class:`RunInfo`)."""
    return RunInfo(
        line=line,
        batch=batch,
        run_id=str(flow_run.get_id() or ""),
        started=started.isoformat(timespec="seconds"),
        out=out,
        random_weights=random_weights,
        backbones=identities.as_dict(),
        settings=settings,
    )


def preparation_summary(cleaning: dict[str, str]) -> dict[str, object]:
    """What ``run.json`` says about the dataset cleaning of the scored samples.

    Args:
        cleaning: the cleaning applied (see :class:`tasks.formats.prepare.PrepInfo`) by sample name,
            for the samples that had one.

    Returns:
        ``{"cleaning": {step: count}, "pre_cleaned": [names]}``: how many samples got each
        cleaning, and the MVTec 3D-AD samples found with their support plane already removed.
    """
    counts: dict[str, int] = {}
    for step in cleaning.values():
        counts[step] = counts.get(step, 0) + 1
    pre_cleaned = sorted(n for n, step in cleaning.items() if step == PLANE_ALREADY_REMOVED)
    return {"cleaning": counts, "pre_cleaned": pre_cleaned}


def report_run(
    info: RunInfo,
    pool: list[PoolSample],
    reduced: list[str],
    current: int,
    set_aside: list[SetAside],
    config: MuscConfig,
    runtime: Runtime,
    counts: list[StageCount],
    timings: dict[str, float],
    tracker: StageTracker,
    bank: list[str],
    against_bank: bool = False,
    preparation: dict[str, object] | None = None,
) -> tuple[LineResult, dict]:
    """RsCon and the decisions (a cached stage), then metrics and result files; the summary.

    Args:
        info: the run's identity and settings.
        pool: the pool's samples; the first ``current`` are the batch's own.
        reduced: reduced-entry key of each pool sample.
        current: how many pool samples belong to the batch.
        set_aside: samples that could not be used.
        config: the run's settings.
        runtime: cache and device of the tasks.
        counts: work counts of the stages so far.
        timings: stage wall times (``decisions`` and ``report`` are added).
        tracker: progress of the run.
        bank: batch ids of the rolling bank.
        against_bank: new parts scored against a reference bank: decisions use the bank's
            thresholds (see :func:`tasks.decisions.decide_pool`).
        preparation: what the dataset cleaning did (:func:`preparation_summary`), for
            ``run.json``; None to leave it out.

    Returns:
        The report task's result and the summary the flow returns (also in ``run.json``).
    """
    key = decisions_key(reduced, current, config, against_bank)
    with timed(timings, "decisions"):
        decided = decide.submit(reduced, current, key, config, runtime, against_bank)
        counts = [*counts, *wait_stage(tracker, "decisions", [decided])]
    started = datetime.fromisoformat(info.started)
    facts = RunFacts(
        counts=add_counts(counts),
        timings={k: round(v, 3) for k, v in timings.items()},
        seconds=round((datetime.now(timezone.utc) - started).total_seconds(), 3),
        bank=bank,
        preparation=preparation,
    )
    with timed(timings, "report"):
        result = report_line.submit(
            info, pool, reduced, current, key, set_aside, config, runtime, facts, against_bank
        ).result()
        tracker.report("report", 1, 1)
    final = result.summary.model_copy(update={
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "seconds": round((datetime.now(timezone.utc) - started).total_seconds(), 3),
        "outputs": dict(result.outputs),
    })
    summary = final.flow_result()
    return result, summary
