"""Build the 2D and 3D backbones a run asks for, and name them for cache keys and reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from musc_core.checkpoints import RANDOM_SEED, file_digest
from musc_core.config import MuscConfig
from musc_core.features_2d import ViTFeatureExtractor
from musc_core.fpfh import FpfhFeatureExtractor, FpfhParams
from musc_core.pipeline import PointExtractor
from musc_core.point_mae import PointFeatureExtractor, load_point_mae
from tasks.cache.keys import Identities
from tasks.choices import BACKBONES_3D, DEFAULT_BACKBONE_2D


@dataclass(frozen=True)
class BackboneSpec:
    """Which backbones to use and where their weights come from.

    Attributes:
        name_2d: timm ViT name.
        weights_2d: ``"pretrained"``, ``"random"`` or a checkpoint path.
        weights_3d: Point-MAE checkpoint path, ``"random"``, or None when no 3D is scored
            (always None for FPFH, which has no weights).
        patch_size_2d: patch-size override for random 2D weights (small test models).
        name_3d: ``"point-mae"`` or ``"fpfh"`` (weight-free descriptors, see
            :mod:`musc_core.fpfh`).
    """

    name_2d: str = DEFAULT_BACKBONE_2D
    weights_2d: str = "pretrained"
    weights_3d: str | None = None
    patch_size_2d: int | None = None
    name_3d: str = "point-mae"

    def __post_init__(self) -> None:
        """Reject an unknown 3D backbone and weights given to FPFH, naming the fix."""
        if self.name_3d not in BACKBONES_3D:
            raise ValueError(f"3D backbone must be one of {BACKBONES_3D}, got {self.name_3d!r}")
        if self.name_3d == "fpfh" and self.weights_3d is not None:
            raise ValueError(
                f"the fpfh 3D backbone has no weights, got weights_3d={self.weights_3d!r}: "
                "drop --weights-3d, or use --backbone-3d point-mae"
            )

    def random_weights(self, config: MuscConfig) -> bool:
        """Whether a backbone the modality uses is randomly initialized (never FPFH)."""
        return (config.uses_2d and self.weights_2d == "random") or (
            config.uses_3d and self.name_3d == "point-mae" and self.weights_3d == "random"
        )


@dataclass(frozen=True)
class Backbones:
    """The built extractors (None for an unused modality)."""

    extractor_2d: ViTFeatureExtractor | None
    extractor_3d: PointExtractor | None

    @property
    def random_weights(self) -> bool:
        """Whether any backbone was randomly initialized."""
        return any(
            e is not None and e.random_weights for e in (self.extractor_2d, self.extractor_3d)
        )

    def identities(self) -> dict[str, str]:
        """Backbone identities by modality, for reports and cache keys."""
        out = {}
        if self.extractor_2d is not None:
            out["2d"] = self.extractor_2d.identity
        if self.extractor_3d is not None:
            out["3d"] = self.extractor_3d.identity
        return out


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when present, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _check_3d_weights(spec: BackboneSpec) -> str:
    if spec.weights_3d is None:
        raise ValueError(
            "3D scoring needs Point-MAE weights: pass the checkpoint path "
            "(--weights-3d PATH) or request random weights explicitly (--weights-3d random)"
        )
    return spec.weights_3d


def build_2d(spec: BackboneSpec, config: MuscConfig) -> ViTFeatureExtractor:
    """The 2D extractor of a spec, on the CPU; checks the image size fits its patches."""
    extractor = ViTFeatureExtractor.create(
        spec.name_2d, spec.weights_2d, config.image_size, spec.patch_size_2d
    )
    if config.image_size % extractor.patch_size:
        raise ValueError(
            f"image size {config.image_size} is not a multiple of the patch size "
            f"{extractor.patch_size} of {spec.name_2d}"
        )
    return extractor


def build_3d(spec: BackboneSpec, config: MuscConfig) -> PointExtractor:
    """The 3D extractor of a spec (Point-MAE or FPFH), on the CPU."""
    if spec.name_3d == "fpfh":
        return FpfhFeatureExtractor(FpfhParams())
    weights = _check_3d_weights(spec)
    random_init = weights == "random"
    model = load_point_mae(None if random_init else weights, random_init, config.point_batchnorm)
    return PointFeatureExtractor(model, weights=weights)


def build_backbones(spec: BackboneSpec, config: MuscConfig, device: torch.device) -> Backbones:
    """Create the extractors the modality needs, moved to ``device``."""
    extractor_2d = build_2d(spec, config).to(device) if config.uses_2d else None
    extractor_3d = build_3d(spec, config).to(device) if config.uses_3d else None
    return Backbones(extractor_2d, extractor_3d)


def backbone_identities(
    spec: BackboneSpec,
    config: MuscConfig,
    load_2d: Callable[[], ViTFeatureExtractor] | None = None,
) -> Identities:
    """Identities (name + weights digest) of the backbones the modality uses.

    Random weights and checkpoint files are named without building a model (the file's
    SHA-256); timm's pretrained weights are loaded once to hash them, since the hub file may
    change under the same name.

    Args:
        spec: backbones and weights.
        config: modality and image size.
        load_2d: builds (or returns a kept) 2D extractor for pretrained weights; default
            :func:`build_2d` (a worker passes its kept model so the weights load once).

    Raises:
        FileNotFoundError: a checkpoint path that does not exist.
        ValueError: 3D scoring without 3D weights.
    """
    name_2d = name_3d = None
    if config.uses_2d:
        if spec.weights_2d == "random":
            patch = f":patch{spec.patch_size_2d}" if spec.patch_size_2d else ""
            name_2d = f"{spec.name_2d}:random-seed{RANDOM_SEED}{patch}"
        elif spec.weights_2d == "pretrained":
            name_2d = (load_2d or (lambda: build_2d(spec, config)))().identity
        else:
            if not Path(spec.weights_2d).is_file():
                raise FileNotFoundError(f"2D weights {spec.weights_2d!r}: no such file")
            name_2d = f"{spec.name_2d}:sha256-{file_digest(spec.weights_2d)[:16]}"
    if config.uses_3d and spec.name_3d == "fpfh":
        name_3d = FpfhParams().identity
    elif config.uses_3d:
        weights = _check_3d_weights(spec)
        if weights == "random":
            name_3d = f"point_mae:random-seed{RANDOM_SEED}"
        else:
            if not Path(weights).is_file():
                raise FileNotFoundError(f"Point-MAE checkpoint {weights!r}: no such file")
            name_3d = f"point_mae:sha256-{file_digest(weights)[:16]}"
    return Identities(name_2d, name_3d)
