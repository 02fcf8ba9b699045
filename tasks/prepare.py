"""Turn dataset records into preprocessed core samples, setting bad ones aside."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from musc_core.config import MuscConfig
from musc_core.pipeline import Sample
from musc_core.preprocess_image import resize_image, resize_mask, to_rgb_uint8
from musc_core.preprocess_points import (
    backproject_depth,
    clean_eyecandies,
    clean_mvtec3d,
    depth_from_png,
    foreground_mask,
    normalize_unit_sphere,
    organized_to_points,
    resize_xyz_nearest,
)
from tasks.datasets import SampleRecord, load_eyecandies_depth, load_image, load_mask, load_xyz


@dataclass(frozen=True)
class PreparedSample:
    """A record's preprocessed tensors.

    Attributes:
        record: where the sample came from.
        sample: the core sample (image and/or XYZ map at the config's size).
        mask: (S, S) bool ground truth, or None when the dataset has none.
    """

    record: SampleRecord
    sample: Sample
    mask: torch.Tensor | None


@dataclass(frozen=True)
class SetAside:
    """A sample that could not be used, and why.

    Attributes:
        name: sample name.
        path: the file at fault (or the sample's main file).
        problem: human-readable reason.
    """

    name: str
    path: str
    problem: str


def _size_check(xyz: np.ndarray, rgb: np.ndarray | None, xyz_file: str | None) -> None:
    """Image and XYZ map must have the same pixel grid (checked before any cleaning)."""
    if rgb is not None and rgb.shape[:2] != xyz.shape[:2]:
        raise ValueError(
            f"{xyz_file}: XYZ map is {xyz.shape[1]}x{xyz.shape[0]} but the image is "
            f"{rgb.shape[1]}x{rgb.shape[0]}"
        )


def _naming(path: str | None, error: ValueError) -> ValueError:
    """The error with the file's path in front, unless it names the file already."""
    message = str(error)
    if path is None or path in message:
        return error
    return ValueError(f"{path}: {message}")


def _read_points(record: SampleRecord, fmt: str, rgb: np.ndarray | None) -> tuple:
    """Read and clean the organized point cloud of a record (full resolution)."""
    if fmt == "eyecandies":
        depth, depth_min, depth_max, pose = load_eyecandies_depth(
            record.depth_path, record.info_path, record.pose_path
        )
        xyz = backproject_depth(depth_from_png(depth, depth_min, depth_max), pose)
        _size_check(xyz, rgb, record.depth_path)
        if rgb is not None:
            try:
                xyz, rgb = clean_eyecandies(xyz, rgb, record.category)
            except ValueError as error:
                raise _naming(record.depth_path, error) from error
        return xyz, rgb, None
    xyz = load_xyz(record.xyz_path)
    if not np.isfinite(xyz).all():
        raise ValueError(f"{record.xyz_path}: XYZ map holds NaN or infinite coordinates")
    if not foreground_mask(xyz).any():
        raise ValueError(f"{record.xyz_path}: XYZ map has no valid point (all zeros)")
    _size_check(xyz, rgb, record.xyz_path)
    if fmt == "mvtec3d":
        mask = load_mask(record.mask_path) if record.mask_path else None
        try:
            xyz, rgb, mask = clean_mvtec3d(xyz, rgb, mask)
        except ValueError as error:
            raise _naming(record.xyz_path, error) from error
        return xyz, rgb, mask
    return xyz, rgb, None


def _check_normalizable(resized: np.ndarray, path: str | None) -> None:
    """The foreground points must survive unit-sphere normalization with finite values.

    Coordinates near the float32 range overflow there (and would break the grouping of the
    whole block later), so they are refused here, per sample.
    """
    points, _ = organized_to_points(resized)
    if not bool(torch.isfinite(normalize_unit_sphere(points)).all()):
        raise ValueError(
            f"{path}: XYZ coordinates are too large to normalize (overflow); check the units"
        )


def prepare_record(record: SampleRecord, fmt: str, config: MuscConfig) -> PreparedSample:
    """Load, clean and resize one sample.

    Args:
        record: the sample's files.
        fmt: dataset format (selects the cleaning: MVTec 3D-AD plane removal, Eyecandies
            back-projection).
        config: modality and image size.

    Returns:
        The preprocessed sample.

    Raises:
        ValueError: naming the file and the problem when the sample is unusable.
    """
    size = config.image_size
    rgb = load_image(record.image_path) if record.image_path else None
    mask = None
    xyz_tensor = None
    if config.uses_3d:
        if record.xyz_path is None and record.depth_path is None:
            raise ValueError(f"{record.image_path}: no XYZ map for this sample")
        xyz, rgb, cleaned_mask = _read_points(record, fmt, rgb)
        _size_check(xyz, rgb, record.xyz_path or record.depth_path)
        if cleaned_mask is not None:
            mask = cleaned_mask
        resized = resize_xyz_nearest(xyz.astype(np.float32), size)
        count = int(foreground_mask(resized).sum())
        needed = max(config.num_groups, 2 * config.group_size)
        if count < needed:
            raise ValueError(
                f"{record.xyz_path or record.depth_path}: {count} foreground points at "
                f"{size}x{size}, the grouping needs at least {needed}"
            )
        _check_normalizable(resized, record.xyz_path or record.depth_path)
        xyz_tensor = torch.from_numpy(np.ascontiguousarray(resized))
    image_tensor = None
    if config.uses_2d:
        if rgb is None:
            raise ValueError(f"{record.name}: no image for this sample")
        image_tensor = resize_image(to_rgb_uint8(rgb), size)
    if mask is None and record.mask_path:
        mask = load_mask(record.mask_path)
    if mask is not None:
        mask_tensor = resize_mask(mask, size)
    elif record.label == 0:  # normal samples of MVTec AD, VisA, BTAD, MPDD ship no mask
        mask_tensor = torch.zeros(size, size, dtype=torch.bool)
    else:
        mask_tensor = None
    return PreparedSample(
        record=record,
        sample=Sample(name=record.name, image=image_tensor, xyz=xyz_tensor),
        mask=mask_tensor,
    )


def record_files(record: SampleRecord) -> list[str]:
    """The input files of a record (image, XYZ map, mask, Eyecandies depth/info/pose)."""
    roles = ("image_path", "xyz_path", "mask_path", "depth_path", "info_path", "pose_path")
    return [path for path in (getattr(record, role) for role in roles) if path is not None]


def main_file(record: SampleRecord) -> str:
    """The file that stands for a record in messages: its image, else its 3D file."""
    return str(record.image_path or record.xyz_path or record.depth_path or record.name)


def split_duplicates(
    records: Sequence[SampleRecord],
) -> tuple[list[SampleRecord], list[SetAside]]:
    """Set aside every record whose name is shared with another record.

    Results are filed by name, and nothing tells which of two same-named files is the real
    sample, so all of them are set aside (none is silently preferred).

    Args:
        records: a line's records.

    Returns:
        The records with unique names (input order) and the set-aside ones.
    """
    by_name: dict[str, list[SampleRecord]] = {}
    for record in records:
        by_name.setdefault(record.name, []).append(record)
    unique: list[SampleRecord] = []
    set_aside: list[SetAside] = []
    for record in records:
        same = by_name[record.name]
        if len(same) == 1:
            unique.append(record)
            continue
        files = ", ".join(f for r in same for f in record_files(r) if f != r.mask_path)
        set_aside.append(
            SetAside(
                record.name,
                main_file(record),
                f"duplicate sample name {record.name!r}: {len(same)} samples share it "
                f"({files}); all are set aside, rename or remove all but one",
            )
        )
    return unique, set_aside


def prepare_records(
    records: Sequence[SampleRecord], fmt: str, config: MuscConfig
) -> tuple[list[PreparedSample], list[SetAside]]:
    """Prepare every record; unusable ones are set aside with their reason.

    Args:
        records: the line's samples.
        fmt: dataset format.
        config: modality and image size.

    Returns:
        The usable samples (input order) and the set-aside list.
    """
    unique, set_aside = split_duplicates(records)
    prepared: list[PreparedSample] = []
    for record in unique:
        try:
            prepared.append(prepare_record(record, fmt, config))
        except (ValueError, OSError) as error:
            set_aside.append(SetAside(record.name, main_file(record), str(error)))
    return prepared, set_aside
