"""Find a line's samples and fingerprint their input files (the root of every cache key)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from prefect import task

from tasks.datasets import SampleRecord, inside_root, read_dataset
from tasks.prepare import SetAside, main_file, record_files, split_duplicates
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
    """Every sample of a line with its input digest; bad ones set aside with their problem.

    Set aside here: samples sharing a name (all of them, see
    :func:`tasks.prepare.split_duplicates`), samples with a file that resolves outside the
    dataset root (a symlink to elsewhere: not read), and files that cannot be read.

    Args:
        data: dataset root (local path).
        fmt: dataset format (see :data:`tasks.datasets.FORMATS`).
        category: the line (category) to read.

    Returns:
        The usable samples in name order, and the samples set aside with their problem.
    """
    found: list[DiscoveredSample] = []
    records, set_aside = split_duplicates(read_dataset(data, fmt, category))
    for record in records:
        outside = [f for f in record_files(record) if not inside_root(f, data)]
        if outside:
            problem = f"{outside[0]}: links outside the dataset root {data}; not read"
            set_aside.append(SetAside(record.name, main_file(record), problem))
            continue
        try:
            found.append(DiscoveredSample(record, input_digest(record)))
        except OSError as error:
            set_aside.append(SetAside(record.name, main_file(record), f"cannot read: {error}"))
    return found, set_aside


@task(name="discover", **TASK_OPTIONS)
def discover_samples(
    data: str, fmt: str, category: str
) -> tuple[list[DiscoveredSample], list[SetAside]]:
    """Prefect task around :func:`discover_line`."""
    return discover_line(data, fmt, category)
