"""The ``score-new`` flow: score new parts of a line against its reference bank in seconds.

A production line's batches are scored at night; a part that arrives during the day (a
re-inspection, a part from a customer return) should not wait for the next batch, nor make
the whole bank go through the backbones again. ``score_new`` scores one or a few new samples
against the cached entries of recorded batches of the line (the *bank*: a named batch or the
line's latest N):

- only the new parts are prepared and go through the backbones (with the bank's settings and
  backbones, checked by identity);
- each new part is scored against the bank's samples (its references; new parts are not
  references of each other), with the same pair distances, CAE, Interval Average and maps as
  a batch run: only the shards between the new parts and the bank are computed;
- RsCon runs over the new parts and the bank together; the bank samples' scores and salient
  features are those of their own batch run, read from their cached reductions (the bank is
  never reduced again). A bank sample whose scored inputs (image / XYZ bytes, hence its
  prepared image and XYZ-map keys) equal a new part's is left out of the bank, whatever its
  mask or label, so scoring a sample of a batch against the rest of that batch with the
  naive bank (``BankChoice(clean_bank=False)``, ``--no-clean-bank``) gives that batch run's
  map, score and RsCon score for it;
- the bank is clean by default, like the batch run's rolling bank: a bank sample flagged in
  its night is no reference unless an operator cleared it (``musc verdict LINE SAMPLE ok``),
  and a confirmed defect never is (:func:`tasks.records.verdicts.clean_records`);
- a part is flagged when its RsCon score exceeds the robust threshold of the bank's RsCon
  scores in the same pool; the pixel threshold comes from the bank's map maxima.

Results are written like a run's (``scores.csv``, maps, overlays, ``report.html``,
``run.json``); no batch is recorded unless asked (``record_as``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from prefect import flow

from flows.line_request import LineRequest, batch_record
from flows.locations import default_batch_id, results_url
from flows.settings import BankChoice, NewParts, NewPartsChanges, NewPartsRun
from flows.stages import (
    begin_run,
    compute_features,
    preparation_summary,
    prepare_pool_samples,
    reduce_all,
    report_run,
    run_dtypes,
    run_info,
    score_all_pairs,
    timed,
)
from infra.cluster import task_runner
from musc_core.config import MuscConfig
from tasks.backbones import BackboneSpec
from tasks.batches import record_batch
from tasks.cache.keys import Identities
from tasks.discover import DiscoveredSample, discover_line, input_digests
from tasks.features import missing_features
from tasks.formats.datasets import SampleRecord, list_categories
from tasks.formats.prepare import SetAside
from tasks.formats.sources import is_folder, is_url
from tasks.planning.bank import (
    bank_blocks,
    bank_reductions,
    choose_bank,
    plan_against_bank,
    record_identities,
)
from tasks.planning.blocks import PoolSample, batch_blocks
from tasks.records.batch_record import (
    BatchRecord,
    check_batch_id,
    check_new_batch,
    config_from_record,
)
from tasks.records.verdicts import clean_records, read_verdicts
from tasks.runtime import identify_backbones


class BankNotUsable(RuntimeError):
    """The bank's cached entries are missing or were made with other backbones."""


@dataclass(frozen=True)
class NewPartsRequest:
    """Everything a ``score_new`` run needs, resolved from the flow's parameters.

    Attributes:
        line: the line whose bank is used.
        inputs: a folder, or image files (and XYZ-only TIFFs) of the new parts.
        xyz: XYZ TIFFs matched to ``inputs`` by position, or None.
        data_format: layout of a folder input (``folder``, ``mvtec3d``, ...).
        category: category of a folder input (default: its only one).
        storage: storage root of the cache and the batch records.
        out: output prefix of the results.
        run: this run's id (the new parts' batch name in the pool).
        records: the bank's batch records, most recent first.
        spec: the bank's backbones (weights possibly overridden by path).
        config: the bank's settings (flag rule possibly changed).
        shard_size: new parts per block.
        reference_budget: most bank samples per part, None for the whole bank.
        device: ``auto``, ``cpu`` or ``cuda:N``.
        record_as: batch id to record the new parts under, or None.
        clean_bank: whether the bank is clean (flagged, not cleared, and confirmed-defective
            samples left out); False takes every sample of the bank's batches.
        bank_left_out: ``{batch: {sample: reason}}`` the clean bank left out (empty for the
            naive bank).
    """

    line: str
    inputs: tuple[str, ...]
    xyz: tuple[str, ...] | None
    data_format: str
    category: str | None
    storage: str
    out: str
    run: str
    records: tuple[BatchRecord, ...]
    spec: BackboneSpec
    config: MuscConfig
    shard_size: int
    reference_budget: int | None
    device: str
    record_as: str | None
    clean_bank: bool
    bank_left_out: dict[str, dict[str, str]]


def part_records(
    images: list[str], xyz: list[str] | None, category: str
) -> list[SampleRecord]:
    """Sample records of new parts given as files.

    Args:
        images: image files (may be empty for 3D-only parts).
        xyz: XYZ TIFFs, one per image (same order), or the parts themselves when there are no
            images; None without 3D.
        category: the line (the records' category).

    Returns:
        One record per part, named by its path as given without the suffix (see
        :func:`part_name`).

    Raises:
        ValueError: no file, or images and XYZ maps that do not pair up.
    """
    xyz = list(xyz or [])
    if not images and not xyz:
        raise ValueError("no new part given: pass image files, XYZ TIFFs or a folder")
    if images and xyz and len(images) != len(xyz):
        raise ValueError(f"{len(images)} image(s) but {len(xyz)} XYZ map(s): pass one per image")
    count = max(len(images), len(xyz))
    pairs = [
        (images[i] if images else None, xyz[i] if xyz else None) for i in range(count)
    ]
    return [
        SampleRecord(
            name=part_name(image or cloud), category=category, image_path=image, xyz_path=cloud
        )
        for image, cloud in pairs
    ]


def part_name(path: str) -> str:
    """A new part's name: its file's path as given, suffix dropped, ``/`` separated.

    A relative path is kept as written (normalized: ``./`` and ``..`` resolved textually);
    an absolute path below the current folder is taken relative to it, any other absolute
    path is kept whole (without its leading ``/``). So ``crack/rgb/000.png`` is
    ``crack/rgb/000``, never just ``000``. An object's URL gives its path in the store
    (``s3://bucket/day/000.png`` is ``bucket/day/000``).
    """
    if is_url(path):
        return PurePosixPath(path.partition("://")[2].strip("/")).with_suffix("").as_posix()
    given = Path(os.path.normpath(path))
    if given.is_absolute():
        try:
            given = given.relative_to(Path.cwd())
        except ValueError:
            given = given.relative_to(given.anchor)
    return given.with_suffix("").as_posix()


def discover_parts(
    request: NewPartsRequest,
) -> tuple[list[DiscoveredSample], list[SetAside]]:
    """The new parts with their input digests; unreadable ones set aside."""
    inputs = list(request.inputs)
    if len(inputs) == 1 and is_folder(inputs[0]):
        if request.xyz:
            raise ValueError("with a folder, XYZ maps are found in it: do not pass --xyz")
        category = request.category
        if category is None:
            categories = list_categories(inputs[0], request.data_format)
            if len(categories) != 1:
                raise ValueError(f"{inputs[0]} holds categories {categories}: name one")
            category = categories[0]
        return discover_line(inputs[0], request.data_format, category)
    if request.config.uses_3d and request.records[0].prep.format == "eyecandies":
        raise ValueError(
            "the bank is an Eyecandies line: pass the new parts' folder in Eyecandies layout "
            "(--format eyecandies), their depth maps need the pose and depth range files"
        )
    images = [p for p in inputs if p]
    if request.xyz is None and not request.config.uses_2d:
        images, xyz = [], images
    else:
        xyz = None if request.xyz is None else list(request.xyz)
    found: list[DiscoveredSample] = []
    set_aside: list[SetAside] = []
    for record in part_records(images, xyz, request.line):
        try:
            found.append(DiscoveredSample(record, input_digests(record)))
        except OSError as error:
            path = record.image_path or record.xyz_path
            set_aside.append(SetAside(record.name, str(path), f"cannot read: {error}"))
    return found, set_aside


def check_bank(
    request: NewPartsRequest, identities: Identities, bank: list[list[PoolSample]],
    reduced: list[str], missing_of: Callable[[list[tuple[str, str]]], list[str]],
) -> None:
    """Fail early when the backbones differ from the bank's or its entries are gone.

    Args:
        request: the run (its line and bank records).
        identities: the given backbones' identities.
        bank: the bank's blocks.
        reduced: the bank samples' reduced-entry keys, in bank order.
        missing_of: the names of the samples whose entries are not cached, from
            ``(sample name, key)`` pairs (the ``check-features`` task).

    Raises:
        BankNotUsable: naming the backbones to pass or the batches to score again.
    """
    recorded = record_identities(request.records[0])
    if identities != recorded:
        raise BankNotUsable(
            f"the bank of line {request.line!r} was scored with backbones {recorded.as_dict()}, "
            f"but the given weights are {identities.as_dict()}: pass the bank's weights "
            "(--weights-2d / --weights-3d)"
        )
    samples = [s for block in bank for s in block]
    needed = [(s.name, k) for s in samples for k in s.keys.features if k is not None]
    needed += [(s.name, key) for s, key in zip(samples, reduced, strict=True)]
    missing = missing_of(needed)
    if missing:
        batches = ", ".join(r.batch for r in request.records)
        raise BankNotUsable(
            f"{len(missing)} bank sample(s) of line {request.line!r} have no cached features or "
            f"reductions (e.g. {missing[:5]}); run `musc rescore {request.line} --batch B` for "
            f"the bank's batches ({batches}) or score them again"
        )


def run_settings(request: NewPartsRequest) -> dict[str, object]:
    """What ``run.json`` records of a run's settings beyond the algorithm's (``settings``)."""
    return {
        "scored_against_bank": [r.batch for r in request.records],
        "inputs": list(request.inputs),
        "xyz": None if request.xyz is None else list(request.xyz),
        "format": request.records[0].prep.format,
        "storage": request.storage,
        "reference_budget": request.reference_budget,
        "bank_policy": "clean" if request.clean_bank else "every sample",
        "bank_left_out": request.bank_left_out,
    }


@flow(name="score-new-stages", validate_parameters=False)
def score_new_stages(request: NewPartsRequest) -> dict:
    """The stages of one ``score_new`` run on the task runner the outer flow chose."""
    timings, started, runtime, tracker = begin_run(request.storage, request.device, 6)
    given = request.config
    # The new parts are computed in the dtypes this run's workers resolve; the bank's entries
    # are read under the dtypes their batches' workers computed them in (``as_recorded``).
    config = run_dtypes(given, runtime)
    fmt = request.records[0].prep.format
    with timed(timings, "discover"):
        found, set_aside = discover_parts(request)
        identities = identify_backbones.submit(request.spec, config, runtime).result()
    with timed(timings, "prepare"):
        parts, cleaning = prepare_pool_samples(
            found, fmt, config, identities, request.run, request.shard_size, runtime, tracker,
            set_aside,
        )
    if not parts:
        problems = "; ".join(f"{a.name}: {a.problem}" for a in set_aside)
        raise ValueError(f"no usable new part ({problems or 'none given'})")
    records = list(request.records)
    bank = bank_blocks(
        records, given, identities, {p.keys.scored for p in parts}, as_recorded=True
    )
    by_batch = {r.batch: bank_reductions(request.storage, r) for r in records}
    bank_reduced = [by_batch[s.batch][s.name] for block in bank for s in block]
    check_bank(
        request, identities, bank, bank_reduced,
        lambda needed: missing_features.submit(needed, runtime).result(),
    )
    new_blocks = batch_blocks(parts, request.shard_size)
    plan = plan_against_bank(new_blocks, bank, config, request.reference_budget)
    with timed(timings, "features"):
        counts = compute_features(new_blocks, request.spec, config, runtime, tracker)
    with timed(timings, "pair_scoring"):
        counts += score_all_pairs(plan, config, runtime, tracker)
    with timed(timings, "reduction"):
        counts += reduce_all(plan, config, runtime, tracker)
    new_reduced = [item.key for items in plan.reduce for item in items]
    bank_ids = [r.batch for r in records]
    info = run_info(
        request.line, request.run, started, request.out, request.spec.random_weights(config),
        identities, run_settings(request),
    )
    result, summary = report_run(
        info, plan.samples, new_reduced + bank_reduced, len(parts), set_aside, config, runtime,
        counts, timings, tracker, bank_ids, against_bank=True,
        preparation=preparation_summary(cleaning),
    )
    if request.record_as is not None:
        line_request = LineRequest(
            data=", ".join(request.inputs), data_format=fmt, category=request.line,
            line=request.line, batch=request.record_as, config=given, spec=request.spec,
            storage=request.storage, out=request.out, shard_size=request.shard_size,
            reference_budget=request.reference_budget, reference_nights=len(records),
            reference_samples=None, device=request.device, clean_bank=request.clean_bank,
        )
        record = batch_record(
            line_request, identities, new_blocks, set_aside, bank_ids, result, new_reduced,
            config, bank_left_out=request.bank_left_out, scored_against_bank=True,
        )
        record_batch.submit(request.storage, record).result()
        summary["recorded"] = request.record_as
    return summary


@dataclass(frozen=True)
class ChosenBank:
    """A line's bank and the settings and backbones new parts are scored with.

    Attributes:
        records: the bank's batch records, most recent first (clean bank: what is left).
        left_out: ``{batch: {sample: reason}}`` the clean bank left out (empty otherwise).
        config: the bank's settings (flag rule possibly changed).
        spec: the bank's backbones (weights possibly overridden by path).
    """

    records: tuple[BatchRecord, ...]
    left_out: dict[str, dict[str, str]]
    config: MuscConfig
    spec: BackboneSpec


def choose_line_bank(
    line: str, bank: BankChoice, changes: NewPartsChanges, storage: str
) -> ChosenBank:
    """The bank of a line as ``score_new`` (and ``musc serve``) choose it.

    Args:
        line: the line.
        bank: which batches, and whether the bank is clean.
        changes: the flag rule's k and the weights' locations, where they differ.
        storage: the storage root of the batch records.

    Returns:
        The records, what the clean bank left out, the settings and the backbones.

    Raises:
        FileNotFoundError: the line has no (such) batch.
        ValueError: batches that cannot form one bank.
    """
    records = choose_bank(storage, line, bank.bank, bank.bank_nights)
    left_out: dict[str, dict[str, str]] = {}
    if bank.clean_bank:
        records, left_out = clean_records(records, read_verdicts(storage, line))
    latest = records[0]
    config = config_from_record(latest)
    if changes.flag_mad_k is not None:
        config = replace(config, flag_mad_k=changes.flag_mad_k)
    backbones = latest.backbones
    spec = BackboneSpec(
        backbones.name_2d,
        changes.weights_2d or backbones.weights_2d,
        changes.weights_3d or backbones.weights_3d,
        backbones.patch_size_2d,
        backbones.name_3d,
    )
    return ChosenBank(tuple(records), left_out, config, spec)


@flow(name="score-new", log_prints=True)
def score_new(
    parts: NewParts,
    bank: BankChoice = BankChoice(),  # noqa: B008 (immutable settings model)
    changes: NewPartsChanges = NewPartsChanges(),  # noqa: B008
    run: NewPartsRun = NewPartsRun(),  # noqa: B008
) -> dict:
    """Score new parts of a line against its recorded batches' cached entries.

    Args:
        parts: the line, the new parts (one folder read with ``data_format``, or image files;
            XYZ TIFFs for a 3D-only line; ``xyz`` for the images' XYZ maps) and the batch id
            to record them under (default: no record; new parts are not a night's batch).
        bank: the batches forming the bank (default: the line's latest ``bank_nights``), the
            most bank samples per part, and whether the bank is clean: by default the samples
            flagged in their night (unless an operator cleared them with a verdict ``ok``) and
            those confirmed defective are left out, as the batch run's rolling bank does
            (:func:`tasks.records.verdicts.clean_records`); what was left out is in ``run.json``
            (``settings.bank_left_out``) and in the batch record when the parts are recorded.
        changes: the flag rule's k and the weights' locations where they differ from the
            bank's (checked against the bank's backbone identity); None keeps the bank's.
        run: storage, output prefix (default ``<storage>/results/<line>/new-<id>``, the id
            being the UTC time and a random suffix),
            cluster (``threads`` by default: the fastest for a few parts), workers, device and
            new parts per block.

    Returns:
        The run summary (as ``score_line``'s; ``bank`` lists the bank's batches).
    """
    line, record_as = parts.line, parts.record_as
    if record_as:
        check_new_batch(run.storage, line, check_batch_id(record_as))
    chosen = choose_line_bank(line, bank, changes, run.storage)
    run_id = record_as or f"new-{default_batch_id()}"
    request = NewPartsRequest(
        line=line,
        inputs=tuple(parts.inputs),
        xyz=None if parts.xyz is None else tuple(parts.xyz),
        data_format=parts.data_format,
        category=parts.category,
        storage=run.storage,
        out=run.out or results_url(run.storage, line, run_id),
        run=run_id,
        records=chosen.records,
        spec=chosen.spec,
        config=chosen.config,
        shard_size=run.shard_size,
        reference_budget=bank.reference_budget,
        device=run.device,
        record_as=record_as,
        clean_bank=bank.clean_bank,
        bank_left_out=chosen.left_out,
    )
    runner = task_runner(run.cluster, run.workers)
    return score_new_stages.with_options(task_runner=runner)(request)
