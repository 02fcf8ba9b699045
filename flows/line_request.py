"""What one run of a line needs (:class:`LineRequest`), and the batch record it leaves."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from flows.locations import default_batch_id, results_url
from flows.settings import AlgorithmBase, Backbones, LineInput, LineRun, RollingBank
from infra.hub import pretrained_weights_problem
from musc_core.config import MuscConfig
from musc_core.hardware import DTYPE_SETTINGS
from tasks.backbones import BackboneSpec
from tasks.cache.keys import Identities
from tasks.formats.datasets import list_categories
from tasks.formats.prepare import SetAside
from tasks.planning.blocks import PoolSample
from tasks.records.batch_record import (
    BatchRecord,
    PrepSettings,
    RecordedBackbones,
    RecordedSample,
    SetAsideSample,
    check_batch_id,
    check_new_batch,
)
from tasks.results import LineResult


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
            an operator cleared them) and those confirmed defective (:mod:`tasks.records.verdicts`);
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


def batch_record(
    request: LineRequest,
    identities: Identities,
    blocks: list[list[PoolSample]],
    set_aside: list[SetAside],
    bank: list[str],
    result: LineResult,
    reduced: list[str],
    run_config: MuscConfig,
    bank_left_out: dict[str, dict[str, str]] | None = None,
    scored_against_bank: bool = False,
) -> BatchRecord:
    """The batch record of a finished run (see :mod:`tasks.batches`).

    ``run_config`` is the settings the tasks computed with (:func:`flows.stages.run_dtypes`):
    the record keeps the request's settings as given and the dtypes the workers resolved, which
    the keys of its entries name (re-scores and banks derive its samples' keys with them).
    ``reduced`` holds the reduced-entry key of each sample of ``blocks`` (block after block):
    ``score_new`` reads the bank's scores and salient features from them without reducing
    the bank again. ``bank_left_out`` is what the clean bank left out of the rolling bank,
    ``scored_against_bank`` whether the samples are new parts scored against a bank.
    """
    keys = iter(reduced)
    spec = request.spec
    return BatchRecord(
        line=request.line,
        batch=request.batch,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        data=request.data,
        category=request.category,
        prep=PrepSettings(**prep_settings(request)),
        config=request.config.as_dict(),
        dtypes={name: getattr(run_config, name) for name in DTYPE_SETTINGS},
        backbones=RecordedBackbones(
            name_2d=spec.name_2d, weights_2d=spec.weights_2d, weights_3d=spec.weights_3d,
            patch_size_2d=spec.patch_size_2d, name_3d=spec.name_3d,
        ),
        identities={"2d": identities.backbone_2d, "3d": identities.backbone_3d},
        samples=tuple(
            RecordedSample(
                name=s.name, prepared=s.keys.prepared.as_dict(), label=s.label,
                defect_type=s.defect_type, block=b, reduced=next(keys),
            )
            for b, block in enumerate(blocks)
            for s in block
        ),
        set_aside=tuple(SetAsideSample(name=a.name, path=a.path, problem=a.problem)
                        for a in set_aside),
        bank=tuple(bank),
        shard_size=request.shard_size,
        reference_budget=request.reference_budget,
        out=request.out,
        flagged=tuple(result.flagged),
        bank_left_out=bank_left_out or {},
        scored_against_bank=scored_against_bank,
    )


def line_request(
    data: LineInput,
    batch: str | None,
    backbones: Backbones,
    algorithm: AlgorithmBase,
    bank: RollingBank,
    run: LineRun,
) -> LineRequest:
    """The request of one run of a line from its settings (the score-line flow's parameters).

    Raises:
        ValueError: a dataset with several categories and none named, an invalid batch id, or
            pretrained 2D weights that cannot be had.
        BatchExists: the line has recorded the batch already (a record is never replaced).
    """
    config = algorithm.to_config()
    category = data.category
    if category is None:
        categories = list_categories(data.data, data.data_format)
        if len(categories) != 1:
            raise ValueError(
                f"{data.data} holds {len(categories)} categories; name one: {categories}"
            )
        category = categories[0]
    line = data.line or category
    batch = check_new_batch(run.storage, line, check_batch_id(batch or default_batch_id()))
    request = LineRequest(
        data=data.data,
        data_format=data.data_format,
        category=category,
        line=line,
        batch=batch,
        config=config,
        spec=BackboneSpec(
            backbones.backbone_2d, backbones.weights_2d, backbones.weights_3d,
            backbones.patch_size_2d, backbones.backbone_3d,
        ),
        storage=run.storage,
        out=run.out or results_url(run.storage, line, batch),
        shard_size=run.shard_size,
        reference_budget=bank.reference_budget,
        reference_nights=bank.reference_nights,
        reference_samples=bank.reference_samples,
        device=run.device,
        samples=None if data.samples is None else tuple(data.samples),
        clean_bank=bank.clean_bank,
    )
    if config.uses_2d and backbones.weights_2d == "pretrained":
        problem = pretrained_weights_problem(backbones.backbone_2d)
        if problem:
            raise ValueError(
                f"{problem}; pass a local checkpoint (--weights-2d /path/to/checkpoint.pth), "
                "or --weights-2d random (results not meaningful)"
            )
    return request
