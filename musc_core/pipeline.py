"""In-memory MuSc-V2: ``score(samples, config)`` for 2d, 3d and 2d+3d (paper §III).

This is the reference composition of the stages; the orchestrated pipeline spreads the same
functions over workers and caches their outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from musc_core.aggregation import snamd_2d, snamd_3d
from musc_core.anomaly_maps import sample_scores
from musc_core.config import MuscConfig
from musc_core.features_2d import ViTFeatureExtractor
from musc_core.fpfh import FpfhFeatureExtractor
from musc_core.grouping import PointSample, group_points
from musc_core.hardware import resolve_compute_dtype
from musc_core.mutual_scoring import pair_distances, resolve_distance_dtype
from musc_core.point_mae import PointFeatureExtractor
from musc_core.preprocess_points import normalize_unit_sphere, organized_to_points
from musc_core.reduction import SampleReduction, reduce_sample
from musc_core.rescoring import rscon

Progress = Callable[[str, int, int], None]
# A 3D backbone: the Point-MAE transformer or the weight-free FPFH descriptors.
PointExtractor = PointFeatureExtractor | FpfhFeatureExtractor

# Samples per Point-MAE forward pass (PointFeatureExtractor.extract_many).
POINT_BATCH = 4


@dataclass(frozen=True)
class Sample:
    """One sample of a product line, preprocessed to the config's image size S.

    Attributes:
        name: unique sample name.
        image: (3, S, S) float32 in [0, 1], or None for 3D-only lines.
        xyz: (S, S, 3) float32 organized point cloud (zeros = no point), cleaned, or None.
    """

    name: str
    image: torch.Tensor | None = None
    xyz: torch.Tensor | None = None


@dataclass(frozen=True)
class ModalityFeatures:
    """Aggregated (SNAMD) features of one modality for all samples.

    Attributes:
        layers: one (N, L, C) tensor per layer.
    """

    layers: list[torch.Tensor]


@dataclass(frozen=True)
class ScoreResult:
    """Everything a scoring run produces, in sample order.

    Attributes:
        names: N sample names.
        maps: (N, S, S) final anomaly maps (sum of the modalities' maps).
        maps_2d: (N, S, S) 2D maps, or None.
        maps_3d: (N, S, S) 3D maps, or None.
        patch_scores_2d: (N, M) 2D patch scores, or None.
        patch_scores_3d: (N, G) 3D group scores, or None.
        scores: (N,) sample scores before RsCon (max of the map).
        scores_rescored: (N,) sample scores after RsCon.
        salient: (N, C) anomaly-salient features used by RsCon.
        timings: wall seconds per stage (``2d_features``, ``grouping``, ``3d_features``,
            ``mutual_scoring`` — pair distances and the per-sample reduction: CAE, Interval
            Average, maps and salient features — and ``maps_and_rescoring``: sample scores
            and RsCon).
    """

    names: list[str]
    maps: torch.Tensor
    maps_2d: torch.Tensor | None
    maps_3d: torch.Tensor | None
    patch_scores_2d: torch.Tensor | None
    patch_scores_3d: torch.Tensor | None
    scores: torch.Tensor
    scores_rescored: torch.Tensor
    salient: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall time of the enclosed block to ``timings[stage]`` (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def _report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def prepare_points(xyz: torch.Tensor, config: MuscConfig) -> PointSample:
    """Foreground extraction, unit-sphere normalization and IPG grouping of one sample.

    Args:
        xyz: (S, S, 3) organized point cloud, zeros = no point.
        config: grouping settings.

    Returns:
        The sample's points and grouping.
    """
    points, pixel_index = organized_to_points(xyz)
    points = normalize_unit_sphere(points)
    grouping = group_points(
        points,
        num_groups=config.num_groups,
        group_size=config.group_size,
        ipg_step=config.ipg_step,
        curvature_threshold=config.curvature_threshold,
    )
    return PointSample(points=points, pixel_index=pixel_index, grouping=grouping)


def vit_autocast(config: MuscConfig, device: torch.device) -> torch.autocast:
    """Autocast context of the ViT: bfloat16 where it is fast and asked for, else off."""
    dtype = resolve_compute_dtype(config.vit_dtype, device, "vit_dtype")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def point_dtype(config: MuscConfig, device: torch.device) -> torch.dtype:
    """GEMM dtype of Point-MAE: bfloat16 where it is fast and asked for, else float32."""
    return resolve_compute_dtype(config.point_dtype, device, "point_dtype")


def features_2d(
    images: torch.Tensor,
    extractor: ViTFeatureExtractor,
    config: MuscConfig,
    progress: Progress | None = None,
) -> ModalityFeatures:
    """ViT tokens of the configured layers, aggregated by 2D SNAMD.

    Args:
        images: (N, 3, S, S) in [0, 1].
        extractor: the 2D backbone.
        config: layers and aggregation degrees.
        progress: stage progress callback.

    Returns:
        SNAMD features, one (N, M, C) tensor per layer.
    """
    total = images.shape[0]
    with vit_autocast(config, images.device):
        tokens = extractor.extract(
            images,
            config.layers_2d,
            progress=lambda done: _report(progress, "2D features", done, total),
        )
    tokens = [t.float() for t in tokens]
    side = config.image_size // extractor.patch_size
    return ModalityFeatures([snamd_2d(t, side, config.aggregation_degrees) for t in tokens])


def features_3d(
    point_samples: Sequence[PointSample],
    extractor: PointExtractor,
    config: MuscConfig,
    progress: Progress | None = None,
) -> ModalityFeatures:
    """3D group features of the configured layers, aggregated by 3D SNAMD.

    Args:
        point_samples: grouped point clouds, one per sample.
        extractor: the 3D backbone.
        config: layers, aggregation degrees and curvature threshold.
        progress: stage progress callback.

    Returns:
        SNAMD features, one (N, G, C) tensor per layer.
    """
    batches: list[list[torch.Tensor]] = []
    dtype = point_dtype(config, extractor.device)
    for start in range(0, len(point_samples), POINT_BATCH):
        batch = point_samples[start : start + POINT_BATCH]
        batches.append(
            extractor.extract_many(
                [s.points for s in batch], [s.grouping for s in batch], config.layers_3d, dtype
            )
        )
        _report(progress, "3D features", start + len(batch), len(point_samples))
    centres = torch.stack([s.grouping.centres for s in point_samples])
    curvature = torch.stack([s.grouping.curvature for s in point_samples])
    layers = []
    for layer in range(len(config.layers_3d)):
        tokens = torch.cat([feats[layer] for feats in batches])
        layers.append(
            snamd_3d(
                tokens,
                centres,
                curvature,
                config.aggregation_degrees,
                config.curvature_threshold,
            )
        )
    return ModalityFeatures(layers)


def layer_distances(features: ModalityFeatures, config: MuscConfig) -> list[torch.Tensor]:
    """Pair distances of every layer, each (N, L, N) with +inf on the diagonal."""
    device = features.layers[0].device
    dtype = resolve_distance_dtype(config.distance_dtype, device)
    return [pair_distances(f, config.pair_block, dtype) for f in features.layers]


def drop_self(distances: torch.Tensor) -> torch.Tensor:
    """Remove the diagonal references of a batch: (N, L, N) → (N, L, N − 1)."""
    n = distances.shape[0]
    keep = ~torch.eye(n, dtype=torch.bool, device=distances.device)
    index = torch.arange(n, device=distances.device).expand(n, n)[keep].view(n, n - 1)
    return torch.gather(distances, 2, index[:, None, :].expand(-1, distances.shape[1], -1))


def reference_distances(
    features: ModalityFeatures | None, config: MuscConfig
) -> torch.Tensor | None:
    """Every sample's distances to the other samples of the batch, all layers.

    Args:
        features: SNAMD features of one modality, or None when it is not scored.
        config: GEMM tile and dtype.

    Returns:
        (N, Y, L, N − 1) distances (sample i's references are the others in batch order), or
        None.
    """
    if features is None:
        return None
    return torch.stack([drop_self(d) for d in layer_distances(features, config)], dim=1)


def reduce_all(
    feats_2d: ModalityFeatures | None,
    feats_3d: ModalityFeatures | None,
    point_samples: Sequence[PointSample],
    patch_size: int,
    config: MuscConfig,
) -> list[SampleReduction]:
    """Mutual scoring of the batch, then the per-sample reduction of every sample.

    Args:
        feats_2d: SNAMD features of the images, or None.
        feats_3d: SNAMD features of the point clouds, or None.
        point_samples: grouped point clouds (empty without 3D).
        patch_size: ViT patch side in pixels (for CAE, used with both modalities).
        config: Interval Average ratio, block size, distance dtype, salient layer, maps.

    Returns:
        One reduction per sample, in batch order.
    """
    d2 = reference_distances(feats_2d, config)
    d3 = reference_distances(feats_3d, config)
    s2 = None if feats_2d is None else feats_2d.layers[config.salient_layer]
    s3 = None if feats_3d is None else feats_3d.layers[config.salient_layer]
    count = (d2 if d2 is not None else d3).shape[0]
    return [
        reduce_sample(
            None if d2 is None else d2[i],
            None if d3 is None else d3[i],
            point_samples[i] if point_samples else None,
            None if s2 is None else s2[i],
            None if s3 is None else s3[i],
            patch_size,
            config,
        )
        for i in range(count)
    ]


def _stacked(parts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The samples' tensors stacked on the CPU, or None when the modality is absent."""
    return None if parts[0] is None else torch.stack(list(parts)).cpu()


def score(
    samples: Sequence[Sample],
    config: MuscConfig,
    extractor_2d: ViTFeatureExtractor | None = None,
    extractor_3d: PointExtractor | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> ScoreResult:
    """Score a set of unlabeled samples against each other with MuSc-V2.

    Args:
        samples: N ≥ 2 preprocessed samples; they need ``image`` for 2D and ``xyz`` for 3D.
        config: hyperparameters (``config.modality`` selects 2d, 3d or 2d+3d).
        extractor_2d: 2D backbone (required when the modality uses images).
        extractor_3d: 3D backbone, Point-MAE or FPFH (required when the modality uses point
            clouds).
        device: where features and scoring run.
        progress: optional ``(stage, done, total)`` callback for long stages.

    Returns:
        Maps, patch scores, sample scores before and after RsCon, and salient features.
    """
    if len(samples) < 2:
        raise ValueError(f"mutual scoring needs at least 2 samples, got {len(samples)}")
    device = torch.device(device)
    names = [s.name for s in samples]
    feats_2d = feats_3d = None
    point_samples: list[PointSample] = []
    timings: dict[str, float] = {}

    if config.uses_2d:
        if extractor_2d is None:
            raise ValueError(f"modality {config.modality} needs a 2D extractor")
        missing = [s.name for s in samples if s.image is None]
        if missing:
            raise ValueError(f"samples without an image: {missing}")
        with _timed(timings, "2d_features"):
            images = torch.stack([s.image for s in samples]).to(device)
            feats_2d = features_2d(images, extractor_2d.to(device), config, progress)
    if config.uses_3d:
        if extractor_3d is None:
            raise ValueError(f"modality {config.modality} needs a 3D extractor")
        missing = [s.name for s in samples if s.xyz is None]
        if missing:
            raise ValueError(f"samples without an XYZ map: {missing}")
        with _timed(timings, "grouping"):
            for index, sample in enumerate(samples):
                try:
                    point_samples.append(prepare_points(sample.xyz.to(device), config))
                except ValueError as error:
                    raise ValueError(f"sample {sample.name!r}: {error}") from error
                _report(progress, "grouping", index + 1, len(samples))
        with _timed(timings, "3d_features"):
            feats_3d = features_3d(point_samples, extractor_3d.to(device), config, progress)

    with _timed(timings, "mutual_scoring"):
        _report(progress, "mutual scoring", 0, 1)
        patch_size = extractor_2d.patch_size if extractor_2d is not None else 0
        reduced = reduce_all(feats_2d, feats_3d, point_samples, patch_size, config)
        _report(progress, "mutual scoring", 1, 1)

    with _timed(timings, "maps_and_rescoring"):
        maps = torch.stack([r.map for r in reduced])
        scores = sample_scores(maps)
        salient = torch.stack([r.salient for r in reduced])
        rescored = rscon(scores, salient, config.rescoring_windows)
    return ScoreResult(
        names=names,
        maps=maps.cpu(),
        maps_2d=_stacked([r.map_2d for r in reduced]),
        maps_3d=_stacked([r.map_3d for r in reduced]),
        patch_scores_2d=_stacked([r.patch_2d for r in reduced]),
        patch_scores_3d=_stacked([r.patch_3d for r in reduced]),
        scores=scores.cpu(),
        scores_rescored=rescored.cpu(),
        salient=salient.cpu(),
        timings=timings,
    )
