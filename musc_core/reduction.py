"""Per-sample reduction: from one sample's pair distances to its maps and salient feature.

After the pair distances of a sample to its R references are known (paper §III-C, Eq. 7), the
rest of its scoring needs nothing but the sample itself: Cross-modal Anomaly Enhancement,
Interval Average and the layer mean give its patch scores (:mod:`musc_core.mutual_scoring`);
the patch scores become pixel maps (:mod:`musc_core.anomaly_maps`), summed over the
modalities; and the feature at its highest-scoring patch is kept for RsCon (§III-D). The
in-memory pipeline (:func:`musc_core.pipeline.score`) and the orchestrated reduction task
(``tasks.scoring.reduce_samples``) both call :func:`reduce_sample`, so they compute the same
thing in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from musc_core.anomaly_maps import map_2d, map_3d
from musc_core.config import MuscConfig
from musc_core.cross_modal import projection_lists
from musc_core.grouping import PointSample
from musc_core.mutual_scoring import sample_patch_scores
from musc_core.rescoring import salient_features


@dataclass(frozen=True)
class SampleReduction:
    """Everything the reduction gives for one sample.

    Attributes:
        patch_2d: (M,) 2D patch scores, or None when images are not scored.
        patch_3d: (G,) 3D group scores, or None when point clouds are not scored.
        map_2d: (S, S) 2D anomaly map, or None.
        map_3d: (S, S) 3D anomaly map, or None.
        map: (S, S) the final map, the sum of the modalities' maps.
        salient: (C2 + C3,) anomaly-salient feature (2D part first), the input of RsCon.
    """

    patch_2d: torch.Tensor | None
    patch_3d: torch.Tensor | None
    map_2d: torch.Tensor | None
    map_3d: torch.Tensor | None
    map: torch.Tensor
    salient: torch.Tensor


def grid_patch_size(patches: int, image_size: int) -> int:
    """Side in pixels of a 2D patch, from the number of patches of a square grid.

    Args:
        patches: M, patches of one sample (a √M × √M grid).
        image_size: S, side of the image in pixels.

    Returns:
        S / √M.

    Raises:
        ValueError: when M is not a square or √M does not divide S.
    """
    side = math.isqrt(patches)
    if patches <= 0 or side * side != patches or image_size % side:
        raise ValueError(
            f"{patches} patches do not form a square grid dividing an image of {image_size} px"
        )
    return image_size // side


def reduce_sample(
    distances_2d: torch.Tensor | None,
    distances_3d: torch.Tensor | None,
    points: PointSample | None,
    salient_2d: torch.Tensor | None,
    salient_3d: torch.Tensor | None,
    patch_size: int,
    config: MuscConfig,
) -> SampleReduction:
    """Patch scores, anomaly maps and salient feature of one sample against R references.

    Args:
        distances_2d: (Y, M, R) 2D pair distances to the references, one slice per layer;
            None when images are not scored.
        distances_3d: (Y, G, R) 3D pair distances to the same references in the same order;
            None when point clouds are not scored.
        points: the sample's foreground points and grouping (needed for 3D).
        salient_2d: (M, C2) SNAMD features of the salient layer (2D), or None.
        salient_3d: (G, C3) SNAMD features of the salient layer (3D), or None.
        patch_size: side in pixels of a 2D patch, for the 2D↔3D projection lists of CAE
            (used only when both modalities are scored).
        config: Interval Average ratio, image size and 3D map blur.

    Returns:
        The sample's patch scores, maps and salient feature.

    Raises:
        ValueError: when no modality is given, or a scored modality lacks its points or
            salient features.
    """
    size = config.image_size
    if distances_3d is not None and points is None:
        raise ValueError("3D scoring needs the sample's points and grouping")
    projection = None
    if distances_2d is not None and distances_3d is not None:
        projection = projection_lists(points.centre_pixel, size, patch_size)
    scores = sample_patch_scores(distances_2d, distances_3d, projection, config.interval_ratio)
    maps: list[torch.Tensor] = []
    salient: list[torch.Tensor] = []
    m2 = m3 = None
    for patch, layer in ((scores.scores_2d, salient_2d), (scores.scores_3d, salient_3d)):
        if patch is None:
            continue
        if layer is None:
            raise ValueError("every scored modality needs its salient-layer features")
        salient.append(salient_features(patch[None], layer[None])[0])
    if scores.scores_2d is not None:
        m2 = map_2d(scores.scores_2d[None], size)[0]
        maps.append(m2)
    if scores.scores_3d is not None:
        m3 = map_3d(
            scores.scores_3d,
            points.grouping.centres,
            points.points,
            points.pixel_index,
            size,
            config.map_blur_sigma,
        )
        maps.append(m3)
    total = maps[0] if len(maps) == 1 else maps[0] + maps[1]
    return SampleReduction(
        patch_2d=scores.scores_2d,
        patch_3d=scores.scores_3d,
        map_2d=m2,
        map_3d=m3,
        map=total,
        salient=torch.cat(salient),
    )
