"""The ``rescore`` flow: score a recorded batch again from cached features only.

New Interval Average ratio, RsCon windows, flag rule, reference budget or rolling bank: the
SNAMD features and IPG groupings of every sample are read from the cache, pair-distance shards
are reused where they exist (and computed from cached features where the references changed),
and no backbone is ever loaded. A sample whose features are no longer cached stops the run
with its name.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

from prefect import flow
from prefect.runtime import flow_run

from flows.progress import StageTracker
from flows.score_line import DEFAULT_STORAGE, bank_blocks, cache_url, default_batch_id
from flows.stages import report_run, score_pool
from infra.cluster import task_runner
from tasks.batches import config_from_record, load_bank, read_batch, read_batches
from tasks.features import missing_features
from tasks.keys import Identities
from tasks.outputs import safe_file_stem
from tasks.plan import PoolSample
from tasks.prepare import SetAside
from tasks.results import RunInfo
from tasks.runtime import Runtime
from tasks.verdicts import clean_records, read_verdicts, without_left_out


class FeaturesNotCached(RuntimeError):
    """Re-scoring needs features that are no longer in the cache."""


def _blocks(record: dict, identities: Identities, config) -> list[list[PoolSample]]:
    return bank_blocks([record], config, identities, set())


@flow(name="rescore-stages", validate_parameters=False)
def rescore_stages(record: dict, options: dict) -> dict:
    """Re-score one recorded batch on the task runner the outer flow chose."""
    started = datetime.now(timezone.utc)
    timings: dict[str, float] = {}
    storage, line = options["storage"], record["line"]
    config = config_from_record(record)
    changes = {k: options[k] for k in ("interval_ratio", "flag_mad_k") if options[k] is not None}
    if options["rescoring_windows"] is not None:
        changes["rescoring_windows"] = tuple(options["rescoring_windows"])
    config = replace(config, **changes)
    identities = Identities(record["identities"]["2d"], record["identities"]["3d"])
    runtime = Runtime(cache_url(storage), options["device"])
    tracker = StageTracker(total_stages=3)
    tonight = _blocks(record, identities, config)
    if options["reference_nights"] is None:
        bank_records = read_batches.submit(storage, line, list(record["bank"])).result()
        bank_records = without_left_out(bank_records, record.get("bank_left_out", {}))
    else:
        bank_records = load_bank.submit(
            storage, line, record["batch"], options["reference_nights"],
            options["reference_samples"], record["prep"],
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
    budget = options["reference_budget"]
    if budget is None:
        budget = record.get("reference_budget")
    pool, reduced, counts = score_pool(
        tonight + bank, None, config, budget, runtime, tracker, timings
    )
    set_aside = [SetAside(a["name"], a["path"], a["problem"]) for a in record["set_aside"]]
    weights = record["backbones"]
    info = RunInfo(
        line=line,
        batch=record["batch"],
        run_id=str(flow_run.get_id() or ""),
        started=started.isoformat(timespec="seconds"),
        out=options["out"],
        random_weights=(config.uses_2d and weights["weights_2d"] == "random")
        or (config.uses_3d and weights["weights_3d"] == "random"),
        backbones=identities.as_dict(),
        settings={
            "rescored_from": record["batch"],
            "data": record["data"],
            "storage": storage,
            "reference_budget": budget,
        },
    )
    bank_ids = [r["batch"] for r in bank_records]
    _, summary = report_run(
        info, pool, reduced, len(current), set_aside, config, runtime, counts, timings,
        tracker, bank_ids,
    )
    return summary


@flow(name="rescore", log_prints=True)
def rescore(
    line: str,
    batch: str | None = None,
    storage: str = DEFAULT_STORAGE,
    out: str | None = None,
    interval_ratio: float | None = None,
    rescoring_windows: list[int] | None = None,
    flag_mad_k: float | None = None,
    reference_budget: int | None = None,
    reference_nights: int | None = None,
    reference_samples: int | None = None,
    cluster: str = "local",
    workers: int = 1,
    device: str = "auto",
) -> dict:
    """Score a recorded batch of a line again from cached features, with new settings.

    Args:
        line: the line's name.
        batch: the batch to re-score; default: the line's latest.
        storage: storage root of the cache and batch records.
        out: output prefix; default ``<storage>/results/<line>/<batch>-rescore-<UTC time>``.
        interval_ratio: new Interval Average fraction (default: the batch's).
        rescoring_windows: new RsCon windows (default: the batch's).
        flag_mad_k: new k of the flag rule (default: the batch's).
        reference_budget: new reference budget (default: the batch's).
        reference_nights: earlier batches as references (default: the batch's own bank).
        reference_samples: most samples from earlier batches (with ``reference_nights``).
        cluster: ``local``, ``threads`` or a Dask scheduler address.
        workers: local worker processes (or threads).
        device: ``auto``, ``cpu`` or ``cuda:N``.

    Returns:
        The run summary (as ``score_line``'s).
    """
    record = read_batch.submit(storage, line, batch).result()
    destination = out or (
        f"{storage.rstrip('/')}/results/{safe_file_stem(line)}/"
        f"{record['batch']}-rescore-{default_batch_id()}"
    )
    options = {
        "storage": storage,
        "out": destination,
        "interval_ratio": interval_ratio,
        "rescoring_windows": rescoring_windows,
        "flag_mad_k": flag_mad_k,
        "reference_budget": reference_budget,
        "reference_nights": reference_nights,
        "reference_samples": reference_samples,
        "device": device,
    }
    return rescore_stages.with_options(task_runner=task_runner(cluster, workers))(record, options)
