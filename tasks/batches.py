"""Batch records as Prefect tasks: the rolling bank, recording a batch, reading batches back.

The record type and its storage live in :mod:`tasks.records.batch_record`.
"""

from __future__ import annotations

from prefect import task

from tasks.records.batch_record import (
    BatchRecord,
    list_batches,
    read_batch_record,
    select_bank,
    write_batch_record,
)
from tasks.stage import TASK_OPTIONS


@task(name="load-bank", **TASK_OPTIONS)
def load_bank(
    storage: str,
    line: str,
    before: str,
    nights: int,
    max_samples: int | None,
    compatible: dict[str, object],
) -> list[BatchRecord]:
    """Prefect task around :func:`select_bank`."""
    return select_bank(storage, line, before, nights, max_samples, compatible)


@task(name="record-batch", **TASK_OPTIONS)
def record_batch(storage: str, record: BatchRecord) -> str:
    """Prefect task around :func:`write_batch_record`."""
    return write_batch_record(storage, record)


@task(name="read-batch", **TASK_OPTIONS)
def read_batch(storage: str, line: str, batch: str | None) -> BatchRecord:
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
def read_batches(storage: str, line: str, batches: list[str]) -> list[BatchRecord]:
    """Several batch records of a line, in the order given."""
    return [read_batch_record(storage, line, batch) for batch in batches]
