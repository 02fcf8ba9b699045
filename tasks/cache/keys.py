"""Content addresses of every cached stage output (docs/cache-keys.md).

A stage's key is a hash of everything its output depends on: the key of its input entry and
the settings of the stage, never a file name or a run. Hence a changed input file, a different
preprocessing setting or backbone (name + weights digest) gives a new key, and an unchanged one
finds the entry a previous run wrote. The flow derives every key up front from the samples'
input digests and the settings, so tasks receive keys and never large arrays. The settings'
dtypes are those the run's workers resolved (:func:`flows.stages.run_dtypes`): a key names the
dtype its entry was computed in (``float32`` or ``bfloat16``), never ``auto``.

Chains (→ reads the entry of), one row per stage in ``docs/cache-keys.md``: ``prepared_2d`` (the
files the image preparation reads, format, size, MVTec 3D-AD support-plane mode) ← ``tokens_2d``
(2D backbone, layers, ViT dtype) ← ``snamd_2d`` (degrees); ``prepared_3d`` (the files the point
preparation reads, format, size, MVTec 3D-AD support-plane mode, Eyecandies category) ←
``grouping`` (G, K, K_iter, C_thr) ← ``tokens_3d`` (3D backbone, layers, BatchNorm mode) ←
``snamd_3d`` (degrees); ``mask`` (the mask file, format, size) is read by reports and metrics
only; pairs of blocks of one modality's SNAMD features ← ``pairs`` (GEMM dtype); a sample's
pairs to its references ← ``reduced`` (Interval Average ratio, map settings); the pool's reduced
entries ← ``decisions`` (RsCon windows, flag rule, which part of the pool sets the thresholds).
The modality enters no per-sample or pair key (a 2D, a 3D and a 2D+3D run share those entries),
only the reduced one; labels and masks enter no feature key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from musc_core.config import MuscConfig
from musc_core.decisions import DRIFT_K
from tasks.cache.store import cache_key

#: Bump when a stage's computation changes so that old entries are no longer used.
STAGE_VERSIONS = {
    "prepared_2d": 1,
    "prepared_3d": 1,
    "mask": 1,
    "tokens_2d": 1,
    "snamd_2d": 1,
    "grouping": 1,
    "tokens_3d": 1,
    "snamd_3d": 1,
    "pairs": 2,
    "reduced": 1,
    "decisions": 1,
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
class PreparedKeys:
    """Keys of a sample's prepared entries under one configuration.

    Attributes:
        image: the prepared image (None without 2D).
        points: the prepared XYZ map (None without 3D).
        mask: the prepared ground-truth mask (None when the sample has no mask file).
        content: a hash of every input file but the mask, whatever the modality: it orders
            a batch's samples into blocks, so that the 2D, 3D and 2D+3D runs of a line lay
            them out alike (and share their pair entries). Not a cache key.
    """

    image: str | None
    points: str | None
    mask: str | None
    content: str = ""

    def as_dict(self) -> dict[str, str | None]:
        """The keys by entry, as batch records store them."""
        return {
            "image": self.image, "points": self.points, "mask": self.mask, "content": self.content
        }


@dataclass(frozen=True)
class SampleKeys:
    """Cache keys of one sample's entries under one configuration.

    Attributes:
        prepared: the prepared image, XYZ map and mask.
        tokens_2d, snamd_2d: raw ViT tokens and their SNAMD aggregation (None without 2D).
        grouping, tokens_3d, snamd_3d: IPG grouping, Point-MAE tokens and their SNAMD
            aggregation (None without 3D).
    """

    prepared: PreparedKeys
    tokens_2d: str | None
    snamd_2d: str | None
    grouping: str | None
    tokens_3d: str | None
    snamd_3d: str | None

    @property
    def features(self) -> tuple[str | None, str | None]:
        """The SNAMD keys pair scoring reads: (2D, 3D)."""
        return self.snamd_2d, self.snamd_3d

    @property
    def scored(self) -> tuple[str, str]:
        """The prepared entries that are scored (image, XYZ map; ``""`` for an unused one).

        Two samples with equal ``scored`` have equal scored inputs, whatever their masks or
        labels; it also orders a batch's samples (a content hash).
        """
        return self.prepared.image or "", self.prepared.points or ""


def _key(stage: str, **parts: object) -> str:
    return cache_key({"stage": stage, "version": STAGE_VERSIONS[stage], **parts})


#: Input file roles each prepared entry reads, per format (others: ``DEFAULT_READS``).
#: MVTec 3D-AD images are cleaned with their XYZ map (background zeroed); Eyecandies points
#: pick their cluster by image brightness; masks are padded by the image grid only.
IMAGE_READS = {"mvtec3d": ("image", "xyz")}
POINT_READS = {"eyecandies": ("depth", "info", "pose", "image")}
DEFAULT_IMAGE_READS = ("image",)
DEFAULT_POINT_READS = ("xyz", "depth", "info", "pose")


def _inputs(digests: Mapping[str, str], roles: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """(role, digest) of the roles present, in the given order."""
    return tuple((role, digests[role]) for role in roles if role in digests)


def prepared_keys(
    digests: Mapping[str, str], fmt: str, category: str, config: MuscConfig
) -> PreparedKeys:
    """Keys of a sample's prepared entries.

    Each key hashes the digests of the files its entry is made from (see :data:`IMAGE_READS`
    and :data:`POINT_READS`), the format (its cleaning), the image size, for MVTec 3D-AD the
    support-plane mode and, for Eyecandies points, the category (its plane rule). The
    modality only decides which entries exist.

    Args:
        digests: SHA-256 of each input file by role (``image``, ``xyz``, ``mask``, ``depth``,
            ``info``, ``pose``; see :func:`tasks.discover.input_digests`).
        fmt: dataset format.
        category: the sample's category.
        config: image size and modality.

    Returns:
        The keys (None for an entry the configuration does not use or a missing mask).
    """
    size = config.image_size
    image = points = mask = None
    # MVTec 3D-AD cleaning (image and points) depends on the support-plane mode.
    plane = {"plane": config.support_plane} if fmt == "mvtec3d" else {}
    if config.uses_2d:
        reads = IMAGE_READS.get(fmt, DEFAULT_IMAGE_READS)
        image = _key(
            "prepared_2d", inputs=_inputs(digests, reads), format=fmt, image_size=size, **plane
        )
    if config.uses_3d:
        reads = POINT_READS.get(fmt, DEFAULT_POINT_READS)
        rule = category.lower() if fmt == "eyecandies" else ""
        points = _key(
            "prepared_3d", inputs=_inputs(digests, reads), format=fmt, image_size=size,
            category=rule, **plane,
        )
    if "mask" in digests:
        mask = _key("mask", inputs=_inputs(digests, ("mask",)), format=fmt, image_size=size)
    scored = sorted(role for role in digests if role != "mask")
    content = cache_key({"content": _inputs(digests, scored)})
    return PreparedKeys(image, points, mask, content)


def sample_keys(prepared: PreparedKeys, config: MuscConfig, identities: Identities) -> SampleKeys:
    """Every feature key of a sample, from its prepared keys, the config and the backbones.

    ``config``'s dtypes enter the keys as they are: a run passes them resolved (the dtypes its
    entries are computed in); ``auto`` gives the keys of batches recorded before runs resolved
    them.
    """
    tokens_2d = snamd_2d = grouping = tokens_3d = snamd_3d = None
    if config.uses_2d:
        if identities.backbone_2d is None:
            raise ValueError("2D scoring needs the 2D backbone identity")
        if prepared.image is None:
            raise ValueError("2D scoring needs the prepared image's key")
        tokens_2d = _key(
            "tokens_2d",
            prepared=prepared.image,
            backbone=identities.backbone_2d,
            layers=config.layers_2d,
            dtype=config.vit_dtype,
        )
        snamd_2d = _key("snamd_2d", tokens=tokens_2d, degrees=config.aggregation_degrees)
    if config.uses_3d:
        if identities.backbone_3d is None:
            raise ValueError("3D scoring needs the 3D backbone identity")
        if prepared.points is None:
            raise ValueError("3D scoring needs the prepared XYZ map's key")
        grouping = _key(
            "grouping",
            prepared=prepared.points,
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
            # Point-MAE ran only in float32 before ``point_dtype`` existed: float32 tokens keep
            # that key, so stored caches and batch records stay valid.
            **({} if config.point_dtype == "float32" else {"dtype": config.point_dtype}),
        )
        snamd_3d = _key(
            "snamd_3d",
            tokens=tokens_3d,
            grouping=grouping,
            degrees=config.aggregation_degrees,
            threshold=config.curvature_threshold,
        )
    return SampleKeys(prepared, tokens_2d, snamd_2d, grouping, tokens_3d, snamd_3d)


#: A shard's entry keys, one per modality: (2D, 3D), None for a modality not scored.
PairKeys = tuple[str | None, str | None]


def pairs_key(
    block_a: Sequence[SampleKeys], block_b: Sequence[SampleKeys], config: MuscConfig
) -> PairKeys:
    """Keys of the pair distances between two blocks (the same block twice: inside it).

    One entry per modality: each key lists only that modality's SNAMD keys, so the 2D pairs
    of a 2D+3D run are those of a 2D run of the same blocks.
    """
    keys: list[str | None] = []
    for slot, modality in enumerate(("2d", "3d")):
        if block_a[0].features[slot] is None:
            keys.append(None)
            continue
        keys.append(
            _key(
                "pairs",
                modality=modality,
                a=[k.features[slot] for k in block_a],
                b=[k.features[slot] for k in block_b],
                dtype=config.distance_dtype,
            )
        )
    return keys[0], keys[1]


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


def decisions_key(
    reduced: Sequence[str], current: int, config: MuscConfig, against_bank: bool
) -> str:
    """Key of a pool's RsCon scores and decisions (:mod:`tasks.decisions`).

    Args:
        reduced: the reduced-entry keys of the pool, the batch's first (order matters: the
            first ``current`` are decided on).
        current: how many pool samples are the batch's.
        config: RsCon windows and the flag rule's ``k``.
        against_bank: whether the bank's part of the pool sets the thresholds.
    """
    return _key(
        "decisions",
        reduced=list(reduced),
        current=current,
        windows=config.rescoring_windows,
        k=config.flag_mad_k,
        against_bank=against_bank,
        drift_limit=DRIFT_K,
    )
