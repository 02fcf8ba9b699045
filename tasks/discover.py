"""Find a line's samples and fingerprint their input files (the root of every cache key)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from prefect import task

from tasks.formats.datasets import SampleRecord, inside_root, read_dataset
from tasks.formats.prepare import SetAside, main_file, record_files, split_duplicates
from tasks.formats.sources import content_digest, is_url
from tasks.stage import TASK_OPTIONS

#: Record fields naming input files, and the role each file's digest is filed under.
FILE_ROLES = {
    "image_path": "image",
    "xyz_path": "xyz",
    "mask_path": "mask",
    "depth_path": "depth",
    "info_path": "info",
    "pose_path": "pose",
}


@dataclass(frozen=True)
class DiscoveredSample:
    """A sample's files and the SHA-256 of each file's bytes.

    Attributes:
        record: where the files are, label and defect type when known.
        digests: hex SHA-256 of each input file's bytes by role (``image``, ``xyz``,
            ``mask``, ``depth``, ``info``, ``pose``; absent files left out). Each prepared
            entry's key takes the digests of the files it is made from
            (:func:`tasks.cache.keys.prepared_keys`), so a new mask never changes a feature key.
    """

    record: SampleRecord
    digests: dict[str, str]


def input_digests(record: SampleRecord, chunk: int = 1 << 22) -> dict[str, str]:
    """SHA-256 of each of a record's input files, hex, by role.

    An object's URL (object storage) is hashed from the object's bytes, never from the
    store's checksum (an S3 ETag is not a content hash for multipart uploads).

    Raises:
        OSError: a file cannot be read (the message names it).
    """
    digests: dict[str, str] = {}
    for field, role in FILE_ROLES.items():
        path = getattr(record, field)
        if path is None:
            continue
        if is_url(path):
            digests[role] = content_digest(path)
            continue
        file_hash = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                file_hash.update(block)
        digests[role] = file_hash.hexdigest()
    return digests


def discover_line(
    data: str, fmt: str, category: str
) -> tuple[list[DiscoveredSample], list[SetAside]]:
    """Every sample of a line with its input digest; bad ones set aside with their problem.

    Set aside here: samples sharing a name (all of them, see
    :func:`tasks.formats.prepare.split_duplicates`), samples whose mask is ambiguous (the reader's
    ``mask_problem``), samples with a file that resolves outside the
    dataset root (a symlink to elsewhere, or an object URL outside the prefix or with a
    ``..`` segment: not read), and files that cannot be read.

    Args:
        data: dataset root (local path, or a URL: ``s3://bucket/prefix``).
        fmt: dataset format (see :data:`tasks.formats.datasets.FORMATS`).
        category: the line (category) to read.

    Returns:
        The usable samples in name order, and the samples set aside with their problem.
    """
    found: list[DiscoveredSample] = []
    records, set_aside = split_duplicates(read_dataset(data, fmt, category))
    for record in records:
        if record.mask_problem is not None:
            set_aside.append(SetAside(record.name, main_file(record), record.mask_problem))
            continue
        outside = [f for f in record_files(record) if not inside_root(f, data)]
        if outside:
            how = "lies outside" if is_url(data) else "links outside"
            problem = f"{outside[0]}: {how} the dataset root {data}; not read"
            set_aside.append(SetAside(record.name, main_file(record), problem))
            continue
        try:
            found.append(DiscoveredSample(record, input_digests(record)))
        except OSError as error:
            set_aside.append(SetAside(record.name, main_file(record), f"cannot read: {error}"))
    return found, set_aside


@task(name="discover", **TASK_OPTIONS)
def discover_samples(
    data: str, fmt: str, category: str
) -> tuple[list[DiscoveredSample], list[SetAside]]:
    """Prefect task around :func:`discover_line`."""
    return discover_line(data, fmt, category)
