"""RsCon: re-scoring with constrained neighbourhood (paper §III-D, Eq. 12–17)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def salient_features(patch_scores: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Anomaly-salient feature of each sample: its feature at the highest-scoring patch.

    Args:
        patch_scores: (N, L) patch scores of one modality.
        features: (N, L, C) aggregated features of the salient layer, same patches.

    Returns:
        (N, C) features at ``argmax_m patch_scores[i, m]``.
    """
    if patch_scores.shape != features.shape[:2]:
        raise ValueError(
            f"scores {tuple(patch_scores.shape)} do not match features {tuple(features.shape)}"
        )
    best = patch_scores.argmax(dim=1)
    return features[torch.arange(features.shape[0], device=features.device), best]


def rscon(
    scores: torch.Tensor, salient: torch.Tensor, windows: Sequence[int] = (1, 7)
) -> torch.Tensor:
    """Re-score samples with their most similar samples' scores (Eq. 14–15).

    ``W = F Fᵀ``; the scores are min-max normalized to ``c``; for each window k (clipped to N)
    the k largest entries of each row of W are kept, the rest zeroed, the rows normalized to sum
    1 and multiplied with ``c``; the results of all windows are averaged. With windows (1, 7)
    and each sample most similar to itself this is ``½(c + P₇c)``.

    Args:
        scores: (N,) sample scores c_i.
        salient: (N, C) anomaly-salient features.
        windows: neighbourhood sizes k (paper: 1 and 7).

    Returns:
        (N,) re-scored, on the min-max normalized scale (all zeros when every score is equal).
    """
    n = scores.shape[0]
    if salient.shape[0] != n:
        raise ValueError(f"{n} scores but {salient.shape[0]} salient features")
    if not windows or any(k <= 0 for k in windows):
        raise ValueError(f"windows must be positive, got {tuple(windows)}")
    feats = salient.float()
    similarity = feats @ feats.T
    c = scores.float()
    span = c.max() - c.min()
    c = (c - c.min()) / torch.where(span > 0, span, torch.ones_like(span))
    result = torch.zeros_like(c)
    for k in windows:
        top = torch.topk(similarity, min(int(k), n), dim=1)
        mask = torch.zeros_like(similarity).scatter_(1, top.indices, top.values)
        mask = mask / mask.sum(dim=1, keepdim=True)
        result += mask @ c
    return result / len(windows)
