"""Build the 2D and 3D backbones a run asks for, on the right device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from musc_core.config import MuscConfig
from musc_core.features_2d import ViTFeatureExtractor
from musc_core.point_mae import PointFeatureExtractor, load_point_mae

DEFAULT_BACKBONE_2D = "vit_base_patch8_224.dino"


@dataclass(frozen=True)
class BackboneSpec:
    """Which backbones to use and where their weights come from.

    Attributes:
        name_2d: timm ViT name.
        weights_2d: ``"pretrained"``, ``"random"`` or a checkpoint path.
        weights_3d: Point-MAE checkpoint path, ``"random"``, or None when no 3D is scored.
        patch_size_2d: patch-size override for random 2D weights (small test models).
    """

    name_2d: str = DEFAULT_BACKBONE_2D
    weights_2d: str = "pretrained"
    weights_3d: str | None = None
    patch_size_2d: int | None = None


@dataclass(frozen=True)
class Backbones:
    """The built extractors (None for an unused modality)."""

    extractor_2d: ViTFeatureExtractor | None
    extractor_3d: PointFeatureExtractor | None

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


def build_backbones(spec: BackboneSpec, config: MuscConfig, device: torch.device) -> Backbones:
    """Create the extractors the modality needs.

    Args:
        spec: backbone names and weight sources.
        config: modality, image size, BatchNorm mode.
        device: where the models run.

    Returns:
        The extractors, moved to ``device``.
    """
    extractor_2d = extractor_3d = None
    if config.uses_2d:
        extractor_2d = ViTFeatureExtractor.create(
            spec.name_2d, spec.weights_2d, config.image_size, spec.patch_size_2d
        ).to(device)
        if config.image_size % extractor_2d.patch_size:
            raise ValueError(
                f"image size {config.image_size} is not a multiple of the patch size "
                f"{extractor_2d.patch_size} of {spec.name_2d}"
            )
    if config.uses_3d:
        if spec.weights_3d is None:
            raise ValueError(
                "3D scoring needs Point-MAE weights: pass the checkpoint path "
                "(--weights-3d PATH) or request random weights explicitly (--weights-3d random)"
            )
        random_init = spec.weights_3d == "random"
        model = load_point_mae(
            None if random_init else spec.weights_3d, random_init, config.point_batchnorm
        )
        extractor_3d = PointFeatureExtractor(model, weights=spec.weights_3d).to(device)
    return Backbones(extractor_2d, extractor_3d)
