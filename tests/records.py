"""Batch records written by hand for tests (the fields a scoring run fills, set to stand-ins)."""

from tasks.records.batch_record import (
    BatchExists,
    BatchRecord,
    new_batch_id,
    write_batch_record,
)


def hand_record(line: str, batch: str, samples: list[dict], **fields) -> BatchRecord:
    """A valid :class:`BatchRecord` holding ``samples``; ``fields`` replace the stand-ins."""
    values = dict(
        line=line, batch=batch, created="2026-01-01T00:00:00+00:00", data="by hand",
        category=line, prep={"format": "folder", "image_size": 64, "modality": "2d"},
        config={}, backbones={"name_2d": "vit", "weights_2d": "random", "weights_3d": None},
        identities={"2d": "vit-random", "3d": None}, shard_size=16, out="", samples=samples,
    )
    values.update(fields)
    return BatchRecord.model_validate(values)


def record_at_once(barrier, outcomes, storage: str, batch: str | None, writer: int,
                   out: str) -> None:
    """Write one batch record of line ``part`` the moment every writer is at the barrier.

    Runs in a process of its own. ``batch`` None takes a new id (:func:`new_batch_id`) after
    the barrier, as a run started at that instant would. Puts ``(writer, batch, "created" or
    "refused", detail)`` on ``outcomes``.
    """
    barrier.wait(timeout=120)
    chosen = batch or new_batch_id()
    record = hand_record("part", chosen, [{"name": f"w{writer}", "prepared": "k", "block": 0}],
                         data=f"writer {writer}", out=out)
    try:
        outcomes.put((writer, chosen, "created", write_batch_record(storage, record)))
    except BatchExists as error:
        outcomes.put((writer, chosen, "refused", str(error)))
