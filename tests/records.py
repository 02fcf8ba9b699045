"""Batch records written by hand for tests (the fields a scoring run fills, set to stand-ins)."""

from tasks.records.batch_record import BatchRecord


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
