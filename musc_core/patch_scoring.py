"""Patch scores of one sample from its pair distances to a reference set (SPEC §4.2–4.3).

Mutual scoring is split in two so that the all-pairs work can be spread over workers: the pair
distances (``musc_core.mutual_scoring``) are computed in blocks of samples, then every sample is
reduced on its own here: Cross-modal Anomaly Enhancement when both modalities are scored,
Interval Average over the references, and the mean over the layers. The in-memory pipeline and
the orchestrated one both call :func:`sample_patch_scores`, so they compute the same thing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from musc_core.cross_modal import Projection, cross_modal_enhance
from musc_core.mutual_scoring import interval_average


class PatchScores(NamedTuple):
    """Patch scores of one sample.

    Attributes:
        scores_2d: (M,) 2D patch scores, or None when images are not scored.
        scores_3d: (G,) 3D group scores, or None when point clouds are not scored.
    """

    scores_2d: torch.Tensor | None
    scores_3d: torch.Tensor | None


def _interval_mean(layers: torch.Tensor, ratio: float) -> torch.Tensor:
    """Interval Average of each layer's (L, R) pair scores, then the layer mean: (L,)."""
    return interval_average(layers, ratio).mean(0)


def sample_patch_scores(
    distances_2d: torch.Tensor | None,
    distances_3d: torch.Tensor | None,
    projection: Projection | None,
    ratio: float,
) -> PatchScores:
    """Patch scores of one sample against R references (Eq. 8–11).

    With both modalities every layer's pair scores go through CAE (SPEC §4.3) before Interval
    Average; with one modality Interval Average applies directly. The layer mean follows.

    Args:
        distances_2d: (Y, M, R) 2D pair distances ``d(i, m, j)`` of the sample's M patches to
            each of the R references, one slice per layer (Y layers); or None.
        distances_3d: (Y, G, R) 3D pair distances against the same references in the same
            order; or None.
        projection: the sample's 2D↔3D projection lists (needed with both modalities).
        ratio: Interval Average fraction of the references.

    Returns:
        The sample's patch scores per modality.
    """
    if distances_2d is None and distances_3d is None:
        raise ValueError("sample_patch_scores needs the distances of at least one modality")
    if distances_2d is None or distances_3d is None:
        only = distances_2d if distances_2d is not None else distances_3d
        scores = _interval_mean(only, ratio)
        return PatchScores(scores, None) if distances_2d is not None else PatchScores(None, scores)
    if projection is None:
        raise ValueError("2D+3D scoring needs the sample's projection lists")
    if distances_2d.shape[0] != distances_3d.shape[0]:
        raise ValueError(
            f"2D has {distances_2d.shape[0]} layers, 3D {distances_3d.shape[0]}: they are fused "
            "layer by layer"
        )
    e2, e3 = cross_modal_enhance(distances_2d, distances_3d, projection)
    return PatchScores(_interval_mean(e2, ratio), _interval_mean(e3, ratio))
