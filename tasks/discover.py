"""Find a line's samples and fingerprint their input files (the root of every cache key)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from prefect import task

from tasks.datasets import SampleRecord, read_dataset
from tasks.prepare import SetAside
from tasks.stage import TASK_OPTIONS

#: Record fields naming input files, in the order they enter a sample's digest.
FILE_ROLES = ("image_path", "xyz_path", "mask_path", "depth_path", "info_path", "pose_path")


@dataclass(frozen=True)
class DiscoveredSample:
    """A sample's files and the SHA-256 of their bytes.

    Attributes:
        record: where the files are, label and defect type when known.
        digest: hex SHA-256 over every input file's role and bytes (image, XYZ map, mask,
            Eyecandies depth/info/pose): equal digests mean equal inputs.
    """

    record: SampleRecord
    digest: str


def input_digest(record: SampleRecord, chunk: int = 1 << 22) -> str:
    """SHA-256 over a record's input files (role, size and bytes of each), hex.

    Raises:
        OSError: a file cannot be read (the message names it).
    """
    digest = hashlib.sha256()
    for role in FILE_ROLES:
        path = getattr(record, role)
        if path is None:
            continue
        digest.update(role.encode())
        file_hash = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                file_hash.update(block)
        digest.update(file_hash.digest())
    return digest.hexdigest()


def discover_line(
    data: str, fmt: str, category: str
) -> tuple[list[DiscoveredSample], list[SetAside]]:
    """Every sample of a line with its input digest; duplicates and unreadable files set aside.

    Args:
        data: dataset root (local path).
        fmt: dataset format (see :data:`tasks.datasets.FORMATS`).
        category: the line (category) to read.

    Returns:
        The usable samples in name order, and the samples set aside with their problem.
    """
    found: list[DiscoveredSample] = []
    set_aside: list[SetAside] = []
    seen: set[str] = set()
    for record in read_dataset(data, fmt, category):
        main_path = record.image_path or record.xyz_path or record.depth_path or record.name
        if record.name in seen:
            set_aside.append(SetAside(record.name, str(main_path), "duplicate sample name"))
            continue
        seen.add(record.name)
        try:
            found.append(DiscoveredSample(record, input_digest(record)))
        except OSError as error:
            set_aside.append(SetAside(record.name, str(main_path), f"cannot read: {error}"))
    return found, set_aside


@task(name="discover", **TASK_OPTIONS)
def discover_samples(
    data: str, fmt: str, category: str
) -> tuple[list[DiscoveredSample], list[SetAside]]:
    """Prefect task around :func:`discover_line`."""
    return discover_line(data, fmt, category)
