"""Dataset readers (layouts: docs/usage.md): a dataset directory becomes sorted sample records.

Formats and the layouts they read (``<root>`` is the dataset root; the root may also be a
single category folder, whose folder name is then its category):

- ``mvtec3d`` (MVTec 3D-AD): ``<root>/<category>/test/<defect|good>/rgb/<stem>.png``,
  ``xyz/<stem>.tiff``, ``gt/<stem>.png`` (the mask of the same defect folder and stem only).
  Name ``<defect>/<stem>``; label 0 for ``good``. Raw and pre-cleaned data alike.
- ``eyecandies``: ``<root>/<Category>/test_public/data/<id>_image_0.png``, ``<id>_depth.png``,
  ``<id>_info_depth.yaml``, ``<id>_pose.txt``, ``<id>_mask.png``. Name ``<id>``; the label is
  1 when the mask has a non-zero pixel (the mask is read here), None when it is missing or
  unreadable (preparation then sets the sample aside).
- ``mvtec`` (MVTec AD) and ``mpdd``: ``<root>/<cat>/test/<defect|good>/<stem>.png``, masks
  ``<root>/<cat>/ground_truth/<defect>/<stem>_mask.png``. Good samples have no mask file
  (``mask_path`` None: their ground truth is all normal).
- ``btad``: ``<root>/<cat>/test/{ok,ko}/<stem>.(png|bmp)``, masks
  ``<root>/<cat>/ground_truth/ko/<stem>.(png|bmp)``. Label 0 for ``ok``.
- ``visa``: ``<root>/split_csv/1cls.csv`` (columns object, split, label, image, mask; paths
  relative to the root), rows with split ``test``; label ``normal`` → 0, ``anomaly`` → 1.
  Name: the image path without the object folder, ``Data/Images/`` and suffix
  (``Anomaly/000``).
- ``folder``: any directory of images (searched recursively, hidden entries skipped), no
  labels (label None), category = the folder name. Optional XYZ maps are TIFFs with the
  image's stem inside any ``xyz/`` folder below the root, or float TIFFs next to the image;
  optional masks are images inside a ``masks/``, ``mask/``, ``gt/`` or ``ground_truth/``
  folder, matched by the sample's own path (:func:`folder_mask_key`): a mask belongs to the
  image whose relative path it repeats once its mask folder is taken out and a ``_mask``
  suffix of its stem is dropped, where an image folder ``rgb/``, ``image/``, ``images/`` or
  ``img/`` counts as absent in either path (``a.png`` ↔ ``masks/a_mask.png``, ``sub/c.png`` ↔
  ``sub/gt/c.png``, ``crack/003.png`` ↔ ``ground_truth/crack/003.png``,
  ``day1/rgb/001.png`` ↔ ``day1/gt/001.png``). A mask in another sample's folder is never
  taken. Two masks for one sample, or one mask for two samples, leave those samples'
  ``mask_problem`` set (discovery sets them aside). When several XYZ candidates share a
  stem, the one sharing the longest folder prefix with the image wins (an exact tie is an
  error). A TIFF outside those folders with no same-stem image beside it is an image, unless
  it holds 3-channel float data: then it is an XYZ-only (3D) sample. Name: the image's path
  relative to the root, without suffix.

Records are sorted by name. Layout problems raise ``FileNotFoundError`` / ``ValueError``
naming the path; unreadable individual files are left for the loaders (and the preparation
step) to report. Two files that would give one name (``000.tif`` and ``000.tiff``, ``a.png``
and ``a.jpg``) give two records of that name: discovery sets both aside.

Links: a run reads only below its dataset root. Folder symlinks are not followed when a
folder is searched recursively; a file symlink is read only when it resolves inside the
root (:func:`inside_root`; discovery sets the others aside with a message).

Object storage: the root may be an fsspec URL (``s3://bucket/prefix``, see
:mod:`tasks.formats.sources`). The objects below it are listed once and read through the same
readers; records then hold the objects' URLs, and a URL counts as inside the root only when
it lies below the prefix with no empty, ``.`` or ``..`` segment
(:func:`tasks.formats.sources.url_inside`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import tifffile

from tasks.choices import FORMATS
from tasks.formats.image_io import (
    TIFF_SUFFIXES,
    PathLike,
    load_eyecandies_depth,
    load_image,
    load_mask,
    load_xyz,
)
from tasks.formats.sources import ObjectPath, ObjectTree, is_url, local_path, url_inside

__all__ = [
    "FORMATS",
    "SampleRecord",
    "list_categories",
    "load_eyecandies_depth",
    "load_image",
    "load_mask",
    "load_xyz",
    "read_dataset",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VISA_SPLIT_CSV = ("split_csv", "1cls.csv")
_FOLDER_XYZ_DIRS = ("xyz",)
_FOLDER_MASK_DIRS = ("masks", "mask", "gt", "ground_truth")
_FOLDER_IMAGE_DIRS = ("rgb", "image", "images", "img")
_MASK_SUFFIX = "_mask"
_MARKERS = {
    "mvtec3d": ("test",),
    "mvtec": ("test",),
    "mpdd": ("test",),
    "btad": ("test",),
    "eyecandies": ("test_public", "data"),
}


@dataclass(frozen=True)
class SampleRecord:
    """Where one sample's files are and what is known about it.

    Attributes:
        name: unique, stable sample name within its category (e.g. ``"crack/003"``).
        category: product line / category name.
        image_path: RGB (or gray) image file, or None (3D-only sample).
        xyz_path: organized point cloud TIFF, or None.
        mask_path: ground-truth mask, or None (none available; for labelled normal samples
            of MVTec AD / MPDD / BTAD / VisA this means "all normal").
        label: 0 normal, 1 anomalous, None when unknown.
        defect_type: defect folder / CSV label (``"good"``, ``"crack"``, ``"ko"``, ...), or
            None.
        depth_path: Eyecandies 16-bit depth PNG, or None.
        info_path: Eyecandies ``info_depth.yaml``, or None.
        pose_path: Eyecandies ``pose.txt``, or None.
        mask_problem: why the sample's mask cannot be told (two candidate masks, or a mask
            that fits two samples), or None; such a sample is set aside by discovery.
    """

    name: str
    category: str
    image_path: str | None = None
    xyz_path: str | None = None
    mask_path: str | None = None
    label: int | None = None
    defect_type: str | None = None
    depth_path: str | None = None
    info_path: str | None = None
    pose_path: str | None = None
    mask_problem: str | None = None


# ------------------------------------------------------------------------------------------
# helpers


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {FORMATS}")


#: A dataset file or folder: a local path, or a path in an object listing (a URL root).
DataPath = Path | ObjectPath


def _check_root(root: PathLike) -> DataPath:
    """The dataset root as a folder; a URL root is listed here (once).

    Raises:
        FileNotFoundError: no such folder, or no object below the URL.
        NotADirectoryError: a local root that is a file.
    """
    if isinstance(root, ObjectPath):
        return root
    if is_url(str(root)):
        return ObjectTree.list(str(root)).path()
    path = Path(local_path(str(root)))
    if not path.exists():
        raise FileNotFoundError(f"{path}: dataset root not found")
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: dataset root is not a directory")
    return path


def _visible(path: DataPath) -> bool:
    return not path.name.startswith(".")


def _subdirs(path: DataPath) -> list[DataPath]:
    return sorted(p for p in path.iterdir() if p.is_dir() and _visible(p))


def _files(path: DataPath, suffixes: Iterable[str]) -> list[DataPath]:
    """Visible regular files of a folder with one of the suffixes (any case), sorted."""
    if not path.is_dir():
        return []
    wanted = tuple(suffixes)
    return sorted(
        p for p in path.iterdir() if p.is_file() and _visible(p) and p.suffix.lower() in wanted
    )


def inside_root(path: PathLike | ObjectPath, root: PathLike | ObjectPath) -> bool:
    """Whether a file, links resolved, lies below the (resolved) dataset root.

    For URLs (object storage), by the literal path: :func:`tasks.formats.sources.url_inside`.
    """
    if is_url(str(root)) or is_url(str(path)):
        return url_inside(str(path), str(root))
    root = local_path(str(root))
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


def _all_by_stem(files: Iterable[DataPath]) -> dict[str, list[DataPath]]:
    """Every file (sorted order) of each stem."""
    out: dict[str, list[Path]] = {}
    for path in sorted(files):
        out.setdefault(path.stem, []).append(path)
    return out


def _by_stem(files: Iterable[DataPath]) -> dict[str, DataPath]:
    """First file (sorted order) of each stem."""
    out: dict[str, Path] = {}
    for path in sorted(files):
        out.setdefault(path.stem, path)
    return out


def _root_name(root: DataPath) -> str:
    return root.resolve().name


def _category_dir(root: DataPath, fmt: str, category: str) -> DataPath:
    """The folder of one category: ``<root>/<category>``, or the root itself if it is one."""
    marker = Path(*_MARKERS[fmt])
    candidate = root / category
    if candidate.is_dir():
        if not (candidate / marker).is_dir():
            raise FileNotFoundError(
                f"{candidate / marker}: not found ({fmt} layout expects it in every category)"
            )
        return candidate
    if _root_name(root) == category and (root / marker).is_dir():
        return root
    raise FileNotFoundError(f"{candidate}: category folder not found ({fmt} layout)")


def _str(path: DataPath | None) -> str | None:
    return None if path is None else str(path)


def _sorted_records(records: list[SampleRecord], where: DataPath, fmt: str) -> list[SampleRecord]:
    if not records:
        raise ValueError(f"{where}: no samples found ({fmt} layout)")
    return sorted(records, key=lambda r: (r.name, r.image_path or "", r.xyz_path or ""))


# ------------------------------------------------------------------------------------------
# MVTec 3D-AD


def _read_mvtec3d(root: DataPath, category: str) -> list[SampleRecord]:
    test = _category_dir(root, "mvtec3d", category) / "test"
    defects = _subdirs(test)
    if not defects:
        raise ValueError(f"{test}: no defect folders (expected test/<defect|good>/rgb, xyz)")
    records = []
    for defect_dir in defects:
        rgb_dir, xyz_dir = defect_dir / "rgb", defect_dir / "xyz"
        if not rgb_dir.is_dir() and not xyz_dir.is_dir():
            raise ValueError(
                f"{defect_dir}: expected rgb/ and/or xyz/ subfolders (MVTec 3D-AD layout)"
            )
        images = _all_by_stem(_files(rgb_dir, (".png",)))
        xyzs = _all_by_stem(_files(xyz_dir, TIFF_SUFFIXES))
        masks = _by_stem(_files(defect_dir / "gt", (".png",)))
        defect = defect_dir.name
        for stem in sorted(images.keys() | xyzs.keys()):
            stem_images, stem_xyzs = images.get(stem, []), xyzs.get(stem, [])
            # One record per file of a stem: a second image or XYZ map of one stem (000.tif
            # and 000.tiff) makes a duplicate name, which discovery reports.
            for i in range(max(len(stem_images), len(stem_xyzs))):
                records.append(
                    SampleRecord(
                        name=f"{defect}/{stem}",
                        category=category,
                        image_path=_str(stem_images[i] if i < len(stem_images) else None),
                        xyz_path=_str(stem_xyzs[i] if i < len(stem_xyzs) else None),
                        mask_path=_str(masks.get(stem)),
                        label=0 if defect == "good" else 1,
                        defect_type=defect,
                    )
                )
    return _sorted_records(records, test, "mvtec3d")


# ------------------------------------------------------------------------------------------
# Eyecandies


def _mask_label(path: DataPath | None, root: DataPath) -> int | None:
    if path is None or not inside_root(path, root):
        return None
    try:
        return int(load_mask(str(path)).any())
    except (ValueError, OSError):
        return None


def _read_eyecandies(root: DataPath, category: str) -> list[SampleRecord]:
    data = _category_dir(root, "eyecandies", category) / "test_public" / "data"
    image_suffix, depth_suffix = "_image_0.png", "_depth.png"
    names = [p.name for p in data.iterdir() if p.is_file() and _visible(p)]
    ids = sorted(
        {n[: -len(image_suffix)] for n in names if n.endswith(image_suffix)}
        | {n[: -len(depth_suffix)] for n in names if n.endswith(depth_suffix)}
    )
    present = set(names)

    def file(sample_id: str, suffix: str) -> DataPath | None:
        name = f"{sample_id}{suffix}"
        return data / name if name in present else None

    records = []
    for sample_id in ids:
        mask = file(sample_id, "_mask.png")
        records.append(
            SampleRecord(
                name=sample_id,
                category=category,
                image_path=_str(file(sample_id, image_suffix)),
                mask_path=_str(mask),
                label=_mask_label(mask, root),
                depth_path=_str(file(sample_id, depth_suffix)),
                info_path=_str(file(sample_id, "_info_depth.yaml")),
                pose_path=_str(file(sample_id, "_pose.txt")),
            )
        )
    return _sorted_records(records, data, "eyecandies")


# ------------------------------------------------------------------------------------------
# MVTec AD, MPDD, BTAD


def _read_mvtec_like(
    root: DataPath,
    fmt: str,
    category: str,
    good_names: tuple[str, ...],
    mask_stems: Callable[[str], tuple[str, ...]],
) -> list[SampleRecord]:
    """``<cat>/test/<defect>/<image>`` with masks in ``<cat>/ground_truth/<defect>/``."""
    cat_dir = _category_dir(root, fmt, category)
    test, ground_truth = cat_dir / "test", cat_dir / "ground_truth"
    defects = _subdirs(test)
    if not defects:
        raise ValueError(f"{test}: no defect folders (expected test/<defect|good>/*.png)")
    records = []
    for defect_dir in defects:
        defect = defect_dir.name
        masks = _by_stem(_files(ground_truth / defect, IMAGE_SUFFIXES))
        for image in _files(defect_dir, IMAGE_SUFFIXES):
            mask = next((masks[s] for s in mask_stems(image.stem) if s in masks), None)
            records.append(
                SampleRecord(
                    name=f"{defect}/{image.stem}",
                    category=category,
                    image_path=str(image),
                    mask_path=_str(mask),
                    label=0 if defect in good_names else 1,
                    defect_type=defect,
                )
            )
    return _sorted_records(records, test, fmt)


def _mvtec_mask_stems(stem: str) -> tuple[str, ...]:
    return (f"{stem}_mask", stem)


def _btad_mask_stems(stem: str) -> tuple[str, ...]:
    return (stem, f"{stem}_mask")


# ------------------------------------------------------------------------------------------
# VisA


_VISA_LABELS = {"normal": 0, "good": 0, "0": 0, "anomaly": 1, "anomalous": 1, "bad": 1, "1": 1}
_VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def _visa_rows(root: DataPath) -> tuple[DataPath, list[tuple[int, dict[str, str]]]]:
    """The split CSV path and its test rows with their line numbers."""
    csv_path = root.joinpath(*VISA_SPLIT_CSV)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: VisA split CSV not found")
    with csv_path.open("r", newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in _VISA_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; found {header}")
        rows = []
        for row in reader:
            clean = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if clean["split"].lower() == "test":
                rows.append((reader.line_num, clean))
    return csv_path, rows


def _visa_name(image: str, obj: str) -> str:
    parts = list(PurePosixPath(image.replace("\\", "/")).with_suffix("").parts)
    if parts and parts[0] == obj:
        parts = parts[1:]
    if parts[:2] == ["Data", "Images"]:
        parts = parts[2:]
    return "/".join(parts)


def _list_visa(root: DataPath) -> list[str]:
    csv_path, rows = _visa_rows(root)
    objects = sorted({row["object"] for _, row in rows})
    if not objects:
        raise ValueError(f"{csv_path}: no rows with split 'test'")
    return objects


def _read_visa(root: DataPath, category: str) -> list[SampleRecord]:
    csv_path, rows = _visa_rows(root)
    records = []
    for line, row in rows:
        if row["object"] != category:
            continue
        label_text = row["label"].lower()
        if label_text not in _VISA_LABELS:
            raise ValueError(f"{csv_path}:{line}: unknown label {row['label']!r}")
        if not row["image"]:
            raise ValueError(f"{csv_path}:{line}: empty image path")
        records.append(
            SampleRecord(
                name=_visa_name(row["image"], category),
                category=category,
                image_path=str(root / row["image"]),
                mask_path=str(root / row["mask"]) if row["mask"] else None,
                label=_VISA_LABELS[label_text],
                defect_type=row["label"],
            )
        )
    if not records:
        objects = sorted({row["object"] for _, row in rows})
        raise ValueError(f"{csv_path}: no test rows for object {category!r}; objects: {objects}")
    return _sorted_records(records, csv_path, "visa")


# ------------------------------------------------------------------------------------------
# generic folder


def _is_xyz_tiff(path: DataPath, root: DataPath) -> bool:
    """True for a TIFF whose first series is (H, W, 3) or (3, H, W) floating-point data.

    A link to a file outside the root is not opened (it is taken as an image, which
    discovery then refuses).
    """
    if not inside_root(path, root):
        return False
    try:
        source = path.open("rb") if isinstance(path, ObjectPath) else path
        with tifffile.TiffFile(source) as tif:
            series = tif.series[0]
            shape, dtype = tuple(series.shape), series.dtype
    except Exception:  # unreadable: treat as an image; the loader will report it
        return False
    return (
        dtype is not None
        and dtype.kind == "f"
        and len(shape) == 3
        and (shape[2] == 3 or shape[0] == 3)
    )


def _common_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def _closest(
    image: DataPath,
    stems: tuple[str, ...],
    index: dict[str, list[DataPath]],
    root: DataPath,
    what: str,
) -> DataPath | None:
    """The candidate with one of the stems sharing the longest folder prefix with the image."""
    candidates = [p for s in stems for p in index.get(s, [])]
    if not candidates:
        return None
    folder = image.relative_to(root).parent.parts
    scores = [_common_prefix(folder, p.relative_to(root).parent.parts) for p in candidates]
    best = max(scores)
    winners = [p for p, s in zip(candidates, scores, strict=True) if s == best]
    if len(winners) > 1:
        listed = ", ".join(str(p) for p in winners)
        raise ValueError(f"{image}: several {what} files match by stem: {listed}")
    return winners[0]


def _walk(line_dir: DataPath) -> list[DataPath]:
    """Every visible file below the folder (hidden files and folders skipped), sorted.

    Folder symlinks are not followed (no loops, nothing outside the tree); file symlinks are
    listed, even dangling ones, so that discovery reports them. Below a URL: every listed
    object (hidden names skipped).
    """
    if isinstance(line_dir, ObjectPath):
        return [
            p for p in line_dir.walk_files()
            if not any(
                part.startswith(".") and part not in (".", "..")
                for part in p.relative_to(line_dir).parts
            )
        ]
    files = []
    for folder, subfolders, names in os.walk(line_dir, followlinks=False):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for name in names:
            path = Path(folder) / name
            if name.startswith(".") or not (path.is_file() or path.is_symlink()):
                continue
            files.append(path)
    return sorted(files)


def _read_folder(root: DataPath, category: str) -> list[SampleRecord]:
    if (root / category).is_dir():
        line_dir = root / category
    elif _root_name(root) == category:
        line_dir = root
    else:
        raise FileNotFoundError(
            f"{root / category}: not found (folder format: the category is the folder name "
            f"{_root_name(root)!r} or one of its subfolders)"
        )
    images: list[Path] = []
    xyzs: list[Path] = []
    masks: list[Path] = []
    loose_tiffs: list[Path] = []
    for path in _walk(line_dir):
        folders = {part.lower() for part in path.relative_to(line_dir).parent.parts}
        suffix = path.suffix.lower()
        if folders & set(_FOLDER_MASK_DIRS):
            if suffix in IMAGE_SUFFIXES:
                masks.append(path)
        elif folders & set(_FOLDER_XYZ_DIRS):
            if suffix in TIFF_SUFFIXES:
                xyzs.append(path)
        elif suffix in TIFF_SUFFIXES:
            loose_tiffs.append(path)
        elif suffix in IMAGE_SUFFIXES:
            images.append(path)
    # A loose TIFF beside a same-stem non-TIFF image is that image's XYZ map; otherwise it is
    # an XYZ-only sample when it holds 3-channel float data, else an image.
    beside = {(p.parent, p.stem) for p in images}
    for path in loose_tiffs:
        if (path.parent, path.stem) in beside or _is_xyz_tiff(path, line_dir):
            xyzs.append(path)
        else:
            images.append(path)
    xyz_index: dict[str, list[Path]] = {}
    for path in xyzs:
        xyz_index.setdefault(path.stem, []).append(path)

    records = []
    used_xyz: set[Path] = set()
    for image in sorted(images):
        xyz = _closest(image, (image.stem,), xyz_index, line_dir, "XYZ")
        if xyz is not None:
            used_xyz.add(xyz)
        records.append(
            SampleRecord(
                name=image.relative_to(line_dir).with_suffix("").as_posix(),
                category=category,
                image_path=str(image),
                xyz_path=_str(xyz),
            )
        )
    for xyz in sorted(set(xyzs) - used_xyz):
        relative = xyz.relative_to(line_dir).with_suffix("")
        kept = [p for p in relative.parts[:-1] if p.lower() not in _FOLDER_XYZ_DIRS]
        records.append(
            SampleRecord(name="/".join([*kept, xyz.stem]), category=category, xyz_path=str(xyz))
        )
    if not records:
        raise ValueError(f"{line_dir}: no images or XYZ TIFFs found (folder format)")
    return _sorted_records(_with_masks(records, masks, line_dir), line_dir, "folder")


def folder_mask_key(relative: PurePosixPath, is_mask: bool) -> tuple[str, ...]:
    """The path a folder-format sample and its mask share (see the module's rule).

    Args:
        relative: the file's path relative to the line folder, suffix dropped (a sample's
            name).
        is_mask: the file is a mask: its mask folders and a ``_mask`` stem suffix are taken
            out. Image folders (``rgb/``, ``image/``, ...) are taken out of either path.

    Returns:
        The folders (lower case kept as written) and the stem.
    """
    dropped = (*_FOLDER_MASK_DIRS, *_FOLDER_IMAGE_DIRS) if is_mask else _FOLDER_IMAGE_DIRS
    folders = tuple(p for p in relative.parts[:-1] if p.lower() not in dropped)
    stem = relative.name
    if is_mask and stem.lower().endswith(_MASK_SUFFIX) and len(stem) > len(_MASK_SUFFIX):
        stem = stem[: -len(_MASK_SUFFIX)]
    return (*folders, stem)


def _with_masks(
    records: list[SampleRecord], masks: list[DataPath], line_dir: DataPath
) -> list[SampleRecord]:
    """The records with their masks found by :func:`folder_mask_key`; ambiguities noted."""
    index: dict[tuple[str, ...], list[Path]] = {}
    for mask in sorted(masks):
        relative = PurePosixPath(mask.relative_to(line_dir).with_suffix("").as_posix())
        index.setdefault(folder_mask_key(relative, is_mask=True), []).append(mask)
    found = [index.get(folder_mask_key(PurePosixPath(r.name), False), []) for r in records]
    owners: dict[Path, list[str]] = {}
    for record, candidates in zip(records, found, strict=True):
        for mask in candidates:
            owners.setdefault(mask, []).append(record.name)
    out = []
    for record, candidates in zip(records, found, strict=True):
        problem = None
        if len(candidates) > 1:
            listed = ", ".join(str(p) for p in candidates)
            problem = (
                f"several masks match sample {record.name!r}: {listed}; keep one (folder "
                "format: the mask repeats the sample's path inside a masks/ or gt/ folder)"
            )
        elif candidates and len(owners[candidates[0]]) > 1:
            problem = (
                f"mask {candidates[0]} matches several samples ({', '.join(owners[candidates[0]])})"
                "; give each sample its own mask"
            )
        mask = candidates[0] if len(candidates) == 1 and problem is None else None
        out.append(replace(record, mask_path=_str(mask), mask_problem=problem))
    return out


# ------------------------------------------------------------------------------------------
# public entry points


def list_categories(root: PathLike, fmt: str) -> list[str]:
    """Categories (product lines) of a dataset, sorted.

    Args:
        root: dataset root (or a single category folder).
        fmt: one of :data:`FORMATS`.

    Returns:
        Category names: folders with the format's ``test`` (``test_public/data`` for
        Eyecandies) subfolder, the objects of VisA's split CSV, or the folder's own name for
        ``folder``.

    Raises:
        ValueError: unknown format, or no category found (message names the root).
        FileNotFoundError: the root (or VisA's split CSV) does not exist.
    """
    _check_format(fmt)
    path = _check_root(root)
    if fmt == "folder":
        return [_root_name(path)]
    if fmt == "visa":
        return _list_visa(path)
    marker = Path(*_MARKERS[fmt])
    found = [d.name for d in _subdirs(path) if (d / marker).is_dir()]
    if not found and (path / marker).is_dir():
        found = [_root_name(path)]
    if not found:
        raise ValueError(
            f"{path}: no {fmt} category found (expected <root>/<category>/{marker.as_posix()}/)"
        )
    return found


def read_dataset(root: PathLike, fmt: str, category: str) -> list[SampleRecord]:
    """The test samples of one category, sorted by name.

    No file is decoded, except Eyecandies masks (they give the labels) and, for ``folder``,
    the headers of loose TIFFs (to tell XYZ maps from images).

    Args:
        root: dataset root (or the category folder itself).
        fmt: one of :data:`FORMATS`.
        category: a name returned by :func:`list_categories`.

    Returns:
        The category's records.

    Raises:
        ValueError: unknown format, a layout that does not match, or no samples (message
            names the path).
        FileNotFoundError: the root, the category folder or a required file is missing.
    """
    _check_format(fmt)
    path = _check_root(root)
    if fmt == "mvtec3d":
        return _read_mvtec3d(path, category)
    if fmt == "eyecandies":
        return _read_eyecandies(path, category)
    if fmt in ("mvtec", "mpdd"):
        return _read_mvtec_like(path, fmt, category, ("good",), _mvtec_mask_stems)
    if fmt == "btad":
        return _read_mvtec_like(path, fmt, category, ("ok", "good"), _btad_mask_stems)
    if fmt == "visa":
        return _read_visa(path, category)
    return _read_folder(path, category)
