"""SNAMD: similarity-weighted neighbourhood aggregation with multiple degrees (paper §III-B).

Both variants weight a neighbour ``f_n`` of a token ``f_m`` by ``exp(-||f_n - f_m||_2)``
(paper Eq. 5) and take the weighted mean over the first ``r`` neighbours for every degree ``r``
(Eq. 6, normalized by the sum of the weights). The 2D variant works on the raw LayerNorm tokens
of a ViT laid out on their patch grid; the 3D variant on normalized point-transformer tokens with
the nearest group centres as neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Elements of one (chunk, M, C) float32 working tensor; bounds the memory of both variants.
# Small enough (4 MB) that the few working tensors of a chunk stay in the last-level cache
# while the window offsets are swept over them: one 784×768 sample per chunk runs about four
# times faster than chunks of 32 MB.
_CHUNK_ELEMENTS = 1 << 20


def _check_degrees(degrees: Sequence[int]) -> tuple[int, ...]:
    degrees = tuple(int(r) for r in degrees)
    if not degrees or any(r <= 0 or r % 2 == 0 for r in degrees):
        raise ValueError(f"aggregation degrees must be odd and positive, got {degrees}")
    return degrees


def _chunk_size(per_sample: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(per_sample, 1))


def _snamd_2d_chunk(grid: torch.Tensor, degrees: tuple[int, ...]) -> torch.Tensor:
    """SNAMD of one chunk of token grids.

    Args:
        grid: (n, h, w, C) tokens on their patch grid.
        degrees: odd window sides r.

    Returns:
        (n, h, w, C) mean over the degrees of the weighted window means (not normalized).
    """
    _, h, w, _ = grid.shape
    half = max(degrees) // 2
    # Zero padding of the grid: padded positions have f_n = 0.
    padded = F.pad(grid, (0, 0, half, half, half, half))
    wanted = set(degrees)
    numerator = torch.zeros_like(grid)
    denominator = grid.new_zeros(grid.shape[:-1] + (1,))
    result = torch.zeros_like(grid)
    # Offsets grouped by ring ρ = max(|dy|, |dx|): after ring ρ the running sums cover the
    # centred (2ρ+1)×(2ρ+1) window.
    for ring in range(half + 1):
        for dy in range(-ring, ring + 1):
            for dx in range(-ring, ring + 1):
                if max(abs(dy), abs(dx)) != ring:
                    continue
                neighbour = padded[:, half + dy : half + dy + h, half + dx : half + dx + w]
                weight = torch.exp(-torch.linalg.vector_norm(neighbour - grid, dim=-1))
                weight = weight.unsqueeze(-1)
                numerator.addcmul_(weight, neighbour)
                denominator.add_(weight)
        if 2 * ring + 1 in wanted:
            result.add_(numerator / denominator)
    return result.div_(len(degrees))


def snamd_2d(tokens: torch.Tensor, side: int, degrees: Sequence[int] = (1, 3, 5)) -> torch.Tensor:
    """2D SNAMD of ViT patch tokens (paper §III-B, Eq. 5–6).

    For every patch m and every degree r, the similarity-weighted mean of the tokens in the
    centred r×r window of the zero-padded patch grid (padded positions count in the
    denominator with weight ``exp(-||f_m||)`` and add nothing to the numerator, as in the
    reference); the means of all degrees are averaged and the result is L2-normalized.

    Args:
        tokens: (N, M, C) raw LayerNorm patch tokens of one layer, row-major patch grid.
        side: grid side h = w, with ``side * side == M``.
        degrees: odd window sides r (paper: 1, 3, 5).

    Returns:
        (N, M, C) unit-norm aggregated features, same dtype and device as ``tokens``.
    """
    degrees = _check_degrees(degrees)
    n, m, c = tokens.shape
    if side * side != m:
        raise ValueError(f"{m} patches do not form a {side}x{side} grid")
    out = torch.empty_like(tokens)
    step = _chunk_size(m * c)
    for start in range(0, n, step):
        grid = tokens[start : start + step].reshape(-1, side, side, c)
        aggregated = _snamd_2d_chunk(grid, degrees).reshape(-1, m, c)
        out[start : start + step] = F.normalize(aggregated, dim=-1)
    return out


def nearest_centres(centres: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of each group's ``count`` nearest group centres, itself first.

    Args:
        centres: (n, G, 3) group centres.
        count: neighbours per group (clipped to G).

    Returns:
        (n, G, min(count, G)) long indices into G, ordered by distance, column 0 = the group.
    """
    g = centres.shape[1]
    dist = torch.cdist(centres, centres)
    # Force the group itself first even when another centre coincides with it.
    dist.diagonal(dim1=1, dim2=2).fill_(-1.0)
    return torch.topk(dist, min(count, g), dim=-1, largest=False).indices


def _neighbour_means(
    feats: torch.Tensor, index: torch.Tensor, degrees: tuple[int, ...]
) -> dict[int, torch.Tensor]:
    """Similarity-weighted means of the first r neighbours of every group, for each degree r.

    Args:
        feats: (n, G, C) normalized tokens.
        index: (n, G, k) neighbour groups of each group, itself first.
        degrees: neighbour counts r (clipped to k).

    Returns:
        {r: (n, G, C) weighted mean over neighbours 0 … r − 1} for every clipped degree.
    """
    n, g, c = feats.shape
    k = index.shape[-1]
    offset = (torch.arange(n, device=feats.device) * g)[:, None, None]
    flat = (index + offset).reshape(-1)
    neighbours = feats.reshape(n * g, c).index_select(0, flat).view(n, g, k, c)
    weight = torch.exp(-torch.linalg.vector_norm(neighbours - feats[:, :, None], dim=-1))
    numerator = feats.new_zeros(n, g, c)
    denominator = feats.new_zeros(n, g, 1)
    means, done = {}, 0
    # Running sums up to each degree, in ascending order (sums over the new slices only).
    for r in sorted({min(r, k) for r in degrees}):
        part = weight[:, :, done:r, None]
        numerator += (neighbours[:, :, done:r] * part).sum(dim=2)
        denominator += part.sum(dim=2)
        means[r], done = numerator / denominator, r
    return means


def snamd_3d(
    tokens: torch.Tensor,
    centres: torch.Tensor,
    curvature: torch.Tensor,
    degrees: Sequence[int] = (1, 3, 5),
    curvature_threshold: float = 0.01,
) -> torch.Tensor:
    """3D SNAMD of point-transformer group tokens (paper §III-B, Eq. 5–6, surface gate).

    Tokens are L2-normalized first. The neighbours of a group are its ``max(degrees)`` nearest
    group centres (itself first); for every degree r the similarity-weighted mean over the first
    r neighbours is taken. The per-degree results are concatenated scale-major into a
    ``len(degrees) * C`` vector that is average-pooled over consecutive ``len(degrees)``-tuples
    back to C channels (reference behaviour: ``out[c] = mean(cat[3c : 3c + 3])``). Groups whose
    curvature is at or above the threshold keep their own normalized token. The result is not
    normalized again.

    Args:
        tokens: (N, G, C) LayerNorm group tokens of one layer.
        centres: (N, G, 3) group centres (unit-sphere coordinates).
        curvature: (N, G) curvature at each centre.
        degrees: odd neighbour counts r (paper: 1, 3, 5).
        curvature_threshold: C_thr; groups with curvature >= C_thr are not aggregated.

    Returns:
        (N, G, C) aggregated features, same dtype and device as ``tokens``.
    """
    degrees = _check_degrees(degrees)
    n, g, c = tokens.shape
    if centres.shape != (n, g, 3) or curvature.shape != (n, g):
        raise ValueError(
            f"centres {tuple(centres.shape)} / curvature {tuple(curvature.shape)} do not match "
            f"tokens {tuple(tokens.shape)}"
        )
    count = min(max(degrees), g)
    out = torch.empty_like(tokens)
    step = _chunk_size(g * c * count)
    for start in range(0, n, step):
        feats = F.normalize(tokens[start : start + step], dim=-1)
        index = nearest_centres(centres[start : start + step], count)  # (n, G, k)
        means = _neighbour_means(feats, index, degrees)
        stacked = torch.cat([means[min(r, g)] for r in degrees], dim=-1)  # (n, G, D*C)
        pooled = stacked.view(*stacked.shape[:-1], c, len(degrees)).mean(dim=-1)
        flat = (curvature[start : start + step] >= curvature_threshold)[..., None]
        out[start : start + step] = torch.where(flat, feats, pooled)
    return out
