"""Turn dataset records into preprocessed core samples, setting bad ones aside."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch

from musc_core.config import MuscConfig
from musc_core.pipeline import Sample
from musc_core.preprocess_image import resize_image, resize_mask, to_rgb_uint8
from musc_core.preprocess_points import (
    backproject_depth,
    clean_eyecandies,
    depth_from_png,
    foreground_mask,
    mvtec3d_cleaning,
    mvtec3d_has_support_plane,
    normalize_unit_sphere,
    organized_to_points,
    resize_xyz_nearest,
)
from tasks.formats.datasets import (
    SampleRecord,
    load_eyecandies_depth,
    load_image,
    load_mask,
    load_xyz,
)

#: Smallest image or XYZ-map side accepted, in pixels: one patch of the default backbone (DINO
#: ViT-B/8). A smaller input holds less than one patch of detail; upscaling it to the image
#: size would invent the rest.
MIN_INPUT_SIDE = 8

#: ``PrepInfo.cleaning`` values of MVTec 3D-AD samples.
PLANE_REMOVED = "support plane removed"
PLANE_ALREADY_REMOVED = "support plane already removed (pre-cleaned data)"
PLANE_NOT_BEHIND = (
    "support plane kept: the border plane is the part's own face (the part reaches the border)"
)
PLANE_KEPT = "support plane kept (support_plane=keep)"


@dataclass(frozen=True)
class PrepInfo:
    """What was read and done to prepare a sample (stored in its entries' metadata).

    Attributes:
        image_shape: (H, W) of the image file, or None when not read.
        xyz_shape: (H, W) of the XYZ map or depth map, or None when not read.
        mask_shape: (H, W) of the mask file, or None without a mask.
        foreground: foreground points of the XYZ map at the image size, or None.
        cleaning: the dataset cleaning applied (``PLANE_REMOVED``, ``PLANE_ALREADY_REMOVED``,
            ``PLANE_NOT_BEHIND``, ``PLANE_KEPT``, ``"eyecandies"``), or None.
        cleaned_points: MVTec 3D-AD: valid points as read, after the plane removal and kept
            by the largest-cluster step (full resolution), or None.
    """

    image_shape: tuple[int, int] | None = None
    xyz_shape: tuple[int, int] | None = None
    mask_shape: tuple[int, int] | None = None
    foreground: int | None = None
    cleaning: str | None = None
    cleaned_points: tuple[int, int, int] | None = None

    def as_meta(self) -> dict[str, object]:
        """JSON-ready form (for cache metadata)."""
        return {
            "image_shape": None if self.image_shape is None else list(self.image_shape),
            "xyz_shape": None if self.xyz_shape is None else list(self.xyz_shape),
            "mask_shape": None if self.mask_shape is None else list(self.mask_shape),
            "foreground": self.foreground,
            "cleaning": self.cleaning,
            "cleaned_points": None if self.cleaned_points is None else list(self.cleaned_points),
        }

    @classmethod
    def from_meta(cls, meta: dict) -> PrepInfo:
        """The inverse of :meth:`as_meta` (missing fields are None)."""

        def shape(name: str) -> tuple[int, int] | None:
            value = meta.get(name)
            return None if value is None else (int(value[0]), int(value[1]))

        counts = meta.get("cleaned_points")
        return cls(
            shape("image_shape"), shape("xyz_shape"), shape("mask_shape"),
            meta.get("foreground"), meta.get("cleaning"),
            None if counts is None else (int(counts[0]), int(counts[1]), int(counts[2])),
        )

    def merged(self, other: PrepInfo) -> PrepInfo:
        """The fields of both (this one's where both have one)."""
        return PrepInfo(
            self.image_shape or other.image_shape,
            self.xyz_shape or other.xyz_shape,
            self.mask_shape or other.mask_shape,
            self.foreground if self.foreground is not None else other.foreground,
            self.cleaning or other.cleaning,
            self.cleaned_points or other.cleaned_points,
        )


@dataclass(frozen=True)
class PreparedSample:
    """A record's preprocessed tensors.

    Attributes:
        record: where the sample came from.
        sample: the core sample (image and/or XYZ map at the config's size).
        mask: (S, S) bool ground truth, or None when the dataset has none.
        info: what was read and done.
    """

    record: SampleRecord
    sample: Sample
    mask: torch.Tensor | None
    info: PrepInfo = PrepInfo()


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


class _Points(NamedTuple):
    """A record's organized point cloud as read and cleaned (full resolution)."""

    xyz: np.ndarray
    rgb: np.ndarray | None
    mask: np.ndarray | None
    cleaning: str | None
    source: tuple[int, int]
    counts: tuple[int, int, int] | None = None


def _mvtec3d_step(support_plane: str, removed: bool, has_border: bool) -> str:
    """The ``PrepInfo.cleaning`` value of an MVTec 3D-AD cleaning."""
    if removed:
        return PLANE_REMOVED
    if support_plane == "keep":
        return PLANE_KEPT
    return PLANE_NOT_BEHIND if has_border else PLANE_ALREADY_REMOVED


def _read_points(
    record: SampleRecord, fmt: str, rgb: np.ndarray | None, mask: np.ndarray | None,
    support_plane: str,
) -> _Points:
    """Read and clean the organized point cloud of a record (full resolution).

    Returns:
        The cleaned map, the image and mask as the cleaning leaves them (MVTec 3D-AD pads
        them and blanks image pixels), the cleaning applied, the (H, W) of the file read and,
        for MVTec 3D-AD, the points each cleaning step kept.
    """
    if fmt == "eyecandies":
        depth, depth_min, depth_max, pose = load_eyecandies_depth(
            record.depth_path, record.info_path, record.pose_path
        )
        _check_side(record.depth_path, depth.shape[:2], "XYZ map")
        xyz = backproject_depth(depth_from_png(depth, depth_min, depth_max), pose)
        _size_check(xyz, rgb, record.depth_path)
        if rgb is None:
            return _Points(xyz, rgb, mask, None, depth.shape[:2])
        try:
            xyz, rgb = clean_eyecandies(xyz, rgb, record.category)
        except ValueError as error:
            raise _naming(record.depth_path, error) from error
        return _Points(xyz, rgb, mask, "eyecandies", depth.shape[:2])
    xyz = load_xyz(record.xyz_path)
    shape = xyz.shape[:2]
    _check_side(record.xyz_path, shape, "XYZ map")
    if not np.isfinite(xyz).all():
        raise ValueError(f"{record.xyz_path}: XYZ map holds NaN or infinite coordinates")
    if not foreground_mask(xyz).any():
        raise ValueError(f"{record.xyz_path}: XYZ map has no valid point (all zeros)")
    # Before any cleaning: a step could otherwise drop the points that overflow with the rest
    # of a part, and a broken scan would be scored as what is left of it.
    _check_normalizable(xyz, record.xyz_path)
    _size_check(xyz, rgb, record.xyz_path)
    if fmt != "mvtec3d":
        return _Points(xyz, rgb, mask, None, shape)
    has_border = mvtec3d_has_support_plane(xyz)
    try:
        cleaned = mvtec3d_cleaning(xyz, rgb, mask, support_plane)
    except ValueError as error:
        raise _naming(record.xyz_path, error) from error
    step = _mvtec3d_step(support_plane, cleaned.plane_removed, has_border)
    return _Points(cleaned.xyz, cleaned.rgb, cleaned.mask, step, shape, cleaned.points)


def cleaning_hint(info: PrepInfo) -> str:
    """What the MVTec 3D-AD cleaning took from a sample, and the setting to change ("" if none).

    Added to the message of a sample that is set aside for too few points, so that it names
    the cleaning step that took them.
    """
    if info.cleaned_points is None:
        return ""
    read, after_plane, kept = info.cleaned_points
    text = f"; the MVTec 3D-AD cleaning kept {kept} of the {read} points read"
    if info.cleaning == PLANE_REMOVED and read - after_plane > after_plane - kept:
        return text + (
            f": the support-plane removal took {read - after_plane} (if these scans are "
            "pre-cleaned or the part's own face reaches the border, set support_plane to "
            "'keep', --support-plane keep)"
        )
    return text + (
        f": the largest-cluster step (DBSCAN, eps 6 mm) took {after_plane - kept} "
        "(the part falls apart into pieces more than 6 mm apart, or is mostly noise)"
    )


def _check_normalizable(xyz: np.ndarray, path: str | None) -> None:
    """The foreground points must survive unit-sphere normalization with finite values.

    Coordinates near the float32 range overflow there (and would break the grouping of the
    whole block later), so they are refused here, per sample.
    """
    points, _ = organized_to_points(xyz)
    if not bool(torch.isfinite(normalize_unit_sphere(points)).all()):
        raise ValueError(
            f"{path}: XYZ coordinates are too large to normalize (overflow); check the units"
        )


def _shape(array: np.ndarray | None) -> tuple[int, int] | None:
    return None if array is None else (int(array.shape[0]), int(array.shape[1]))


def _check_side(path: str | None, shape: tuple[int, int] | None, what: str) -> None:
    """An input must be at least :data:`MIN_INPUT_SIDE` pixels on each side."""
    if shape is not None and min(shape) < MIN_INPUT_SIDE:
        raise ValueError(
            f"{path}: the {what} is {shape[1]}x{shape[0]} pixels; at least "
            f"{MIN_INPUT_SIDE} on each side are needed (one backbone patch)"
        )


def check_prepared(record: SampleRecord, info: PrepInfo, config: MuscConfig) -> None:
    """The checks of a prepared sample that depend on the run's settings, not on its entries.

    Run on every preparation, fresh or cached: the input sides (at least
    :data:`MIN_INPUT_SIDE`), the mask's size (that of the image, else of the XYZ map) and,
    for 3D, the foreground points the grouping needs.

    Raises:
        ValueError: naming the file and the problem.
    """
    _check_side(record.image_path, info.image_shape, "image")
    _check_side(record.xyz_path or record.depth_path, info.xyz_shape, "XYZ map")
    grid = info.image_shape or info.xyz_shape
    if info.mask_shape is not None and grid is not None and info.mask_shape != grid:
        raise ValueError(
            f"{record.mask_path}: the mask is {info.mask_shape[1]}x{info.mask_shape[0]} but "
            f"the sample is {grid[1]}x{grid[0]}; the mask must cover the sample pixel for pixel"
        )
    if config.uses_3d and info.foreground is not None:
        size = config.image_size
        needed = max(config.num_groups, 2 * config.group_size)
        if info.foreground < needed:
            raise ValueError(
                f"{record.xyz_path or record.depth_path}: {info.foreground} foreground points "
                f"at {size}x{size}, the grouping needs at least {needed}{cleaning_hint(info)}"
            )


def prepare_record(record: SampleRecord, fmt: str, config: MuscConfig) -> PreparedSample:
    """Load, clean and resize one sample.

    The image is prepared the same way whatever the modality: MVTec 3D-AD images are always
    cleaned with their XYZ map (read for that alone in a 2D run), so a 2D and a 2D+3D run see
    the same pixels. The MVTec 3D-AD support plane is removed as ``config.support_plane``
    says (``auto``: when a plane fills the border behind the part, so maps whose plane was
    already removed — the usual preprocessing, done in place — keep the part's faces that
    reach the border); padding and the largest cluster always apply
    (:attr:`PrepInfo.cleaning` says which was done).

    Args:
        record: the sample's files.
        fmt: dataset format (selects the cleaning: MVTec 3D-AD plane removal, Eyecandies
            back-projection).
        config: modality, image size and the support-plane mode.

    Returns:
        The preprocessed sample.

    Raises:
        ValueError: naming the file and the problem when the sample is unusable.
    """
    size = config.image_size
    rgb = load_image(record.image_path) if record.image_path else None
    raw_mask = load_mask(record.mask_path) if record.mask_path else None
    info = PrepInfo(image_shape=_shape(rgb), mask_shape=_shape(raw_mask))
    mask = raw_mask
    xyz_tensor = None
    has_points = record.xyz_path is not None or record.depth_path is not None
    cleans_image = fmt == "mvtec3d" and config.uses_2d
    if config.uses_3d or cleans_image:
        if not has_points:
            if config.uses_3d:
                raise ValueError(f"{record.image_path}: no XYZ map for this sample")
            raise ValueError(
                f"{record.image_path}: no XYZ map for this sample; MVTec 3D-AD images are "
                "prepared with their XYZ map (the background it marks is zeroed)"
            )
        check_prepared(record, info, config)  # the mask's size before the cleaning pads it
        xyz, rgb, mask, cleaning, source, counts = _read_points(
            record, fmt, rgb, raw_mask, config.support_plane
        )
        info = replace(info, xyz_shape=source, cleaning=cleaning, cleaned_points=counts)
        if config.uses_3d:
            resized = resize_xyz_nearest(xyz.astype(np.float32), size)
            info = replace(info, foreground=int(foreground_mask(resized).sum()))
            check_prepared(record, info, config)
            _check_normalizable(resized, record.xyz_path or record.depth_path)
            xyz_tensor = torch.from_numpy(np.ascontiguousarray(resized))
    check_prepared(record, info, config)
    image_tensor = None
    if config.uses_2d:
        if rgb is None:
            raise ValueError(f"{record.name}: no image for this sample")
        image_tensor = resize_image(to_rgb_uint8(rgb), size)
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
        info=info,
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
