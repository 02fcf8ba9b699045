"""Batch records: what each night's run of a line scored, for rolling banks and re-scoring.

A record is one JSON file per batch, ``<storage>/lines/<line>/batches/<batch>.json``. It holds
the run's settings (configuration, backbones and their identities, data source), its usable
samples with their prepared keys, names, labels and block, and the samples set aside. A later
night reads earlier records to add their samples as references (their features are found in
the cache by key); ``rescore`` reads a record to score the same samples again without a
backbone.

Batch ids sort chronologically: the default (:func:`new_batch_id`) is the run's UTC start,
``YYYYmmddTHHMMSSZ-mmm-xxxxxxxx`` (millisecond, then 8 random hex digits, so two runs started
in the same instant get two ids). Ids of older musc versions, ``YYYYmmddTHHMMSSZ``, are a
prefix of those of the same second, so they sort before every newer id. A record is created
once and never replaced (:func:`write_batch_record`).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from musc_core.config import MuscConfig
from tasks.records.result_store import ResultStore, safe_file_stem

RECORD_VERSION = 1
_BATCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
log = logging.getLogger(__name__)


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PrepSettings(_Part):
    """Settings two batches must share for their prepared samples to be scored together."""

    format: str
    image_size: int
    modality: str


class RecordedBackbones(_Part):
    """The backbones a batch was scored with, as given (names and weight locations)."""

    name_2d: str
    weights_2d: str
    weights_3d: str | None
    patch_size_2d: int | None = None
    name_3d: str = "point-mae"


class RecordedSample(_Part):
    """One usable sample of a batch.

    Attributes:
        name: the sample's name (as in ``scores.csv``).
        prepared: its prepared-entry keys by entry (:meth:`tasks.cache.keys.PreparedKeys.as_dict`);
            a single key string in records written before the entries were split.
        label: 0 normal, 1 defective, None unknown.
        defect_type: the dataset's defect folder, when known.
        block: the block it was scored in.
        reduced: its reduced-entry key (absent in older records).
    """

    name: str
    prepared: dict[str, str | None] | str
    label: int | None = None
    defect_type: str | None = None
    block: int
    reduced: str | None = None


class SetAsideSample(_Part):
    """A sample a batch could not use: its file and the problem."""

    name: str
    path: str
    problem: str


class BatchRecord(_Part):
    """What one night's run of a line scored (``lines/<line>/batches/<batch>.json``).

    Attributes:
        version: the record format (:data:`RECORD_VERSION`).
        line: the line.
        batch: the batch id.
        created: ISO 8601 UTC time the record was written.
        data: the data source (dataset root, or the new parts' files).
        category: the dataset category.
        prep: preprocessing settings.
        config: MuSc-V2 settings as given (:meth:`MuscConfig.as_dict`).
        dtypes: what the dtype settings resolved to on the run's workers
            (``vit_dtype``, ``point_dtype``, ``distance_dtype``: ``float32`` or ``bfloat16``),
            as the keys of its entries name them; empty in records written before (their
            keys name the settings as given).
        backbones: backbone names and weights.
        identities: backbone identity by modality (``"2d"``, ``"3d"``).
        samples: the usable samples, block after block.
        set_aside: samples that could not be used.
        bank: batch ids of the rolling bank the batch was scored with.
        shard_size: samples per block.
        reference_budget: references per sample, None for all.
        out: output prefix of the run's results.
        flagged: names of the samples flagged in the night.
        bank_left_out: ``{batch: {sample: reason}}`` the clean bank left out.
        scored_against_bank: new parts scored against a bank (``score_new``).
    """

    version: Literal[1] = RECORD_VERSION
    line: str
    batch: str
    created: str
    data: str
    category: str
    prep: PrepSettings
    config: dict[str, Any]
    dtypes: dict[str, str] = Field(default_factory=dict)
    backbones: RecordedBackbones
    identities: dict[str, str | None]
    samples: tuple[RecordedSample, ...]
    set_aside: tuple[SetAsideSample, ...] = ()
    bank: tuple[str, ...] = ()
    shard_size: int
    reference_budget: int | None = None
    out: str
    flagged: tuple[str, ...] = ()
    bank_left_out: dict[str, dict[str, str]] = Field(default_factory=dict)
    scored_against_bank: bool = False

    def to_json(self) -> str:
        """The record as JSON text (read back by :meth:`from_json`)."""
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> BatchRecord:
        """A record read from JSON text, validated.

        Args:
            text: the JSON.
            where: the file, for messages.

        Raises:
            ValueError: not JSON, another version, or not a batch record (naming ``where``).
        """
        try:
            payload = json.loads(text)
        except ValueError as error:
            raise ValueError(f"batch record {where} is unreadable: {error}") from error
        if not isinstance(payload, dict) or "version" not in payload:
            raise ValueError(f"{where} is not a batch record (no version)")
        if payload["version"] != RECORD_VERSION:
            raise ValueError(
                f"batch record {where} has version {payload['version']!r}; this musc reads "
                f"version {RECORD_VERSION}: score the batch again"
            )
        try:
            return cls.model_validate(payload)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:3]
            )
            raise ValueError(f"{where} is not a valid batch record: {problems}") from None

    def musc_config(self) -> MuscConfig:
        """The MuSc-V2 settings the batch was scored with (JSON lists back to tuples)."""
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in self.config.items()}
        # Records from before these settings existed were planned on the cycle and ran
        # Point-MAE in float32.
        values.setdefault("reference_choice", "cycle")
        values.setdefault("point_dtype", "float32")
        return MuscConfig(**values)

    def without(self, names: set[str]) -> BatchRecord:
        """A copy without the samples named in ``names``."""
        kept = tuple(s for s in self.samples if s.name not in names)
        return self.model_copy(update={"samples": kept})


class BatchExists(FileExistsError):
    """A batch id the line has recorded already: records are created once, never replaced.

    Attributes:
        line: the line.
        batch: the batch id.
        where: the record's location.
    """

    def __init__(self, line: str, batch: str, where: str,
                 fix: str = "record the run under another batch id") -> None:
        self.line = line
        self.batch = batch
        self.where = where
        super().__init__(
            f"line {line!r} has a batch {batch!r} already ({where}); a batch record is created "
            f"once and never replaced: {fix}"
        )


def new_batch_id(now: datetime | None = None) -> str:
    """A new batch id: ``YYYYmmddTHHMMSSZ-mmm-xxxxxxxx``, sortable by time and unique.

    Args:
        now: the time it stands for (default: now); naive times are taken as UTC.

    Returns:
        The UTC time to the second, its millisecond and 8 random hex digits, e.g.
        ``20261207T155607Z-482-3f9a2c1d``.
    """
    now = now or datetime.now(timezone.utc)
    now = now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{now.microsecond // 1000:03d}-{secrets.token_hex(4)}"


def check_batch_id(batch: str) -> str:
    """A batch id is letters, digits, ``_.-`` (it becomes a file name); returned unchanged."""
    if not _BATCH_RE.match(batch):
        raise ValueError(f"invalid batch id {batch!r}: use letters, digits, '_', '.', '-'")
    return batch


def _folder(line: str) -> str:
    return f"lines/{safe_file_stem(line)}/batches"


def _relative(line: str, batch: str) -> str:
    return f"{_folder(line)}/{check_batch_id(batch)}.json"


def write_batch_record(storage: str, record: BatchRecord) -> str:
    """Store a new batch record, created once; returns its location.

    The record appears complete or not at all, and an existing one is never replaced
    (:meth:`ResultStore.create_bytes`).

    Raises:
        BatchExists: the line has a record of this batch already.
    """
    store = ResultStore(storage)
    relative = _relative(record.line, record.batch)
    try:
        return store.create_bytes(relative, (record.to_json() + "\n").encode("utf-8"))
    except FileExistsError:
        raise BatchExists(record.line, record.batch, store.location(relative)) from None


def check_new_batch(storage: str, line: str, batch: str) -> str:
    """A batch id the line has not recorded (and a valid one); returned unchanged.

    Raises:
        BatchExists: the line has a record of this batch.
        ValueError: an invalid batch id.
    """
    store = ResultStore(storage)
    relative = _relative(line, batch)
    if store.exists(relative):
        raise BatchExists(line, batch, store.location(relative))
    return batch


def read_batch_record(storage: str, line: str, batch: str) -> BatchRecord:
    """Load one batch record, validated.

    Raises:
        FileNotFoundError: the line has no such batch.
        ValueError: the record is unreadable, of another version or not a batch record.
    """
    relative = _relative(line, batch)
    try:
        text = ResultStore(storage).read_bytes(relative)
    except FileNotFoundError:
        raise FileNotFoundError(f"line {line!r} has no batch {batch!r} in {storage}") from None
    return BatchRecord.from_json(text, ResultStore(storage).location(relative))


def list_batches(storage: str, line: str) -> list[str]:
    """Batch ids of a line, oldest first."""
    names = ResultStore(storage).list(_folder(line))
    return sorted(n[: -len(".json")] for n in names if n.endswith(".json"))


def select_bank(
    storage: str,
    line: str,
    before: str,
    nights: int,
    max_samples: int | None,
    compatible: dict[str, object],
) -> list[BatchRecord]:
    """Records of the earlier batches that serve as extra references (the rolling bank).

    Args:
        storage: storage root URL.
        line: the line.
        before: tonight's batch id; only batches that sort before it are taken.
        nights: how many of the most recent earlier batches to take (0: none).
        max_samples: stop adding batches once the bank holds this many samples (the batch that
            crosses the limit is not taken); None for no limit.
        compatible: settings a batch must share with tonight's run (format, image size,
            modality): its prepared samples are only comparable then.

    Returns:
        The chosen records, most recent first. Unreadable or incompatible batches are skipped
        with a warning.
    """
    if nights <= 0:
        return []
    chosen: list[BatchRecord] = []
    total = 0
    for batch in reversed([b for b in list_batches(storage, line) if b < before]):
        if len(chosen) == nights:
            break
        try:
            record = read_batch_record(storage, line, batch)
        except (FileNotFoundError, ValueError) as error:
            log.warning("rolling bank: skipping batch %s of %s: %s", batch, line, error)
            continue
        prep = record.prep.model_dump()
        differing = {k: v for k, v in compatible.items() if prep.get(k) != v}
        if differing:
            log.warning("rolling bank: skipping batch %s (settings differ: %s)", batch, differing)
            continue
        size = len(record.samples)
        if max_samples is not None and total + size > max_samples:
            break
        chosen.append(record)
        total += size
    return chosen


def config_from_record(record: BatchRecord) -> MuscConfig:
    """The MuSc-V2 settings a batch was scored with."""
    return record.musc_config()
