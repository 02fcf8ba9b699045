"""Safe checkpoint reading and weight digests shared by the 2D and 3D backbones."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch

RANDOM_SEED = 0
"""Seed of every explicitly requested random initialization (same model in every process)."""


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, hex (identifies a checkpoint in cache keys and reports)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | Path, what: str) -> object:
    """Read a checkpoint with ``torch.load(weights_only=True)``: tensors and containers only.

    Args:
        path: the checkpoint file.
        what: what the checkpoint is for, used in error messages (e.g. ``"Point-MAE"``).

    Returns:
        The checkpoint's content (a state dict or a dict wrapping one).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is corrupt or holds anything but plain tensors and containers
            (a pickle payload is refused, never executed).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} checkpoint {str(path)!r}: no such file")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ValueError(
            f"{path}: not a loadable {what} checkpoint; only plain tensors and containers are "
            f"accepted (weights_only loading): {error}"
        ) from error
