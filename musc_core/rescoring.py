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


#: Similarity entries RsCon holds at a time (64 MiB in float32): rows of W are taken in blocks
#: so that memory stays bounded by this, not by N² (1.2 GiB at N = 10,000 in one piece).
RSCON_BLOCK_ENTRIES = 1 << 24


def rscon(
    scores: torch.Tensor,
    salient: torch.Tensor,
    windows: Sequence[int] = (1, 7),
    block_entries: int = RSCON_BLOCK_ENTRIES,
) -> torch.Tensor:
    """Re-score samples with their most similar samples' scores (Eq. 14–15).

    ``W = F Fᵀ``; the scores are min-max normalized to ``c``; for each window k (clipped to N)
    the k largest entries of each row of W are kept, the rest zeroed, the rows normalized to sum
    1 and multiplied with ``c``; the results of all windows are averaged. With windows (1, 7)
    and each sample most similar to itself this is ``½(c + P₇c)``.

    Rows are independent: W is computed a block of rows at a time, so memory is
    O(``block_entries`` + N·C) instead of O(N²). Up to N = 4096 with the default that is one
    block (the whole matrix); larger pools agree with the one-block result to float32 rounding.

    Args:
        scores: (N,) sample scores c_i.
        salient: (N, C) anomaly-salient features.
        windows: neighbourhood sizes k (paper: 1 and 7).
        block_entries: entries of W held at a time (at least one row).

    Returns:
        (N,) re-scored, on the min-max normalized scale (all zeros when every score is equal).
    """
    n = scores.shape[0]
    if salient.shape[0] != n:
        raise ValueError(f"{n} scores but {salient.shape[0]} salient features")
    if not windows or any(k <= 0 for k in windows):
        raise ValueError(f"windows must be positive, got {tuple(windows)}")
    feats = salient.float()
    c = scores.float()
    span = c.max() - c.min()
    c = (c - c.min()) / torch.where(span > 0, span, torch.ones_like(span))
    result = torch.zeros_like(c)
    rows = max(1, block_entries // max(n, 1))
    for start in range(0, n, rows):
        similarity = feats[start:start + rows] @ feats.T  # (rows, N)
        for k in windows:
            top = torch.topk(similarity, min(int(k), n), dim=1)
            mask = torch.zeros_like(similarity).scatter_(1, top.indices, top.values)
            mask = mask / mask.sum(dim=1, keepdim=True)
            result[start:start + rows] += mask @ c
    return result / len(windows)
