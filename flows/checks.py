"""Up-front checks of the ``musc`` options, before any Prefect server or Dask cluster starts.

What is bound to fail is refused at once, in one message naming the option and the fix.

Nothing here imports PyTorch, Prefect or Dask: the checks take a second or two even on a
loaded machine. They cover ranges and choices (through :class:`musc_core.config.MuscConfig`,
which validates itself), the output and storage locations (usable and writable, the S3
endpoint reachable and the credentials accepted), an explicit batch id (valid, and not
recorded on its line already: a batch record is never replaced), the weights (checkpoint
files present, timm's pretrained weights cached or the hub reachable), the image size
against the ViT's patch size, and the dataset root and category.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from musc_core.config import MuscConfig

if TYPE_CHECKING:
    from tasks.formats.sources import ObjectPath

_PATCH = re.compile(r"patch(\d+)")


class UsageError(ValueError):
    """An option that cannot work, with what to do instead.

    Attributes:
        option: the option at fault (``--interval-ratio``), or ``""`` for none in particular.
    """

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        super().__init__(f"argument {option}: {message}" if option else message)


def config_from_args(args: argparse.Namespace) -> MuscConfig:
    """The MuSc-V2 settings the options ask for, validated.

    Raises:
        UsageError: a value :class:`MuscConfig` refuses, named by its option.
    """
    from flows.options import model_from_args
    from flows.settings import Algorithm

    return model_from_args(Algorithm, args).to_config()


def check_counts(args: argparse.Namespace) -> None:
    """Counts of the command's own options (the settings models check theirs).

    Raises:
        UsageError: the first option out of range.
    """
    at_least = [
        ("--subsets", getattr(args, "subsets", None), 1),
        ("--seeds", getattr(args, "seeds", None), 1),
        ("--num-samples", getattr(args, "num_samples", None), 2),
    ]
    for option, value, low in at_least:
        if value is not None and value < low:
            raise UsageError(option, f"must be at least {low}, got {value}")
    if getattr(args, "line", None) and getattr(args, "category", None) == "all":
        raise UsageError("--line", "names one line: name its --category too")


def check_cluster_option(args: argparse.Namespace) -> None:
    """``--cluster`` names something a task runner can be built for.

    Raises:
        UsageError: an unknown value.
    """
    from infra.cluster import check_cluster

    try:
        check_cluster(args.cluster, args.workers)
    except ValueError as error:
        raise UsageError("--cluster", str(error)) from None


def check_location(url: str, option: str) -> None:
    """A storage or output location is usable and writable (created when missing).

    Raises:
        UsageError: a file where a folder is needed, no permission, no bucket, refused
            credentials or an S3 endpoint that cannot be reached.
    """
    from infra.storage import StorageUnreachable, check_writable, redact

    try:
        check_writable(url)
    except NotADirectoryError as error:
        raise UsageError(
            option, f"{url!r} cannot be a folder: {error}; name a folder (created when missing)"
        ) from None
    except FileExistsError as error:
        raise UsageError(option, f"{url!r}: {error}; name a folder") from None
    except FileNotFoundError as error:
        raise UsageError(
            option, f"{url!r}: {redact(str(error))}; create the bucket or fix the URL"
        ) from None
    except PermissionError as error:
        fix = (
            "fix the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or the bucket's "
            "permissions" if "://" in url and not url.startswith("file://")
            else "fix the folder's permissions or name a folder this user can write"
        )
        raise UsageError(
            option, f"{url!r} cannot be written ({redact(str(error))}); {fix}"
        ) from None
    except StorageUnreachable as error:
        raise UsageError(option, f"{url!r}: {error}") from None
    except ValueError as error:
        raise UsageError(option, str(error)) from None


def check_new_batches(storage: str, batches: Sequence[tuple[str, str]], option: str) -> None:
    """Batch ids given explicitly are valid and not recorded on their lines yet.

    A batch record is created once and never replaced, so a run that would record an
    existing batch is refused before it starts (a re-run after a failure is not refused: a
    run records its batch only when it completes).

    Args:
        storage: the storage root of the batch records (checked usable before).
        batches: ``(line, batch id)`` of each record the run would create.
        option: the option that gave the ids (``--batch``, ``--record-as``).

    Raises:
        UsageError: an invalid id, or one its line has recorded already.
    """
    from tasks.records.batch_record import BatchExists, check_batch_id, check_new_batch

    fix = f"pass another {option}" + (
        ", or leave it out for a new id (the UTC time and a random suffix)"
        if option == "--batch" else ""
    )
    for line, batch in batches:
        try:
            check_new_batch(storage, line, check_batch_id(batch))
        except BatchExists as error:
            message = str(BatchExists(error.line, error.batch, error.where, fix))
            raise UsageError(option, message) from None
        except ValueError as error:
            raise UsageError(option, str(error)) from None


def check_weights(args: argparse.Namespace, config: MuscConfig) -> None:
    """The weights of the modalities the run uses can be had, and the image size fits the ViT.

    Raises:
        UsageError: a missing checkpoint file, 3D without weights, pretrained 2D weights that
            are neither cached nor downloadable, or an image size the patch size does not
            divide.
    """
    if config.uses_2d:
        weights = args.weights_2d
        if weights == "pretrained":
            from infra.hub import pretrained_weights_problem

            problem = pretrained_weights_problem(args.backbone_2d)
            if problem:
                raise UsageError(
                    "--weights-2d",
                    f"{problem}; pass a local checkpoint (--weights-2d "
                    "/path/to/checkpoint.pth), or --weights-2d random (results not meaningful)",
                )
        elif weights != "random" and not Path(weights).is_file():
            raise UsageError(
                "--weights-2d",
                f"no such file {weights!r}; pass an existing checkpoint, 'pretrained' or "
                "'random'",
            )
        patch = getattr(args, "patch_size_2d", None) or _patch_size(args.backbone_2d)
        if patch and config.image_size % patch:
            raise UsageError(
                "--image-size",
                f"{config.image_size} is not a multiple of the patch size {patch} of "
                f"{args.backbone_2d}; use e.g. {max(patch, config.image_size // patch * patch)}",
            )
    if config.uses_3d and getattr(args, "backbone_3d", "point-mae") == "fpfh":
        if args.weights_3d is not None and args.command != "demo":
            raise UsageError(
                "--weights-3d",
                "the fpfh 3D backbone has no weights: drop --weights-3d, or use "
                "--backbone-3d point-mae",
            )
    elif config.uses_3d:
        weights = args.weights_3d
        if weights is None:
            raise UsageError(
                "--weights-3d",
                f"--modality {config.modality} needs Point-MAE weights: pass --weights-3d "
                "/path/to/point_mae.pth, or --weights-3d random (results not meaningful)",
            )
        if weights != "random" and not Path(weights).is_file():
            raise UsageError(
                "--weights-3d", f"no such file {weights!r}; pass an existing checkpoint or 'random'"
            )


def _patch_size(name: str) -> int | None:
    """The patch size in a timm ViT name (``vit_base_patch8_224`` → 8), None when absent."""
    match = _PATCH.search(name)
    return int(match.group(1)) if match else None


def _dataset_folder(data: str) -> Path | ObjectPath:
    """The dataset root as a folder (a URL root listed once), or a UsageError naming DATA."""
    from tasks.formats.sources import ObjectTree, is_url, local_path

    if not is_url(data):
        root = Path(local_path(data))
        if not root.is_dir():
            raise UsageError("data", f"no such folder {data!r}")
        return root
    from infra.storage import StorageUnreachable, redact, require_s3_endpoint

    if data.partition("://")[0].lower() in ("s3", "s3a"):
        try:
            require_s3_endpoint()
        except StorageUnreachable as error:
            raise UsageError("data", f"{data!r}: {error}") from None
    try:
        return ObjectTree.list(data).path()
    except FileNotFoundError:
        raise UsageError(
            "data",
            f"no objects below {data!r}: check the bucket and prefix (the credentials are "
            "those of --storage: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)",
        ) from None
    except (PermissionError, StorageUnreachable, ValueError) as error:
        raise UsageError("data", f"{data!r} cannot be listed ({redact(str(error))})") from None


def check_dataset(data: str, data_format: str, category: str | None) -> None:
    """The dataset root exists and, for a named category, holds it.

    A URL root (``s3://bucket/prefix``) must hold objects; it is listed with the storage
    layer's credentials (:mod:`tasks.formats.sources`).

    Raises:
        UsageError: no such folder (no object below the URL), or no such category (the ones
            present are listed).
    """
    root = _dataset_folder(data)
    if category in (None, "all") or data_format in ("folder", "visa"):
        return
    if (root / category).is_dir() or root.name == category:
        return
    present = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    raise UsageError(
        "--category",
        f"{data!r} has no category {category!r}; present: {', '.join(present) or 'none'} "
        "(or 'all')",
    )


def check_dtypes(args: argparse.Namespace, config: MuscConfig) -> None:
    """An explicit ``bfloat16`` is refused where the device has no native bf16.

    Raises:
        UsageError: ``--distance-dtype``, ``--vit-dtype`` or ``--point-dtype`` ``bfloat16``
            on such a device.
    """
    if "bfloat16" not in (config.distance_dtype, config.vit_dtype, config.point_dtype):
        return
    import torch

    from musc_core.hardware import resolve_compute_dtype

    device = getattr(args, "device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = (
        ("distance", config.distance_dtype),
        ("vit", config.vit_dtype),
        ("point", config.point_dtype),
    )
    for option, value in dtypes:
        try:
            resolve_compute_dtype(value, device, f"{option}_dtype")
        except ValueError as error:
            message = str(error).replace(f"{option}_dtype=", f"--{option}-dtype ")
            raise UsageError(f"--{option}-dtype", message) from None


def check_score(args: argparse.Namespace) -> MuscConfig:
    """Every check of ``score``, ``eval`` and ``demo``, cheapest first.

    Returns:
        The validated settings.

    Raises:
        UsageError: the first problem found.
    """
    check_counts(args)
    config = config_from_args(args)
    check_cluster_option(args)
    if getattr(args, "data", None) is not None:
        category = args.category if isinstance(args.category, str) else None
        check_dataset(args.data, args.data_format, category)
    check_weights(args, config)
    check_dtypes(args, config)
    check_location(args.out, "--out")
    if args.storage:
        check_location(args.storage, "--storage")
    return config
