"""The stages of one run of a line, shared by the ``score-line`` flow and the evaluation.

``discover → prepare → 2D tokens / grouping → 3D tokens → SNAMD → pair-scoring shards →
per-sample reduction (CAE + Interval Average + maps) → RsCon + report``, every intermediate
cached by content in the feature cache and every task running on the chosen cluster; the run
is recorded as a batch of its line.
"""

from __future__ import annotations

from datetime import datetime

from prefect import flow, get_run_logger

from flows.line_request import LineRequest, batch_record, prep_settings
from flows.progress import StageTracker
from flows.stages import (
    begin_run,
    preparation_summary,
    prepare_pool_samples,
    report_run,
    run_dtypes,
    run_info,
    score_pool,
    timed,
)
from infra.cluster import task_runner
from musc_core.config import MuscConfig
from tasks.batches import load_bank, record_batch
from tasks.cache.keys import Identities
from tasks.cache.store import CacheCorruption
from tasks.discover import DiscoveredSample, discover_samples
from tasks.features import drop_entry
from tasks.formats.prepare import SetAside
from tasks.planning.bank import bank_blocks
from tasks.planning.blocks import batch_blocks
from tasks.records.verdicts import clean_records, read_verdicts
from tasks.reporting.artifacts import publish_history
from tasks.reporting.history_page import write_history
from tasks.runtime import Runtime, identify_backbones

#: Times a run drops a corrupted cache entry and runs again before giving up.
CORRUPTION_RETRIES = 3


def select_samples(
    found: list[DiscoveredSample], set_aside: list[SetAside], names: tuple[str, ...]
) -> tuple[list[DiscoveredSample], list[SetAside]]:
    """The discovered and set-aside samples named in ``names``.

    Raises:
        ValueError: a name the line does not have.
    """
    wanted = set(names)
    unknown = wanted - {s.record.name for s in found} - {a.name for a in set_aside}
    if unknown:
        raise ValueError(f"the line has no sample(s) named {sorted(unknown)[:5]}")
    return (
        [s for s in found if s.record.name in wanted],
        [a for a in set_aside if a.name in wanted],
    )


@flow(name="score-line-stages", validate_parameters=False)
def score_line_stages(request: LineRequest) -> dict:
    """The stages of one line's run on the task runner the outer flow chose."""
    timings, started, runtime, tracker = begin_run(request.storage, request.device, 6)
    config = run_dtypes(request.config, runtime)
    with timed(timings, "discover"):
        found, set_aside = discover_samples.submit(
            request.data, request.data_format, request.category
        ).result()
        identities = identify_backbones.submit(request.spec, config, runtime).result()
    if request.samples is not None:
        found, set_aside = select_samples(found, set_aside, request.samples)
    for attempt in range(1, CORRUPTION_RETRIES + 2):
        try:
            return _score_batch(
                request, config, found, list(set_aside), identities, runtime, tracker, timings,
                started,
            )
        except CacheCorruption as error:
            if attempt > CORRUPTION_RETRIES or error.key is None:
                raise
            get_run_logger().warning(
                "cache entry %s is corrupted (%s); deleting it and running again", error.key, error
            )
            drop_entry.submit(error.key, runtime).result()
    raise AssertionError("unreachable")


def _score_batch(
    request: LineRequest,
    config: MuscConfig,
    found: list[DiscoveredSample],
    set_aside: list[SetAside],
    identities: Identities,
    runtime: Runtime,
    tracker: StageTracker,
    timings: dict[str, float],
    started: datetime,
) -> dict:
    """Prepare, score and report one batch (run again after a corrupted entry was dropped).

    ``config`` is the request's settings with the dtypes the workers resolved
    (:func:`flows.stages.run_dtypes`): every key of the run is derived from it.
    """
    with timed(timings, "prepare"):
        current, cleaning = prepare_pool_samples(
            found, request.data_format, config, identities, request.batch,
            request.shard_size, runtime, tracker, set_aside,
        )
    records = load_bank.submit(
        request.storage,
        request.line,
        request.batch,
        request.reference_nights,
        request.reference_samples,
        prep_settings(request),
    ).result()
    left_out: dict[str, dict[str, str]] = {}
    if request.clean_bank and records:
        records, left_out = clean_records(records, read_verdicts(request.storage, request.line))
    tonight = batch_blocks(current, request.shard_size) if current else []
    bank = bank_blocks(records, config, identities, {s.keys.scored for s in current})
    pool_size = len(current) + sum(len(b) for b in bank)
    if len(current) == 0 or pool_size < 2:
        raise LineNotScored(request.line, len(current), set_aside)
    pool, reduced, counts, scored_blocks = score_pool(
        tonight + bank, request.spec, config, request.reference_budget, runtime, tracker, timings
    )
    tonight = scored_blocks[: len(tonight)]  # laid out again for similar references
    info = run_info(
        request.line, request.batch, started, request.out,
        request.spec.random_weights(config), identities,
        {
            "data": request.data,
            "format": request.data_format,
            "category": request.category,
            "storage": request.storage,
            "shard_size": request.shard_size,
            "reference_budget": request.reference_budget,
            "reference_nights": request.reference_nights,
            "reference_samples": request.reference_samples,
            "bank_policy": "clean" if request.clean_bank else "every sample",
            "bank_left_out": left_out,
        },
    )
    bank_ids = [r.batch for r in records]
    result, summary = report_run(
        info, pool, reduced, len(current), set_aside, config, runtime, counts, timings,
        tracker, bank_ids, preparation=preparation_summary(cleaning),
    )
    record = batch_record(
        request, identities, tonight, set_aside, bank_ids, result, reduced[: len(current)],
        config, bank_left_out=left_out,
    )
    record_batch.submit(request.storage, record).result()
    summary["outputs"]["history"] = write_history(request.storage, request.line)
    publish_history(request.line, summary["outputs"]["history"])
    return summary


class LineNotScored(RuntimeError):
    """A line with fewer than two usable samples (in the batch and its bank together).

    Attributes:
        line: the line.
        usable: usable samples of the batch.
        set_aside: the samples set aside, with their problems.
    """

    def __init__(self, line: str, usable: int, set_aside: list[SetAside]) -> None:
        self.line = line
        self.usable = usable
        self.set_aside = set_aside
        super().__init__(
            f"line {line!r}: {usable} usable sample(s), {len(set_aside)} set aside; mutual "
            "scoring needs at least 2 (tonight's samples and the rolling bank together)"
        )


def run_line(request: LineRequest, cluster: str, workers: int) -> dict:
    """Run the stages of ``request`` on a task runner for ``cluster``; the run's summary."""
    runner = task_runner(cluster, workers)
    return score_line_stages.with_options(task_runner=runner)(request)
