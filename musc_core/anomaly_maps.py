"""From patch scores to pixel anomaly maps and sample scores (docs/method.md, *Anomaly maps*)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from musc_core.grouping import knn

IDW_NEIGHBOURS = 3
IDW_EPSILON = 1e-8
# Points per chunk of the IDW interpolation: bounds the (chunk, G) distance matrix.


def map_2d(patch_scores: torch.Tensor, image_size: int) -> torch.Tensor:
    """2D anomaly maps: patch grid upsampled bilinearly (align_corners=True).

    Args:
        patch_scores: (N, M) scores on a row-major √M×√M patch grid.
        image_size: S, output side in pixels.

    Returns:
        (N, S, S) float maps.
    """
    n, m = patch_scores.shape
    side = math.isqrt(m)
    if side * side != m:
        raise ValueError(f"{m} patch scores do not form a square grid")
    grid = patch_scores.reshape(n, 1, side, side)
    up = F.interpolate(grid, size=(image_size, image_size), mode="bilinear", align_corners=True)
    return up[:, 0]


def idw_point_scores(
    group_scores: torch.Tensor, centres: torch.Tensor, points: torch.Tensor
) -> torch.Tensor:
    """Inverse-distance-weighted scores of points from their 3 nearest group centres.

    Weights are ``1 / (squared distance + 1e-8)``, normalized to sum to 1.

    Args:
        group_scores: (G,) scores of the groups.
        centres: (G, 3) group centres.
        points: (P, 3) points to score.

    Returns:
        (P,) interpolated scores.
    """
    nearest = knn(points, centres, min(IDW_NEIGHBOURS, centres.shape[0]))
    weight = 1.0 / (nearest.sq_dist + IDW_EPSILON)
    weight = weight / weight.sum(dim=1, keepdim=True)
    return (weight * group_scores[nearest.index]).sum(dim=1)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of one float image, edge pixels replicated.

    The kernel has radius ``ceil(3σ)`` and is normalized to sum 1; the border is handled by
    replicating the edge pixels (as PIL's box-blur approximation does).

    Args:
        image: (H, W) float image.
        sigma: standard deviation in pixels; ``<= 0`` returns the image unchanged.

    Returns:
        (H, W) blurred image.
    """
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(image[None, None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[0, 0]


def map_3d(
    group_scores: torch.Tensor,
    centres: torch.Tensor,
    points: torch.Tensor,
    pixel_index: torch.Tensor,
    image_size: int,
    sigma: float,
) -> torch.Tensor:
    """3D anomaly map of one sample on the S×S image grid.

    Group scores are interpolated to every foreground point by inverse distance weighting from
    the 3 nearest centres, written to the points' pixels (0 on pixels without a point), and the
    map is blurred with a Gaussian of standard deviation ``sigma``. The reference divides the
    map by its maximum, blurs an 8-bit image with PIL (``GaussianBlur(radius=4)``, where the
    radius is the standard deviation) and multiplies back; in float that rescaling cancels out
    exactly (the blur is linear), so the float map is blurred directly, without 8-bit
    quantization.

    Args:
        group_scores: (G,) scores of the groups.
        centres: (G, 3) group centres.
        points: (P, 3) foreground points.
        pixel_index: (P,) long, flat pixel index ``y * S + x`` of each point.
        image_size: S, side of the map in pixels.
        sigma: blur standard deviation in pixels (``config.map_blur_sigma``); 0 turns it off.

    Returns:
        (S, S) float map.
    """
    flat = group_scores.new_zeros(image_size * image_size)
    if points.shape[0] and centres.shape[0]:
        flat[pixel_index.long()] = idw_point_scores(group_scores, centres, points)
    return gaussian_blur(flat.view(image_size, image_size), sigma)


def sample_scores(maps: torch.Tensor) -> torch.Tensor:
    """Sample anomaly score c_i = maximum of its map.

    Args:
        maps: (N, S, S) anomaly maps.

    Returns:
        (N,) scores.
    """
    return maps.reshape(maps.shape[0], -1).amax(dim=1)
