"""The ``score-line`` flow: one production line (one batch of samples) end to end.

``discover → prepare → 2D tokens / grouping → 3D tokens → SNAMD → pair-scoring shards →
per-sample reduction (CAE + Interval Average + maps) → RsCon + report``, every intermediate
cached by content in the feature cache under ``<storage>/cache`` and every task running on the
chosen cluster. A re-run computes only what is not cached; a changed input or backbone gets
new keys. The run is recorded as a batch of its line (``<storage>/lines/<line>/batches``) so
that later nights can use its samples as extra references and ``rescore`` can score it again
without a backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.progress import StageTracker
from flows.stages import preparation_summary, report_run, score_pool, timed, wait_stage
from infra.cluster import task_runner
from infra.hub import pretrained_weights_problem
from musc_core.config import MuscConfig
from tasks.artifacts import publish_history
from tasks.backbones import DEFAULT_BACKBONE_2D, BackboneSpec
from tasks.bank import record_blocks
from tasks.batches import check_batch_id, load_bank, record_batch
from tasks.cache import CacheCorruption
from tasks.choices import DEFAULT_STORAGE
from tasks.datasets import list_categories
from tasks.discover import DiscoveredSample, discover_samples
from tasks.features import drop_entry, prepare_samples
from tasks.history import write_history
from tasks.keys import Identities, prepared_keys, sample_keys
from tasks.outputs import safe_file_stem
from tasks.plan import PoolSample, batch_blocks
from tasks.prepare import SetAside
from tasks.results import LineResult, RunInfo
from tasks.runtime import Runtime, identify_backbones
from tasks.verdicts import clean_records, read_verdicts

#: Times a run drops a corrupted cache entry and runs again before giving up.
CORRUPTION_RETRIES = 3


def cache_url(storage: str) -> str:
    """The feature cache's root below a storage root."""
    return f"{storage.rstrip('/')}/cache"


def results_url(storage: str, line: str, batch: str) -> str:
    """Default output prefix of a run: ``<storage>/results/<line>/<batch>``."""
    return f"{storage.rstrip('/')}/results/{safe_file_stem(line)}/{batch}"


@dataclass(frozen=True)
class LineRequest:
    """Everything one run of a line needs, resolved from the flow's parameters.

    Attributes:
        data: dataset root (local path, or an ``s3://bucket/prefix`` or other fsspec URL).
        data_format: dataset format.
        category: the category to read (the line's samples).
        line: the production line's name (for batch records and results).
        batch: this run's batch id.
        config: MuSc-V2 settings.
        spec: backbones and their weights.
        storage: storage root (local path or ``s3://``): cache, batch records, results.
        out: output prefix of this run's results.
        shard_size: samples per block (a shard is a pair of blocks).
        reference_budget: references per sample, None for all.
        reference_nights: earlier batches of the line used as extra references.
        reference_samples: most samples taken from earlier batches, None for no limit.
        device: ``auto``, ``cpu`` or ``cuda:N`` for every task.
        samples: names of the category's samples to score (a subset of the line, e.g. one of
            the paper's g random subsets); None for all.
        clean_bank: leave out of the rolling bank the samples flagged in their night (unless
            an operator cleared them) and those confirmed defective (:mod:`tasks.verdicts`);
            False takes every sample of the earlier batches.
    """

    data: str
    data_format: str
    category: str
    line: str
    batch: str
    config: MuscConfig
    spec: BackboneSpec
    storage: str
    out: str
    shard_size: int
    reference_budget: int | None
    reference_nights: int
    reference_samples: int | None
    device: str
    samples: tuple[str, ...] | None = None
    clean_bank: bool = True


def prep_settings(request: LineRequest) -> dict[str, object]:
    """Settings two batches must share for their prepared samples to be scored together."""
    return {
        "format": request.data_format,
        "image_size": request.config.image_size,
        "modality": request.config.modality,
    }


def bank_blocks(
    records: list[dict],
    config: MuscConfig,
    identities: Identities,
    exclude: set[tuple[str, str]],
) -> list[list[PoolSample]]:
    """Pool blocks of earlier batches, as they were stored, without samples seen tonight."""
    return [
        block
        for record in records
        for block in record_blocks(record, config, identities, exclude)
    ]


def batch_record(
    request: LineRequest,
    identities: Identities,
    blocks: list[list[PoolSample]],
    set_aside: list[SetAside],
    bank: list[str],
    result: LineResult,
    reduced: list[str],
) -> dict:
    """The batch record of a finished run (see :mod:`tasks.batches`).

    ``reduced`` holds the reduced-entry key of each sample of ``blocks`` (block after block):
    ``score_new`` reads the bank's scores and salient features from them without reducing
    the bank again.
    """
    keys = iter(reduced)
    return {
        "line": request.line,
        "batch": request.batch,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": request.data,
        "category": request.category,
        "prep": prep_settings(request),
        "config": request.config.as_dict(),
        "backbones": {
            "name_2d": request.spec.name_2d,
            "weights_2d": request.spec.weights_2d,
            "weights_3d": request.spec.weights_3d,
            "patch_size_2d": request.spec.patch_size_2d,
            "name_3d": request.spec.name_3d,
        },
        "identities": {"2d": identities.backbone_2d, "3d": identities.backbone_3d},
        "samples": [
            {
                "name": s.name,
                "prepared": s.keys.prepared.as_dict(),
                "label": s.label,
                "defect_type": s.defect_type,
                "block": b,
                "reduced": next(keys),
            }
            for b, block in enumerate(blocks)
            for s in block
        ],
        "set_aside": [{"name": a.name, "path": a.path, "problem": a.problem} for a in set_aside],
        "bank": bank,
        "shard_size": request.shard_size,
        "reference_budget": request.reference_budget,
        "out": request.out,
        "flagged": result.flagged,
    }


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
    timings: dict[str, float] = {}
    started = datetime.now(timezone.utc)
    config = request.config
    runtime = Runtime(cache_url(request.storage), request.device)
    tracker = StageTracker(total_stages=5)
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
                request, found, list(set_aside), identities, runtime, tracker, timings, started
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
    found: list[DiscoveredSample],
    set_aside: list[SetAside],
    identities: Identities,
    runtime: Runtime,
    tracker: StageTracker,
    timings: dict[str, float],
    started: datetime,
) -> dict:
    """Prepare, score and report one batch (run again after a corrupted entry was dropped)."""
    config = request.config
    with timed(timings, "prepare"):
        keys = [
            prepared_keys(s.digests, request.data_format, s.record.category, config)
            for s in found
        ]
        pairs = list(zip(found, keys, strict=True))
        size = request.shard_size
        chunks = [pairs[i : i + size] for i in range(0, len(pairs), size)]
        futures = [
            prepare_samples.submit(chunk, request.data_format, config, runtime) for chunk in chunks
        ]
        outcomes = [o for chunk in wait_stage(tracker, "prepare", futures) for o in chunk]
    current: list[PoolSample] = []
    cleaning: dict[str, str] = {}
    for sample, key, (name, problem, cleaned) in zip(found, keys, outcomes, strict=True):
        record = sample.record
        main = record.image_path or record.xyz_path or record.depth_path or name
        if problem is not None:
            set_aside.append(SetAside(name, str(main), problem))
            continue
        if cleaned is not None:
            cleaning[name] = cleaned
        keys_now = sample_keys(key, config, identities)
        current.append(PoolSample(name, request.batch, keys_now, record.label, record.defect_type))
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
    pool, reduced, counts = score_pool(
        tonight + bank, request.spec, config, request.reference_budget, runtime, tracker, timings
    )
    info = RunInfo(
        line=request.line,
        batch=request.batch,
        run_id=str(flow_run.get_id() or ""),
        started=started.isoformat(timespec="seconds"),
        out=request.out,
        random_weights=request.spec.random_weights(config),
        backbones=identities.as_dict(),
        settings={
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
    bank_ids = [r["batch"] for r in records]
    result, summary = report_run(
        info, pool, reduced, len(current), set_aside, config, runtime, counts, timings,
        tracker, bank_ids, preparation=preparation_summary(cleaning),
    )
    record = batch_record(
        request, identities, tonight, set_aside, bank_ids, result, reduced[: len(current)]
    )
    record_batch.submit(request.storage, {**record, "bank_left_out": left_out}).result()
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


def default_batch_id() -> str:
    """The batch id of a run started now: its UTC time, ``YYYYmmddTHHMMSSZ``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


@flow(name="score-line", log_prints=True)
def score_line(
    data: str,
    data_format: str = "folder",
    category: str | None = None,
    line: str | None = None,
    modality: str = "2d+3d",
    backbone_2d: str = DEFAULT_BACKBONE_2D,
    weights_2d: str = "pretrained",
    weights_3d: str | None = None,
    backbone_3d: str = "point-mae",
    storage: str = DEFAULT_STORAGE,
    out: str | None = None,
    batch: str | None = None,
    cluster: str = "local",
    workers: int = 1,
    shard_size: int = 16,
    reference_budget: int | None = None,
    reference_nights: int = 0,
    reference_samples: int | None = None,
    image_size: int = 224,
    num_groups: int = 1024,
    group_size: int = 128,
    ipg_step: int = 80,
    interval_ratio: float = 0.3,
    rescoring_windows: tuple[int, ...] = (1, 7),
    distance_dtype: str = "auto",
    vit_dtype: str = "auto",
    point_batchnorm: str = "sample",
    flag_mad_k: float = 3.0,
    device: str = "auto",
    patch_size_2d: int | None = None,
    samples: list[str] | None = None,
    clean_bank: bool = True,
) -> dict:
    """Score one production line: every sample against the others (and the rolling bank).

    Args:
        data: dataset root (local path, or an ``s3://bucket/prefix`` or other fsspec URL).
        data_format: ``mvtec3d``, ``eyecandies``, ``mvtec``, ``visa``, ``btad``, ``mpdd`` or
            ``folder``.
        category: the category to score; default: the dataset's only one (``folder``: the
            folder itself).
        line: the line's name in records and results; default: the category.
        modality: ``2d``, ``3d`` or ``2d+3d``.
        backbone_2d: timm ViT name.
        weights_2d: ``pretrained``, a checkpoint path, or ``random`` (not meaningful).
        weights_3d: Point-MAE checkpoint path, or ``random`` (not meaningful).
        backbone_3d: ``point-mae`` or ``fpfh`` (weight-free FPFH descriptors; no
            ``weights_3d``).
        storage: storage root (local path or ``s3://bucket/prefix``) of the cache, the batch
            records and (by default) the results.
        out: output prefix; default ``<storage>/results/<line>/<batch>``.
        batch: batch id (letters, digits, ``_.-``); default: the UTC start time.
        cluster: ``local`` (a local Dask cluster of ``workers`` processes), ``threads`` (a
            thread pool in this process) or a Dask scheduler address (``tcp://host:8786``).
        workers: local worker processes (or threads).
        shard_size: samples per block; a pair-scoring task takes two blocks.
        reference_budget: most references per sample (None: all other samples).
        reference_nights: earlier batches of the line added as references (rolling bank).
        reference_samples: most samples taken from earlier batches (None: no limit).
        image_size: input side in pixels.
        num_groups: G, 3D groups per sample.
        group_size: K, points per group.
        ipg_step: K_iter of IPG.
        interval_ratio: Interval Average fraction.
        rescoring_windows: RsCon window sizes.
        distance_dtype: ``auto``, ``float32`` or ``bfloat16`` pair-distance GEMMs.
        vit_dtype: ``auto``, ``float32`` or ``bfloat16`` ViT compute.
        point_batchnorm: ``sample`` or ``running`` Point-MAE BatchNorm statistics.
        flag_mad_k: k of the flag rule (median + k·MAD).
        device: ``auto`` (each worker's GPU when it has one), ``cpu`` or ``cuda:N``.
        patch_size_2d: patch size of a random-weights ViT (small test models).
        samples: names of the samples to score (a subset of the category); None for all.
        clean_bank: keep flagged (not cleared) and confirmed-defective samples of earlier
            batches out of the rolling bank (False: every sample is a reference).

    Returns:
        A summary: counts of computed and cached entries per stage, stage timings, scored and
        set-aside samples, flagged samples, metrics and output locations.
    """
    config = MuscConfig(
        modality=modality,
        image_size=image_size,
        num_groups=num_groups,
        group_size=group_size,
        ipg_step=min(ipg_step, group_size),
        interval_ratio=interval_ratio,
        rescoring_windows=tuple(rescoring_windows),
        distance_dtype=distance_dtype,
        vit_dtype=vit_dtype,
        point_batchnorm=point_batchnorm,
        flag_mad_k=flag_mad_k,
    )
    if category is None:
        categories = list_categories(data, data_format)
        if len(categories) != 1:
            raise ValueError(f"{data} holds {len(categories)} categories; name one: {categories}")
        category = categories[0]
    batch = check_batch_id(batch or default_batch_id())
    line = line or category
    request = LineRequest(
        data=data,
        data_format=data_format,
        category=category,
        line=line,
        batch=batch,
        config=config,
        spec=BackboneSpec(backbone_2d, weights_2d, weights_3d, patch_size_2d, backbone_3d),
        storage=storage,
        out=out or results_url(storage, line, batch),
        shard_size=shard_size,
        reference_budget=reference_budget,
        reference_nights=reference_nights,
        reference_samples=reference_samples,
        device=device,
        samples=None if samples is None else tuple(samples),
        clean_bank=clean_bank,
    )
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    if config.uses_2d and weights_2d == "pretrained":
        problem = pretrained_weights_problem(backbone_2d)
        if problem:
            raise ValueError(
                f"{problem}; pass a local checkpoint (--weights-2d /path/to/checkpoint.pth), "
                "or --weights-2d random (results not meaningful)"
            )
    runner = task_runner(cluster, workers)
    return score_line_stages.with_options(task_runner=runner)(request)
