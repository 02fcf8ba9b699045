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
  naive bank (``clean_bank=False``) gives that batch run's map, score and RsCon score for it;
- the bank is clean by default, like the batch run's rolling bank: a bank sample flagged in
  its night is no reference unless an operator cleared it (``musc verdict LINE SAMPLE ok``),
  and a confirmed defect never is (:func:`tasks.verdicts.clean_records`);
- a part is flagged when its RsCon score exceeds the robust threshold of the bank's RsCon
  scores in the same pool; the pixel threshold comes from the bank's map maxima.

Results are written like a run's (``scores.csv``, maps, overlays, ``report.html``,
``run.json``); no batch is recorded unless asked (``record_as``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from prefect import flow
from prefect.runtime import flow_run

from flows.progress import StageTracker
from flows.score_line import (
    DEFAULT_STORAGE,
    LineRequest,
    bank_blocks,
    batch_record,
    cache_url,
    default_batch_id,
    results_url,
)
from flows.stages import (
    compute_features,
    preparation_summary,
    reduce_all,
    report_run,
    score_all_pairs,
    timed,
    wait_stage,
)
from infra.cluster import task_runner
from musc_core.config import MuscConfig
from tasks.backbones import BackboneSpec
from tasks.bank import bank_reductions, choose_bank, plan_against_bank, record_identities
from tasks.batches import check_batch_id, config_from_record, record_batch
from tasks.datasets import SampleRecord, list_categories
from tasks.discover import DiscoveredSample, discover_line, input_digests
from tasks.features import missing_features, prepare_samples
from tasks.keys import Identities, prepared_keys, sample_keys
from tasks.plan import PoolSample, batch_blocks
from tasks.prepare import SetAside
from tasks.results import RunInfo
from tasks.runtime import Runtime, identify_backbones
from tasks.sources import is_folder, is_url
from tasks.verdicts import clean_records, read_verdicts


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
    """

    line: str
    inputs: tuple[str, ...]
    xyz: tuple[str, ...] | None
    data_format: str
    category: str | None
    storage: str
    out: str
    run: str
    records: tuple[dict, ...]
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
    if request.config.uses_3d and request.records[0]["prep"]["format"] == "eyecandies":
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


def _check_bank(
    request: NewPartsRequest, identities: Identities, bank: list[list[PoolSample]],
    reduced: list[str], runtime: Runtime,
) -> None:
    """Fail early when the backbones differ from the bank's or its entries are gone."""
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
    missing = missing_features.submit(needed, runtime).result()
    if missing:
        batches = ", ".join(r["batch"] for r in request.records)
        raise BankNotUsable(
            f"{len(missing)} bank sample(s) of line {request.line!r} have no cached features or "
            f"reductions (e.g. {missing[:5]}); run `musc rescore {request.line} --batch B` for "
            f"the bank's batches ({batches}) or score them again"
        )


@flow(name="score-new-stages", validate_parameters=False)
def score_new_stages(request: NewPartsRequest) -> dict:
    """The stages of one ``score_new`` run on the task runner the outer flow chose."""
    timings: dict[str, float] = {}
    started = datetime.now(timezone.utc)
    config = request.config
    runtime = Runtime(cache_url(request.storage), request.device)
    tracker = StageTracker(total_stages=5)
    fmt = request.records[0]["prep"]["format"]
    with timed(timings, "discover"):
        found, set_aside = discover_parts(request)
        identities = identify_backbones.submit(request.spec, config, runtime).result()
    with timed(timings, "prepare"):
        keys = [prepared_keys(s.digests, fmt, s.record.category, config) for s in found]
        pairs = list(zip(found, keys, strict=True))
        size = request.shard_size
        futures = [
            prepare_samples.submit(pairs[i : i + size], fmt, config, runtime)
            for i in range(0, len(pairs), size)
        ]
        outcomes = [o for chunk in wait_stage(tracker, "prepare", futures) for o in chunk]
    parts: list[PoolSample] = []
    cleaning: dict[str, str] = {}
    for sample, key, (name, problem, cleaned) in zip(found, keys, outcomes, strict=True):
        record = sample.record
        if problem is not None:
            main = record.image_path or record.xyz_path or record.depth_path or name
            set_aside.append(SetAside(name, str(main), problem))
            continue
        if cleaned is not None:
            cleaning[name] = cleaned
        parts.append(
            PoolSample(name, request.run, sample_keys(key, config, identities), record.label,
                       record.defect_type)
        )
    if not parts:
        problems = "; ".join(f"{a.name}: {a.problem}" for a in set_aside)
        raise ValueError(f"no usable new part ({problems or 'none given'})")
    records = list(request.records)
    bank = bank_blocks(records, config, identities, {p.keys.scored for p in parts})
    by_batch = {r["batch"]: bank_reductions(request.storage, r) for r in records}
    bank_reduced = [by_batch[s.batch][s.name] for block in bank for s in block]
    _check_bank(request, identities, bank, bank_reduced, runtime)
    new_blocks = batch_blocks(parts, request.shard_size)
    plan = plan_against_bank(new_blocks, bank, config, request.reference_budget)
    with timed(timings, "features"):
        counts = compute_features(new_blocks, request.spec, config, runtime, tracker)
    with timed(timings, "pair_scoring"):
        counts += score_all_pairs(plan, config, runtime, tracker)
    with timed(timings, "reduction"):
        counts += reduce_all(plan, config, runtime, tracker)
    new_reduced = [item.key for items in plan.reduce for item in items]
    bank_ids = [r["batch"] for r in records]
    info = RunInfo(
        line=request.line,
        batch=request.run,
        run_id=str(flow_run.get_id() or ""),
        started=started.isoformat(timespec="seconds"),
        out=request.out,
        random_weights=request.spec.random_weights(config),
        backbones=identities.as_dict(),
        settings={
            "scored_against_bank": bank_ids,
            "inputs": list(request.inputs),
            "xyz": None if request.xyz is None else list(request.xyz),
            "format": fmt,
            "storage": request.storage,
            "reference_budget": request.reference_budget,
            "bank_policy": "clean" if request.clean_bank else "every sample",
            "bank_left_out": request.bank_left_out,
        },
    )
    result, summary = report_run(
        info, plan.samples, new_reduced + bank_reduced, len(parts), set_aside, config, runtime,
        counts, timings, tracker, bank_ids, against_bank=True,
        preparation=preparation_summary(cleaning),
    )
    if request.record_as is not None:
        line_request = LineRequest(
            data=", ".join(request.inputs), data_format=fmt, category=request.line,
            line=request.line, batch=request.record_as, config=config, spec=request.spec,
            storage=request.storage, out=request.out, shard_size=request.shard_size,
            reference_budget=request.reference_budget, reference_nights=len(records),
            reference_samples=None, device=request.device,
        )
        record = batch_record(
            line_request, identities, new_blocks, set_aside, bank_ids, result, new_reduced
        )
        record_batch.submit(
            request.storage,
            {**record, "scored_against_bank": True, "bank_left_out": request.bank_left_out},
        ).result()
        summary["recorded"] = request.record_as
    return summary


@flow(name="score-new", log_prints=True)
def score_new(
    line: str,
    inputs: list[str],
    xyz: list[str] | None = None,
    data_format: str = "folder",
    category: str | None = None,
    storage: str = DEFAULT_STORAGE,
    bank: list[str] | None = None,
    bank_nights: int = 1,
    out: str | None = None,
    reference_budget: int | None = None,
    flag_mad_k: float | None = None,
    weights_2d: str | None = None,
    weights_3d: str | None = None,
    shard_size: int = 16,
    cluster: str = "threads",
    workers: int = 1,
    device: str = "auto",
    record_as: str | None = None,
    clean_bank: bool = True,
) -> dict:
    """Score new parts of a line against its recorded batches' cached entries.

    Args:
        line: the line (its batch records name the bank).
        inputs: one folder of new parts (read with ``data_format``), or image files (XYZ
            TIFFs for a 3D-only line).
        xyz: XYZ TIFFs of the images, in the same order (2D+3D lines).
        data_format: layout of a folder input; the preprocessing is always the bank's.
        category: category of a folder input (default: its only one).
        storage: storage root of the cache and the batch records.
        bank: batch ids forming the bank; default: the line's latest ``bank_nights``.
        bank_nights: how many of the latest batches form the bank (without ``bank``).
        out: output prefix; default ``<storage>/results/<line>/new-<UTC time>``.
        reference_budget: most bank samples per part (default: the whole bank).
        flag_mad_k: k of the flag rule (default: the bank's).
        weights_2d: the 2D weights where the recorded location differs on this machine
            (checked against the bank's backbone identity).
        weights_3d: likewise for Point-MAE.
        shard_size: new parts per block.
        cluster: ``threads`` (this process, the fastest for a few parts), ``local`` or a Dask
            scheduler address.
        workers: local worker processes (or threads).
        device: ``auto``, ``cpu`` or ``cuda:N``.
        record_as: record the new parts as a batch of the line under this id (default: no
            record; new parts are not a night's batch).
        clean_bank: leave out of the bank the samples flagged in their night (unless an
            operator cleared them with a verdict ``ok``) and those confirmed defective, as the
            batch run's rolling bank does (:func:`tasks.verdicts.clean_records`); what was
            left out is in ``run.json`` (``bank_left_out``).

    Returns:
        The run summary (as ``score_line``'s; ``bank`` lists the bank's batches).
    """
    records = choose_bank(storage, line, bank, bank_nights)
    left_out: dict[str, dict[str, str]] = {}
    if clean_bank:
        records, left_out = clean_records(records, read_verdicts(storage, line))
    latest = records[0]
    config = config_from_record(latest)
    if flag_mad_k is not None:
        config = replace(config, flag_mad_k=flag_mad_k)
    backbones = latest["backbones"]
    spec = BackboneSpec(
        backbones["name_2d"],
        weights_2d or backbones["weights_2d"],
        weights_3d or backbones["weights_3d"],
        backbones.get("patch_size_2d"),
        backbones.get("name_3d", "point-mae"),
    )
    run = check_batch_id(record_as) if record_as else f"new-{default_batch_id()}"
    request = NewPartsRequest(
        line=line,
        inputs=tuple(inputs),
        xyz=None if xyz is None else tuple(xyz),
        data_format=data_format,
        category=category,
        storage=storage,
        out=out or results_url(storage, line, run),
        run=run,
        records=tuple(records),
        spec=spec,
        config=config,
        shard_size=shard_size,
        reference_budget=reference_budget,
        device=device,
        record_as=record_as,
        clean_bank=clean_bank,
        bank_left_out=left_out,
    )
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    return score_new_stages.with_options(task_runner=task_runner(cluster, workers))(request)
