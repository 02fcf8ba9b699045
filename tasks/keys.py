"""Content addresses of every cached stage output (SPEC §8.2).

A stage's key is a hash of everything its output depends on: the key of its input entry and
the settings of the stage, never a file name or a run. Hence a changed input file, a different
preprocessing setting or backbone (name + weights digest) gives a new key, and an unchanged one
finds the entry a previous run wrote. The flow derives every key up front from the samples'
input digests and the settings, so tasks receive keys and never large arrays.

Chains (→ reads the entry of):
``prepared`` (input bytes, format, size, modality) ← ``tokens_2d`` (2D backbone, layers) ←
``snamd_2d`` (degrees); ``prepared`` ← ``grouping`` (G, K, K_iter, C_thr) ← ``tokens_3d``
(3D backbone, layers, BatchNorm mode) ← ``snamd_3d`` (degrees); pairs of blocks of SNAMD
features ← ``pairs`` (GEMM dtype); a sample's pairs to its references ← ``reduced``
(Interval Average ratio, map settings).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from musc_core.config import MuscConfig
from tasks.cache import cache_key

#: Bump when a stage's computation changes so that old entries are no longer used.
STAGE_VERSIONS = {
    "prepared": 1,
    "tokens_2d": 1,
    "snamd_2d": 1,
    "grouping": 1,
    "tokens_3d": 1,
    "snamd_3d": 1,
    "pairs": 1,
    "reduced": 1,
}


@dataclass(frozen=True)
class Identities:
    """Backbone identities (name + weights digest) that feature keys depend on.

    Attributes:
        backbone_2d: e.g. ``"vit_base_patch8_224.dino:pretrained-3f2a…"``, or None without 2D.
        backbone_3d: e.g. ``"point_mae:sha256-91c0…"``, or None without 3D.
    """

    backbone_2d: str | None
    backbone_3d: str | None

    def as_dict(self) -> dict[str, str]:
        """Identities by modality (``"2d"``, ``"3d"``), unused modalities left out."""
        pairs = (("2d", self.backbone_2d), ("3d", self.backbone_3d))
        return {name: value for name, value in pairs if value}


@dataclass(frozen=True)
class SampleKeys:
    """Cache keys of one sample's entries under one configuration.

    Attributes:
        prepared: the preprocessed sample.
        tokens_2d, snamd_2d: raw ViT tokens and their SNAMD aggregation (None without 2D).
        grouping, tokens_3d, snamd_3d: IPG grouping, Point-MAE tokens and their SNAMD
            aggregation (None without 3D).
    """

    prepared: str
    tokens_2d: str | None
    snamd_2d: str | None
    grouping: str | None
    tokens_3d: str | None
    snamd_3d: str | None

    @property
    def features(self) -> tuple[str | None, str | None]:
        """The SNAMD keys pair scoring reads: (2D, 3D)."""
        return self.snamd_2d, self.snamd_3d


def _key(stage: str, **parts: object) -> str:
    return cache_key({"stage": stage, "version": STAGE_VERSIONS[stage], **parts})


def prepared_key(input_digest: str, fmt: str, config: MuscConfig) -> str:
    """Key of a preprocessed sample: its files' bytes, the format's cleaning, size, modality.

    The modality matters because 3D cleaning (MVTec 3D-AD) also blanks image pixels.
    """
    return _key(
        "prepared",
        input=input_digest,
        format=fmt,
        image_size=config.image_size,
        uses_2d=config.uses_2d,
        uses_3d=config.uses_3d,
    )


def sample_keys(prepared: str, config: MuscConfig, identities: Identities) -> SampleKeys:
    """Every feature key of a sample, from its prepared key, the config and the backbones."""
    tokens_2d = snamd_2d = grouping = tokens_3d = snamd_3d = None
    if config.uses_2d:
        if identities.backbone_2d is None:
            raise ValueError("2D scoring needs the 2D backbone identity")
        tokens_2d = _key(
            "tokens_2d",
            prepared=prepared,
            backbone=identities.backbone_2d,
            layers=config.layers_2d,
            dtype=config.vit_dtype,
        )
        snamd_2d = _key("snamd_2d", tokens=tokens_2d, degrees=config.aggregation_degrees)
    if config.uses_3d:
        if identities.backbone_3d is None:
            raise ValueError("3D scoring needs the 3D backbone identity")
        grouping = _key(
            "grouping",
            prepared=prepared,
            groups=config.num_groups,
            size=config.group_size,
            step=config.ipg_step,
            threshold=config.curvature_threshold,
        )
        tokens_3d = _key(
            "tokens_3d",
            grouping=grouping,
            backbone=identities.backbone_3d,
            layers=config.layers_3d,
            batchnorm=config.point_batchnorm,
        )
        snamd_3d = _key(
            "snamd_3d",
            tokens=tokens_3d,
            grouping=grouping,
            degrees=config.aggregation_degrees,
            threshold=config.curvature_threshold,
        )
    return SampleKeys(prepared, tokens_2d, snamd_2d, grouping, tokens_3d, snamd_3d)


def pairs_key(
    block_a: Sequence[SampleKeys], block_b: Sequence[SampleKeys], config: MuscConfig
) -> str:
    """Key of the pair distances between two blocks (the same block twice: inside it)."""
    return _key(
        "pairs",
        a=[k.features for k in block_a],
        b=[k.features for k in block_b],
        dtype=config.distance_dtype,
    )


def reduced_key(
    sample: SampleKeys, references: Sequence[SampleKeys], config: MuscConfig
) -> str:
    """Key of a sample's patch scores, maps and salient feature against its references."""
    return _key(
        "reduced",
        sample=sample.features,
        grouping=sample.grouping,
        references=[k.features for k in references],
        ratio=config.interval_ratio,
        dtype=config.distance_dtype,
        image_size=config.image_size,
        blur=config.map_blur_sigma,
        salient=config.salient_layer,
    )
