"""The ``rescore`` flow: score a recorded batch again from cached features only.

New Interval Average ratio, RsCon windows, flag rule, reference budget or rolling bank: the
SNAMD features and IPG groupings of every sample are read from the cache, pair-distance shards
are reused where they exist (and computed from cached features where the references changed),
and no backbone is ever loaded. The features are those the batch computed, read under the
dtypes its record names (``dtypes``), on whichever machine the re-score runs; new shards are
in the distance dtype this run's workers resolve. A sample whose features are no longer cached
stops the run with its name.
"""

from __future__ import annotations

from dataclasses import replace

from prefect import flow

from flows.locations import default_batch_id
from flows.settings import RecordedBatch, RescoreRun, Rescoring
from flows.stages import begin_run, report_run, run_dtypes, run_info, score_pool
from infra.cluster import task_runner
from tasks.batches import load_bank, read_batch, read_batches
from tasks.features import missing_features
from tasks.formats.prepare import SetAside
from tasks.planning.bank import bank_blocks, record_identities
from tasks.records.batch_record import BatchRecord, config_from_record
from tasks.records.result_store import safe_file_stem
from tasks.records.verdicts import clean_records, read_verdicts, without_left_out


class FeaturesNotCached(RuntimeError):
    """Re-scoring needs features that are no longer in the cache."""


@flow(name="rescore-stages", validate_parameters=False)
def rescore_stages(record: BatchRecord, changes: Rescoring, run: RescoreRun) -> dict:
    """Re-score one recorded batch on the task runner the outer flow chose.

    Args:
        record: the batch's record.
        changes: what changes (None keeps the batch's value).
        run: storage, output prefix (resolved), device.
    """
    timings, started, runtime, tracker = begin_run(run.storage, run.device, 4)
    storage, line = run.storage, record.line
    given = config_from_record(record)
    new = {k: v for k, v in changes.model_dump().items()
           if v is not None and k in ("interval_ratio", "flag_mad_k", "rescoring_windows")}
    given = replace(given, **new)
    # The pool's features are read under the dtypes the batch's workers computed them in; the
    # shards and reductions computed here are in the dtype this run's workers resolve.
    distance = run_dtypes(given, runtime, ("distance_dtype",)).distance_dtype
    config = replace(given, **{**record.dtypes, "distance_dtype": distance})
    identities = record_identities(record)
    tonight = bank_blocks([record], config, identities, set())
    if changes.reference_nights is None:
        bank_records = read_batches.submit(storage, line, list(record.bank)).result()
        bank_records = without_left_out(bank_records, record.bank_left_out)
    else:
        bank_records = load_bank.submit(
            storage, line, record.batch, changes.reference_nights,
            changes.reference_samples, record.prep.model_dump(),
        ).result()
        bank_records, _ = clean_records(bank_records, read_verdicts(storage, line))
    current = [s for block in tonight for s in block]
    bank = bank_blocks(bank_records, config, identities, {s.keys.scored for s in current})
    needed = [
        (s.name, key)
        for block in tonight + bank
        for s in block
        for key in s.keys.features
        if key is not None
    ]
    missing = missing_features.submit(needed, runtime).result()
    if missing:
        raise FeaturesNotCached(
            f"{len(missing)} sample(s) of line {line!r} have no cached features (e.g. "
            f"{missing[:5]}); score the batch with score-line first"
        )
    budget = changes.reference_budget
    if budget is None:
        budget = record.reference_budget
    pool, reduced, counts, _ = score_pool(
        tonight + bank, None, config, budget, runtime, tracker, timings
    )
    set_aside = [SetAside(a.name, a.path, a.problem) for a in record.set_aside]
    weights = record.backbones
    random_weights = (config.uses_2d and weights.weights_2d == "random") or (
        config.uses_3d and weights.weights_3d == "random"
    )
    info = run_info(
        line, record.batch, started, run.out, random_weights, identities,
        {
            "rescored_from": record.batch,
            "data": record.data,
            "storage": storage,
            "reference_budget": budget,
        },
    )
    bank_ids = [r.batch for r in bank_records]
    _, summary = report_run(
        info, pool, reduced, len(current), set_aside, config, runtime, counts, timings,
        tracker, bank_ids,
    )
    return summary


@flow(name="rescore", log_prints=True)
def rescore(
    target: RecordedBatch,
    changes: Rescoring = Rescoring(),  # noqa: B008 (immutable settings model)
    run: RescoreRun = RescoreRun(),  # noqa: B008
) -> dict:
    """Score a recorded batch of a line again from cached features, with new settings.

    Args:
        target: the line and the batch (default: the line's latest).
        changes: new Interval Average fraction, RsCon windows, flag rule, reference budget
            or rolling bank (``reference_nights``: earlier batches as references instead of
            the batch's own bank); None keeps the batch's.
        run: storage, output prefix (default
            ``<storage>/results/<line>/<batch>-rescore-<id>``, the id being the UTC time and a
            random suffix), cluster, workers, device.

    Returns:
        The run summary (as ``score_line``'s).
    """
    record = read_batch.submit(run.storage, target.line, target.batch).result()
    destination = run.out or (
        f"{run.storage.rstrip('/')}/results/{safe_file_stem(target.line)}/"
        f"{record.batch}-rescore-{default_batch_id()}"
    )
    runner = task_runner(run.cluster, run.workers)
    resolved = run.model_copy(update={"out": destination})
    return rescore_stages.with_options(task_runner=runner)(record, changes, resolved)
