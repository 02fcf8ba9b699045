"""Batch records: what each night's run of a line scored, for rolling banks and re-scoring.

A record is one JSON file per batch, ``<storage>/lines/<line>/batches/<batch>.json``. It holds
the run's settings (configuration, backbones and their identities, data source), its usable
samples with their prepared keys, names, labels and block, and the samples set aside. A later
night reads earlier records to add their samples as references (their features are found in
the cache by key); ``rescore`` reads a record to score the same samples again without a
backbone. Batch ids sort chronologically (the default is the run's UTC start,
``YYYYmmddTHHMMSSZ``).
"""

from __future__ import annotations

import json
import logging
import re

from prefect import task

from musc_core.config import MuscConfig
from tasks.outputs import ResultStore, safe_file_stem
from tasks.stage import TASK_OPTIONS

RECORD_VERSION = 1
_BATCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
log = logging.getLogger(__name__)


def check_batch_id(batch: str) -> str:
    """A batch id is letters, digits, ``_.-`` (it becomes a file name); returned unchanged."""
    if not _BATCH_RE.match(batch):
        raise ValueError(f"invalid batch id {batch!r}: use letters, digits, '_', '.', '-'")
    return batch


def _folder(line: str) -> str:
    return f"lines/{safe_file_stem(line)}/batches"


def write_batch_record(storage: str, record: dict) -> str:
    """Store a batch record; returns its location."""
    relative = f"{_folder(record['line'])}/{check_batch_id(record['batch'])}.json"
    return ResultStore(storage).write_json(relative, {"version": RECORD_VERSION, **record})


def read_batch_record(storage: str, line: str, batch: str) -> dict:
    """Load one batch record.

    Raises:
        FileNotFoundError: the line has no such batch.
        ValueError: the record is unreadable.
    """
    relative = f"{_folder(line)}/{check_batch_id(batch)}.json"
    try:
        record = json.loads(ResultStore(storage).read_bytes(relative))
    except FileNotFoundError:
        raise FileNotFoundError(f"line {line!r} has no batch {batch!r} in {storage}") from None
    except ValueError as error:
        raise ValueError(f"batch record {relative} is unreadable: {error}") from error
    if record.get("version") != RECORD_VERSION:
        raise ValueError(f"batch record {relative} has an unknown version")
    return record


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
) -> list[dict]:
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
    chosen: list[dict] = []
    total = 0
    for batch in reversed([b for b in list_batches(storage, line) if b < before]):
        if len(chosen) == nights:
            break
        try:
            record = read_batch_record(storage, line, batch)
        except (FileNotFoundError, ValueError) as error:
            log.warning("rolling bank: skipping batch %s of %s: %s", batch, line, error)
            continue
        differing = {k: v for k, v in compatible.items() if record.get("prep", {}).get(k) != v}
        if differing:
            log.warning("rolling bank: skipping batch %s (settings differ: %s)", batch, differing)
            continue
        size = len(record["samples"])
        if max_samples is not None and total + size > max_samples:
            break
        chosen.append(record)
        total += size
    return chosen


@task(name="load-bank", **TASK_OPTIONS)
def load_bank(
    storage: str,
    line: str,
    before: str,
    nights: int,
    max_samples: int | None,
    compatible: dict[str, object],
) -> list[dict]:
    """Prefect task around :func:`select_bank`."""
    return select_bank(storage, line, before, nights, max_samples, compatible)


@task(name="record-batch", **TASK_OPTIONS)
def record_batch(storage: str, record: dict) -> str:
    """Prefect task around :func:`write_batch_record`."""
    return write_batch_record(storage, record)


def config_from_record(record: dict) -> MuscConfig:
    """The MuSc-V2 settings a batch was scored with (JSON lists back to tuples)."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in record["config"].items()}
    return MuscConfig(**values)


@task(name="read-batch", **TASK_OPTIONS)
def read_batch(storage: str, line: str, batch: str | None) -> dict:
    """A batch record: the given batch, or the line's latest when ``batch`` is None.

    Raises:
        FileNotFoundError: the line has no (such) batch.
    """
    if batch is None:
        batches = list_batches(storage, line)
        if not batches:
            raise FileNotFoundError(f"line {line!r} has no recorded batch in {storage}")
        batch = batches[-1]
    return read_batch_record(storage, line, batch)


@task(name="read-batches", **TASK_OPTIONS)
def read_batches(storage: str, line: str, batches: list[str]) -> list[dict]:
    """Several batch records of a line, in the order given."""
    return [read_batch_record(storage, line, batch) for batch in batches]
