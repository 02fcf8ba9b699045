"""Operators' verdicts on samples, and the clean reference bank they decide.

A verdict is an operator's word on one sample of one batch: ``ok`` (a flag was a false alarm,
or a part is fine) or ``defect`` (confirmed). The verdicts of a line are one JSON file next
to its batch records, ``<storage>/lines/<line>/verdicts.json``; the latest verdict on a
(batch, sample) wins, earlier ones stay as history.

The clean bank. A later night uses earlier batches as references (the rolling bank); a
sample takes part only when it is believed normal:

- a sample flagged in its own night is left out, unless an operator cleared it (``ok``);
- a sample with a ``defect`` verdict is left out, flagged or not, and so is every sample with
  the same prepared content (its prepared key) in any batch.

Writing is read-modify-write of one small file: two operators recording verdicts on the same
line at the same instant can lose one of them (the command prints what it stored).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from tasks.choices import VERDICTS
from tasks.records.batch_record import BatchRecord, list_batches, read_batch_record
from tasks.records.result_store import ResultStore, safe_file_stem

VERDICTS_VERSION = 1
MAX_NOTE = 500


def _relative(line: str) -> str:
    return f"lines/{safe_file_stem(line)}/verdicts.json"


def read_verdicts(storage: str, line: str) -> list[dict]:
    """Every verdict recorded on a line, oldest first (empty when there is none).

    Raises:
        ValueError: the verdicts file is unreadable.
    """
    try:
        payload = json.loads(ResultStore(storage).read_bytes(_relative(line)))
    except FileNotFoundError:
        return []
    except ValueError as error:
        raise ValueError(f"verdicts of line {line!r} are unreadable: {error}") from error
    if not isinstance(payload, dict) or payload.get("version") != VERDICTS_VERSION:
        raise ValueError(f"verdicts of line {line!r} have an unknown version")
    return list(payload.get("verdicts", []))


def latest_verdicts(verdicts: list[dict]) -> dict[tuple[str, str], dict]:
    """The verdict in force on each (batch, sample): the last one recorded."""
    return {(v["batch"], v["sample"]): v for v in verdicts}


def _find_batch(storage: str, line: str, sample: str, batch: str | None) -> BatchRecord:
    """The batch record holding ``sample``: the given batch, else the latest one with it."""
    ids = [batch] if batch else list(reversed(list_batches(storage, line)))
    if not ids:
        raise FileNotFoundError(f"line {line!r} has no recorded batch in {storage}")
    for batch_id in ids:
        record = read_batch_record(storage, line, batch_id)
        if any(s.name == sample for s in record.samples):
            return record
    where = f"batch {batch!r}" if batch else f"any of the {len(ids)} batch(es)"
    raise ValueError(
        f"line {line!r} has no scored sample named {sample!r} in {where}; the names are those "
        "of scores.csv (pass --batch to pick a night)"
    )


def record_verdict(
    storage: str,
    line: str,
    sample: str,
    verdict: str,
    note: str = "",
    batch: str | None = None,
    now: datetime | None = None,
) -> dict:
    """Store an operator's verdict on one sample.

    Args:
        storage: storage root (local path or ``s3://``) holding the line's batch records.
        line: the line.
        sample: the sample's name, as in ``scores.csv``.
        verdict: ``ok`` or ``defect``.
        note: free text (at most :data:`MAX_NOTE` characters).
        batch: the night; None for the latest batch that scored a sample of that name.
        now: the time recorded (default: now, UTC).

    Returns:
        The stored verdict (batch, sample, prepared key, verdict, note, time, whether the
        sample was flagged in its night).

    Raises:
        ValueError: an unknown verdict, a note that is too long, or no such sample.
        FileNotFoundError: the line has no (such) batch.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    if len(note) > MAX_NOTE:
        raise ValueError(f"the note has {len(note)} characters; at most {MAX_NOTE}")
    record = _find_batch(storage, line, sample, batch)
    entry = next(s for s in record.samples if s.name == sample)
    stamp = (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    stored = {
        "batch": record.batch,
        "sample": sample,
        "prepared": entry.prepared,
        "verdict": verdict,
        "note": note,
        "recorded": stamp,
        "flagged": sample in record.flagged,
    }
    verdicts = read_verdicts(storage, line) + [stored]
    ResultStore(storage).write_json(
        _relative(line), {"version": VERDICTS_VERSION, "line": line, "verdicts": verdicts}
    )
    return stored


def _content(prepared: dict | str) -> str:
    """What identifies a sample's content in a batch record, whatever its labels.

    Records store the prepared keys by entry (:meth:`tasks.cache.keys.PreparedKeys.as_dict`), whose
    ``content`` hashes every input file but the mask; older records held a single key.
    """
    if isinstance(prepared, dict):
        return prepared.get("content") or f"{prepared.get('image')}|{prepared.get('points')}"
    return prepared


def left_out_of_bank(record: BatchRecord, verdicts: list[dict]) -> dict[str, str]:
    """The samples of a batch record the clean bank leaves out, with the reason.

    Args:
        record: a batch record (its ``flagged`` names come from its own night).
        verdicts: every verdict of the line (:func:`read_verdicts`).

    Returns:
        ``{sample name: reason}``.
    """
    latest = latest_verdicts(verdicts)
    defects = {_content(v["prepared"]) for v in latest.values() if v["verdict"] == "defect"}
    flagged = set(record.flagged)
    out: dict[str, str] = {}
    for sample in record.samples:
        name = sample.name
        verdict = latest.get((record.batch, name), {}).get("verdict")
        if verdict == "defect" or _content(sample.prepared) in defects:
            out[name] = "confirmed defect"
        elif name in flagged and verdict != "ok":
            out[name] = "flagged, not cleared"
    return out


def clean_records(
    records: list[BatchRecord], verdicts: list[dict]
) -> tuple[list[BatchRecord], dict]:
    """The bank's records without the samples the clean bank leaves out.

    Args:
        records: batch records chosen for the bank.
        verdicts: every verdict of the line.

    Returns:
        Copies of the records with fewer samples, and ``{batch: {sample: reason}}`` of what
        was left out (batches with nothing left out are absent).
    """
    cleaned, left = [], {}
    for record in records:
        out = left_out_of_bank(record, verdicts)
        if out:
            left[record.batch] = out
        cleaned.append(record.without(set(out)))
    return cleaned, left


def without_left_out(
    records: list[BatchRecord], left_out: dict[str, dict[str, str]]
) -> list[BatchRecord]:
    """The records without the samples a run left out of its bank (as its record says).

    Args:
        records: the bank's batch records.
        left_out: ``{batch: {sample: reason}}`` from the run's batch record.

    Returns:
        Copies of the records with those samples removed.
    """
    return [r.without(set(left_out.get(r.batch, {}))) for r in records]
