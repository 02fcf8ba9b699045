"""A line's reference bank for new parts: recorded batches whose cached entries are reused.

``score_new`` scores one or a few new parts against the samples of recorded batches of a line
(the *bank*) without touching the bank's samples again:

- every bank sample's SNAMD features and grouping are found in the cache by the keys its
  batch record implies (:func:`tasks.cache.keys.sample_keys` of its prepared keys, with the
  dtypes its batch's workers computed in: ``as_recorded``);
- a bank sample whose scored inputs equal a new part's (same prepared image / XYZ-map keys,
  whatever its mask or label) is left out, so a part is never scored against itself;
- a new part's references are the bank samples, so only the pair shards between the new
  parts' blocks and the bank's blocks are computed (:func:`plan_against_bank`);
- the bank samples' scores and salient features for RsCon are those of their own batch run:
  the reduced entries named in the batch record (older records without them: the keys are
  derived again from the recorded pool, :func:`bank_reductions`).

Everything here is plain logic on records and keys; the flow lives in ``flows/score_new.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from musc_core.config import MuscConfig
from tasks.cache.keys import (
    Identities,
    PairKeys,
    PreparedKeys,
    pairs_key,
    reduced_key,
    sample_keys,
)
from tasks.planning.blocks import (
    PairSource,
    PoolSample,
    ReduceItem,
    ScoringPlan,
    Shard,
    plan_scoring,
)
from tasks.records.batch_record import (
    BatchRecord,
    config_from_record,
    list_batches,
    read_batch_record,
)

log = logging.getLogger(__name__)
#: Record fields that must agree for batches to form one bank.
COMPATIBLE_FIELDS = ("prep", "config", "identities")


def choose_bank(
    storage: str, line: str, batches: Sequence[str] | None, nights: int
) -> list[BatchRecord]:
    """The batch records that form the bank, most recent first.

    Args:
        storage: storage root URL.
        line: the line.
        batches: batch ids to use; None for the line's latest ``nights`` batches.
        nights: how many of the latest batches (when ``batches`` is None), at least 1.

    Returns:
        The records. They share their preprocessing, configuration and backbone identities
        with the first one: a named batch that does not is an error, one of the latest
        batches that does not is skipped with a warning.

    Raises:
        FileNotFoundError: the line has no (such) batch.
        ValueError: named batches that cannot form one bank, or ``nights < 1``.
    """
    if batches:
        records = [read_batch_record(storage, line, b) for b in batches]
        first = records[0]
        for record in records[1:]:
            differing = _differing(first, record)
            if differing:
                raise ValueError(
                    f"batches {first.batch} and {record.batch} of line {line!r} cannot "
                    f"form one bank: their {', '.join(differing)} differ"
                )
        return records
    if nights < 1:
        raise ValueError(f"the bank needs at least one batch, got nights={nights}")
    ids = list_batches(storage, line)
    if not ids:
        raise FileNotFoundError(f"line {line!r} has no recorded batch in {storage}")
    records: list[BatchRecord] = []
    for batch in reversed(ids):
        if len(records) == nights:
            break
        record = read_batch_record(storage, line, batch)
        differing = _differing(records[0], record) if records else []
        if differing:
            log.warning("bank: skipping batch %s (%s differ)", batch, ", ".join(differing))
            continue
        records.append(record)
    return records


def _differing(first: BatchRecord, other: BatchRecord) -> list[str]:
    return [f for f in COMPATIBLE_FIELDS if getattr(first, f) != getattr(other, f)]


def computed_config(record: BatchRecord) -> MuscConfig:
    """The settings a batch's tasks computed with: as given, with the dtypes its workers resolved.

    Every key of the batch's pool (its samples and its rolling bank's) was derived from them.
    Records written before :attr:`BatchRecord.dtypes` give their settings as given, as their
    keys do.
    """
    return replace(config_from_record(record), **record.dtypes)


def record_identities(record: BatchRecord) -> Identities:
    """The backbone identities a batch was scored with."""
    return Identities(record.identities.get("2d"), record.identities.get("3d"))


def record_blocks(
    record: BatchRecord,
    config: MuscConfig,
    identities: Identities,
    exclude: set[tuple[str, str]],
    as_recorded: bool = False,
) -> list[list[PoolSample]]:
    """A batch's samples in the blocks they were scored in, without the excluded ones.

    Samples of records written before prepared entries were split by modality (a single
    prepared key) are skipped with a warning: their entries are not reachable any more.

    Args:
        record: the batch record.
        config: its configuration.
        identities: its backbone identities.
        exclude: scored-entry keys (:attr:`tasks.cache.keys.SampleKeys.scored`) to leave out: the
            new parts themselves, whatever their masks and labels.
        as_recorded: derive the feature keys with the dtypes the batch's workers computed in
            (:attr:`BatchRecord.dtypes`) instead of ``config``'s: the entries the batch wrote,
            for flows that run no backbone on it (re-scores, banks of new parts). Otherwise
            ``config``'s dtypes apply (a run that computes what is missing in its own).

    Returns:
        The blocks (possibly fewer or smaller than recorded).
    """
    if as_recorded:
        config = replace(config, **record.dtypes)
    grouped: dict[int, list[PoolSample]] = {}
    old = 0
    for sample in record.samples:
        if not isinstance(sample.prepared, dict):
            old += 1
            continue
        keys = sample_keys(PreparedKeys(**sample.prepared), config, identities)
        if keys.scored in exclude:
            continue
        grouped.setdefault(sample.block, []).append(
            PoolSample(
                name=sample.name,
                batch=record.batch,
                keys=keys,
                label=sample.label,
                defect_type=sample.defect_type,
            )
        )
    if old:
        log.warning(
            "batch %s: %d sample(s) recorded with old cache keys are left out; score the batch "
            "again to use them", record.batch, old,
        )
    return [grouped[b] for b in sorted(grouped)]


def bank_blocks(
    records: Sequence[BatchRecord],
    config: MuscConfig,
    identities: Identities,
    exclude: set[tuple[str, str]],
    as_recorded: bool = False,
) -> list[list[PoolSample]]:
    """Pool blocks of recorded batches, as they were stored, without the excluded samples.

    Args:
        records: the bank's batch records.
        config: their configuration.
        identities: their backbone identities.
        exclude: scored-entry keys to leave out (tonight's samples, the new parts).
        as_recorded: each record's feature keys with the dtypes its batch computed in
            (see :func:`record_blocks`).

    Returns:
        The blocks, record after record.
    """
    return [
        block
        for record in records
        for block in record_blocks(record, config, identities, exclude, as_recorded)
    ]


def bank_reductions(storage: str, record: BatchRecord) -> dict[str, str]:
    """The reduced-entry key of each sample of a batch, by name, as its run wrote them.

    Records written by ``score_line`` hold them; for older records the keys are derived again
    from the recorded pool (the batch's blocks, then its rolling bank's, planned with the
    recorded reference budget), which needs the bank's records still in storage.

    Args:
        storage: storage root URL.
        record: the batch record.

    Returns:
        ``{sample name: reduced key}`` for every sample of the batch.
    """
    if all(s.reduced is not None for s in record.samples):
        return {s.name: s.reduced for s in record.samples}
    config = computed_config(record)
    identities = record_identities(record)
    own = record_blocks(record, config, identities, set())
    scored = {s.keys.scored for block in own for s in block}
    older: list[list[PoolSample]] = []
    for batch in record.bank:
        older += record_blocks(
            read_batch_record(storage, record.line, batch), config, identities, scored
        )
    plan = plan_scoring(own + older, config, record.reference_budget)
    count = sum(len(b) for b in own)
    items = [item for items in plan.reduce for item in items][:count]
    return {s.name: item.key for s, item in zip(plan.samples[:count], items, strict=True)}


def plan_against_bank(
    new_blocks: list[list[PoolSample]],
    bank_blocks: list[list[PoolSample]],
    config: MuscConfig,
    budget: int | None,
) -> ScoringPlan:
    """Shards and reductions that score new parts against a bank, and nothing else.

    Each new part's references are the bank's samples in bank order (the first ``budget`` of
    them with a reference budget); new parts are not references of each other, so a part's
    map does not depend on which other parts were scored with it. The bank is not reduced.

    Args:
        new_blocks: the new parts, block by block.
        bank_blocks: the bank's samples, block by block as their batches stored them.
        config: settings that enter the shard and reduction keys.
        budget: most references per part, None for the whole bank.

    Returns:
        A plan over ``new_blocks + bank_blocks`` whose shards pair a new block with a bank
        block (arrays ``d_ab``: the new part's rows) and whose ``reduce`` lists only the new
        blocks; ``references`` lists, per new part, the pool indices of its references.
    """
    if budget is not None and budget < 1:
        raise ValueError(f"reference budget must be at least 1, got {budget}")
    first = len(new_blocks)
    blocks = new_blocks + bank_blocks
    starts = [sum(len(b) for b in blocks[:index]) for index in range(len(blocks))]
    columns = [(first + b, row) for b, block in enumerate(bank_blocks) for row in range(len(block))]
    if budget is not None:
        columns = columns[:budget]
    if not columns:
        raise ValueError("the bank holds no sample to score against")
    used = sorted({b for b, _ in columns})
    shards: list[Shard] = []
    keys: dict[tuple[int, int], PairKeys] = {}
    for a in range(first):
        for b in used:
            keys[(a, b)] = pairs_key(
                [s.keys for s in blocks[a]], [s.keys for s in blocks[b]], config
            )
            shards.append(Shard(a, b, keys[(a, b)]))
    reduce: list[list[ReduceItem]] = []
    references: list[list[int]] = []
    for a, block in enumerate(new_blocks):
        items: list[ReduceItem] = []
        for row, sample in enumerate(block):
            sources: list[PairSource] = []
            for b in used:
                taken = tuple(r for bb, r in columns if bb == b)
                sources.append(PairSource(keys[(a, b)], "d_ab", row, taken))
            refs = [blocks[b][r].keys for b, r in columns]
            items.append(ReduceItem(sample.keys, reduced_key(sample.keys, refs, config),
                                    tuple(sources)))
            references.append([starts[b] + r for b, r in columns])
        reduce.append(items)
    return ScoringPlan(blocks, shards, reduce, references)
