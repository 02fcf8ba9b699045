"""Organized point clouds: resizing, foreground, normalization and dataset cleaning.

Arrays in, arrays out; reading files is the caller's business. An organized point cloud is an
(H, W, 3) XYZ map in which a pixel without a point holds (0, 0, 0).

Dataset cleaning follows the authors' release:

- MVTec 3D-AD: the support plane is fitted by RANSAC to the points of a 10-pixel border and
  removed (when it fills the border behind the part, always, or never: ``support_plane``),
  the maps are zero-padded to a square, and only the largest DBSCAN cluster is kept.
- Eyecandies: the depth PNG is converted to metric depth and back-projected with the pose, the
  support plane is dropped by a height rule and the brightest DBSCAN cluster is kept.

Open3D (RANSAC) is imported only when a plane is fitted; DBSCAN is
:func:`musc_core.clustering.dbscan` (Open3D's labels, computed on a grid).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from musc_core.clustering import dbscan

EYECANDIES_FOCAL = 711.11
# Eyecandies categories whose support plane is not removed (reference behaviour).
EYECANDIES_KEEP_PLANE = frozenset({"gummybear", "licoricesandwich", "marshmallow"})

_MVTEC_BORDER = 10
_MVTEC_RANSAC = {"distance_threshold": 0.004, "ransac_n": 50, "num_iterations": 1000}
_MVTEC_PLANE_DISTANCE = 0.005
_MVTEC_DBSCAN = {"eps": 0.006, "min_points": 30}
_EYECANDIES_PLANE_MARGIN = 0.01
_EYECANDIES_DBSCAN = {"eps": 0.03, "min_points": 30}
_OPEN3D_SEED = 0


def resize_xyz_nearest(xyz: np.ndarray, size: int) -> np.ndarray:
    """Resize an XYZ map to size×size by nearest-neighbour sampling.

    Uses ``torch.nn.functional.interpolate(mode="nearest")`` as the reference does: output pixel
    (i, j) copies input pixel (floor(i · H / size), floor(j · W / size)). Values are copied
    exactly, so missing points stay (0, 0, 0).

    Args:
        xyz: (H, W, 3) float32 XYZ map.
        size: output side in pixels.

    Returns:
        (size, size, 3) float32 array.
    """
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) XYZ map, got shape {xyz.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(xyz, dtype=np.float32))
    resized = F.interpolate(tensor.permute(2, 0, 1)[None], size=(size, size), mode="nearest")
    return np.ascontiguousarray(resized[0].permute(1, 2, 0).numpy())


def foreground_mask(xyz: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Pixels holding a point: all three coordinates non-zero and finite.

    Args:
        xyz: (…, 3) XYZ map (numpy array or tensor).

    Returns:
        (…) bool mask of the same library as ``xyz``.
    """
    if isinstance(xyz, torch.Tensor):
        return torch.all((xyz != 0) & torch.isfinite(xyz), dim=-1)
    valid = (xyz != 0) & np.isfinite(xyz)
    return valid[..., 0] & valid[..., 1] & valid[..., 2]  # np.all over a 3-axis is slow


def normalize_unit_sphere(points: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Centre points on their centroid and scale the farthest one to distance 1.

    Args:
        points: (P, 3) coordinates (numpy array or tensor), P ≥ 1.

    Returns:
        (P, 3) normalized coordinates, same library and dtype. Coincident points (largest
        distance 0) are only centred.
    """
    if isinstance(points, torch.Tensor):
        centred = points - points.mean(dim=0, keepdim=True)
        radius = torch.linalg.vector_norm(centred, dim=1).max()
        return centred / torch.where(radius > 0, radius, torch.ones_like(radius))
    centred = points - points.mean(axis=0, keepdims=True)
    radius = np.linalg.norm(centred, axis=1).max()
    return centred / (radius if radius > 0 else 1)


def organized_to_points(xyz: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground points of an XYZ map in row-major pixel order.

    Args:
        xyz: (H, W, 3) XYZ map (numpy array or tensor; a tensor's device is kept).

    Returns:
        ``(points, pixel_index)``: (P, 3) float32 coordinates and (P,) long flat pixel index
        y · W + x of each point, ascending.
    """
    tensor = torch.as_tensor(xyz)
    if tensor.ndim != 3 or tensor.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) XYZ map, got shape {tuple(tensor.shape)}")
    flat = tensor.reshape(-1, 3)
    pixel_index = foreground_mask(flat).nonzero().squeeze(1)
    return flat[pixel_index].float(), pixel_index


def _open3d():
    import open3d as o3d  # heavy, only needed for the plane fit

    return o3d


def _check_planar(name: str, array: np.ndarray | None, shape: tuple[int, int]) -> None:
    if array is not None and array.shape[:2] != shape:
        raise ValueError(f"{name} is {array.shape[:2]} but the XYZ map is {shape}")


def _border_points(xyz: np.ndarray, width: int) -> np.ndarray:
    """Valid points of the top, bottom, left and right ``width``-pixel bands (corners twice)."""
    bands = [xyz[:width], xyz[-width:], xyz[:, :width], xyz[:, -width:]]
    points = np.concatenate([band.reshape(-1, 3) for band in bands])
    return points[foreground_mask(points)]


def _pad_square(array: np.ndarray, side: int) -> np.ndarray:
    """Zero-pad the two leading axes to side×side, centred (extra row/column at the end)."""
    height, width = array.shape[:2]
    top, left = (side - height) // 2, (side - width) // 2
    pad = [(top, side - height - top), (left, side - width - left)]
    return np.pad(array, pad + [(0, 0)] * (array.ndim - 2), mode="constant")


def mvtec3d_has_support_plane(xyz: np.ndarray) -> bool:
    """Whether the border of an MVTec 3D-AD XYZ map holds enough points for a plane fit.

    The plane fills the border of a raw scan; the widely used MVTec 3D-AD preprocessing (the
    authors' script, run in place) zeroes it, which leaves the border empty. The fit needs the
    50 valid points of one RANSAC hypothesis in the 10-pixel border bands. A part that reaches
    the border also puts points there: :func:`is_support_plane` tells the two apart.

    Args:
        xyz: (H, W, 3) XYZ map, zeros = no point.

    Returns:
        True when a support plane can be fitted to the border.
    """
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) XYZ map, got shape {xyz.shape}")
    return _border_points(xyz, _MVTEC_BORDER).shape[0] >= _MVTEC_RANSAC["ransac_n"]


def fit_support_plane(xyz: np.ndarray) -> np.ndarray:
    """RANSAC plane of the border points of an MVTec 3D-AD XYZ map (seeded, reproducible).

    Open3D ``segment_plane`` (distance 0.004, 50 points per hypothesis, 1000 iterations) with
    Open3D's random generator seeded with 0, over the valid points of the 10-pixel border.

    Args:
        xyz: (H, W, 3) XYZ map, zeros = no point.

    Returns:
        (4,) float64 ``(a, b, c, d)`` of the plane ``a·x + b·y + c·z + d = 0``, unit normal.

    Raises:
        ValueError: fewer than 50 valid border points.
    """
    border = _border_points(xyz, _MVTEC_BORDER)
    if border.shape[0] < _MVTEC_RANSAC["ransac_n"]:
        raise ValueError(
            f"support-plane fit needs {_MVTEC_RANSAC['ransac_n']} valid points in the "
            f"{_MVTEC_BORDER}-pixel border of the XYZ map, found {border.shape[0]}"
        )
    o3d = _open3d()
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(border.astype(np.float64)))
    o3d.utility.random.seed(_OPEN3D_SEED)
    with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
        plane, _ = cloud.segment_plane(**_MVTEC_RANSAC)
    return np.asarray(plane, dtype=np.float64).reshape(4)


def _plane_distance(xyz: np.ndarray, plane: np.ndarray) -> np.ndarray:
    """(H, W) signed distance of every pixel's point to the plane (empty pixels included)."""
    return (xyz.reshape(-1, 3).astype(np.float64) @ plane[:3] + plane[3]).reshape(xyz.shape[:2])


def _perimeter_coverage(on_plane: np.ndarray, width: int) -> float:
    """Fraction of the border's positions whose ``width``-pixel segment holds a plane point.

    Walking the four sides (each column of the top and bottom bands, each row of the left and
    right bands), a position counts when any of its ``width`` band pixels is on the plane, so
    unmeasured strips along the image edge (narrower than the band) do not matter.
    """
    sides = (
        on_plane[:width].any(axis=0), on_plane[-width:].any(axis=0),
        on_plane[:, :width].any(axis=1), on_plane[:, -width:].any(axis=1),
    )
    return float(sum(side.sum() for side in sides) / sum(side.size for side in sides))


def is_support_plane(xyz: np.ndarray, plane: np.ndarray) -> bool:
    """Whether a plane fitted to the border is a support plane, as in a raw scan.

    In a raw scan the support plane runs all around the border and the part stands in front of
    it, as the sensor (the origin of the XYZ frame) sees it. A pre-cleaned part that reaches
    the border puts only its own points there, where it crosses, and the fit finds one of its
    faces (its flat top, say). Both must hold for a support plane:

    - the plane's points (within 0.005) reach at least half of the border's positions (each
      column of the top and bottom 10-pixel bands, each row of the left and right ones);
    - at least half of the valid points off the plane lie on the sensor's side of it (the rest
      of a part whose top face was fitted lies behind that face).

    A plane that holds every point, or passes through the sensor, is not a support plane.

    Args:
        xyz: (H, W, 3) XYZ map in the sensor's frame, zeros = no point.
        plane: (4,) plane from :func:`fit_support_plane`.

    Returns:
        True when the plane is to be removed.
    """
    valid = foreground_mask(xyz)
    distance = _plane_distance(xyz, plane)
    on_plane = valid & (np.abs(distance) < _MVTEC_PLANE_DISTANCE)
    if 2 * _perimeter_coverage(on_plane, _MVTEC_BORDER) < 1:
        return False
    off = distance[valid & ~on_plane]
    sensor_side = np.sign(plane[3])
    if off.size == 0 or sensor_side == 0:
        return False
    return bool(2 * np.count_nonzero(np.sign(off) == sensor_side) >= off.size)


class MvtecCleaning(NamedTuple):
    """An MVTec 3D-AD scan after :func:`mvtec3d_cleaning`.

    Attributes:
        xyz: (L, L, 3) float32 cleaned XYZ map, padded to a square.
        rgb: (L, L, …) image as cleaned (same dtype as given), or None.
        mask: (L, L) padded ground-truth mask, or None.
        plane_removed: whether the support plane was removed.
        points: valid points as read, after the plane removal, and kept (largest cluster).
    """

    xyz: np.ndarray
    rgb: np.ndarray | None
    mask: np.ndarray | None
    plane_removed: bool
    points: tuple[int, int, int]


def mvtec3d_cleaning(
    xyz: np.ndarray,
    rgb: np.ndarray | None,
    mask: np.ndarray | None,
    support_plane: str = "auto",
) -> MvtecCleaning:
    """MVTec 3D-AD cleaning: support-plane removal, square padding, largest cluster.

    1. Support plane (``support_plane``): ``"remove"`` fits a RANSAC plane to the border
       (:func:`fit_support_plane`) and zeroes every pixel within 0.005 of it in the XYZ map and
       the RGB image (the reference tests every pixel, including empty ones); ``"keep"`` skips
       the step; ``"auto"`` removes the plane only when the border holds enough points for the
       fit (:func:`mvtec3d_has_support_plane`) and the fitted plane is a support plane: it
       runs around the border and the part lies in front of it (:func:`is_support_plane`).
    2. Zero padding of map, image and mask to a square whose side is the larger of height and
       width, each rounded up to a multiple of 100; the content is centred as in the reference
       release (padding split evenly, the odd pixel at the bottom/right).
    3. DBSCAN (eps 0.006, 30 points; Open3D's labels, :func:`musc_core.clustering.dbscan`) over
       the remaining points; only the largest cluster is kept (ties: the lower label), other
       points are zeroed in the map and the image. Noise (label −1) is never kept: the
       reference would keep it if it outnumbered every cluster.

    Args:
        xyz: (H, W, 3) XYZ map, zeros = no point.
        rgb: (H, W, 3) image of the same size, or None.
        mask: (H, W) ground-truth mask of the same size, or None.
        support_plane: ``"auto"``, ``"remove"`` or ``"keep"``.

    Returns:
        The cleaned, padded arrays and what the steps kept.

    Raises:
        ValueError: inputs of different sizes, an unknown mode, or ``"remove"`` with fewer
            than 50 valid border points.
    """
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) XYZ map, got shape {xyz.shape}")
    if support_plane not in ("auto", "remove", "keep"):
        raise ValueError(f"support_plane must be 'auto', 'remove' or 'keep', got {support_plane!r}")
    shape = xyz.shape[:2]
    _check_planar("RGB image", rgb, shape)
    _check_planar("mask", mask, shape)
    xyz = np.array(xyz, dtype=np.float32)
    rgb = None if rgb is None else np.array(rgb)
    read = int(foreground_mask(xyz).sum())

    removed = False
    if support_plane == "remove" or (
        support_plane == "auto" and mvtec3d_has_support_plane(xyz)
    ):
        plane = fit_support_plane(xyz)
        if support_plane == "remove" or is_support_plane(xyz, plane):
            on_plane = np.abs(_plane_distance(xyz, plane)) < _MVTEC_PLANE_DISTANCE
            xyz[on_plane] = 0
            if rgb is not None:
                rgb[on_plane] = 0
            removed = True
    after_plane = int(foreground_mask(xyz).sum())

    side = max(math.ceil(shape[0] / 100) * 100, math.ceil(shape[1] / 100) * 100)
    xyz = _pad_square(xyz, side)
    rgb = None if rgb is None else _pad_square(rgb, side)
    mask = None if mask is None else _pad_square(np.asarray(mask), side)

    flat = xyz.reshape(-1, 3)
    valid = np.flatnonzero(foreground_mask(flat))
    labels = dbscan(flat[valid], **_MVTEC_DBSCAN)
    clustered = labels >= 0
    keep = np.zeros(valid.shape[0], dtype=bool)
    if clustered.any():
        sizes = np.bincount(labels[clustered])
        keep = labels == int(np.argmax(sizes))
    dropped = valid[~keep]
    flat[dropped] = 0
    if rgb is not None:
        rgb.reshape(side * side, -1)[dropped] = 0
    return MvtecCleaning(xyz, rgb, mask, removed, (read, after_plane, int(keep.sum())))


def clean_mvtec3d(
    xyz: np.ndarray,
    rgb: np.ndarray | None,
    mask: np.ndarray | None,
    remove_plane: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The authors' MVTec 3D-AD cleaning: :func:`mvtec3d_cleaning` with the plane removed.

    Args:
        xyz: (H, W, 3) XYZ map, zeros = no point.
        rgb: (H, W, 3) image of the same size, or None.
        mask: (H, W) ground-truth mask of the same size, or None.
        remove_plane: fit and remove the support plane (``"remove"``); False skips the step
            (``"keep"``, data whose plane was already removed).

    Returns:
        ``(xyz, rgb, mask)`` cleaned and padded to (L, L).

    Raises:
        ValueError: inputs of different sizes, or fewer than 50 valid border points.
    """
    cleaned = mvtec3d_cleaning(xyz, rgb, mask, "remove" if remove_plane else "keep")
    return cleaned.xyz, cleaned.rgb, cleaned.mask


def depth_from_png(depth_u16: np.ndarray, depth_min: float, depth_max: float) -> np.ndarray:
    """Metric depth of an Eyecandies 16-bit depth PNG.

    ``depth = value / 65535 · (max − min) + min``, evaluated in float32 in this order as in
    the Eyecandies tools (so 0 ↦ min and 65535 ↦ max).

    Args:
        depth_u16: (H, W) uint16 depth PNG values.
        depth_min: depth of value 0 (``info_depth.yaml`` normalization min), metres.
        depth_max: depth of value 65535 (normalization max), metres.

    Returns:
        (H, W) float32 depth in metres.
    """
    return depth_u16.astype(np.float32) / 65535.0 * (depth_max - depth_min) + depth_min


def backproject_depth(
    depth_m: np.ndarray, pose: np.ndarray, focal: float = EYECANDIES_FOCAL
) -> np.ndarray:
    """Back-project a metric depth map into an XYZ map (Eyecandies).

    A pixel (u = column, v = row) at depth d is the camera-frame point
    X = (u − W/2) · d / f, Y = (v − H/2) · d / f, Z = d (principal point at the image centre,
    pixel corners at integer coordinates), mapped by ``inverse(pose)``:
    ``xyz = (pose⁻¹ · [X, Y, Z, 1])[:3]``. This is the reference's
    ``d · inverse(K₄ · pose) · [u, v, 1, 1/d]`` written out, so the matrix of ``pose.txt`` is
    used exactly as the reference uses it (its frame is what the height rule of
    :func:`clean_eyecandies` was tuned on).

    Args:
        depth_m: (H, W) metric depth; pixels ≤ 0 or non-finite have no point.
        pose: (4, 4) (or (3, 4)) matrix from ``pose.txt``.
        focal: focal length in pixels (711.11 for Eyecandies).

    Returns:
        (H, W, 3) float64 XYZ map (float64 like the reference until cleaning), zeros where the
        depth is invalid.
    """
    if depth_m.ndim != 2:
        raise ValueError(f"expected an (H, W) depth map, got shape {depth_m.shape}")
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape == (3, 4):
        pose = np.vstack([pose, [0.0, 0.0, 0.0, 1.0]])
    if pose.shape != (4, 4):
        raise ValueError(f"expected a 4x4 pose, got shape {pose.shape}")
    height, width = depth_m.shape
    depth = depth_m.astype(np.float64)
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    camera = np.stack(
        [(cols - width / 2) * depth / focal, (rows - height / 2) * depth / focal, depth], axis=-1
    )
    inverse = np.linalg.inv(pose)
    xyz = camera @ inverse[:3, :3].T + inverse[:3, 3]
    xyz[~(np.isfinite(depth) & (depth > 0))] = 0
    return xyz


def clean_eyecandies(
    xyz: np.ndarray, rgb: np.ndarray, category: str
) -> tuple[np.ndarray, np.ndarray]:
    """Eyecandies cleaning: height-rule plane removal and the brightest DBSCAN cluster.

    1. Unless the category is GummyBear, LicoriceSandwich or Marshmallow (case-insensitive),
       the y coordinates of the valid points are min-max normalized and every point with
       normalized y ≥ 1 − 0.01 (the support plane) is zeroed.
    2. Open3D DBSCAN (eps 0.03, 30 points) over the remaining points; the cluster whose
       brightest RGB value (any channel) is largest is kept (ties: the lower label), every
       other point, noise included, is zeroed. The reference loops over ``labels[1:]``, which
       skips cluster 0 whenever there is no noise; every cluster is considered here.

    The RGB image is only read (the reference leaves it unchanged).

    Args:
        xyz: (H, W, 3) XYZ map from :func:`backproject_depth`.
        rgb: (H, W, 3) (or (H, W)) image of the same size.
        category: Eyecandies category name, e.g. ``"CandyCane"``.

    Returns:
        ``(xyz, rgb)``: the cleaned map (a copy, same dtype) and the image.
    """
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) XYZ map, got shape {xyz.shape}")
    _check_planar("RGB image", rgb, xyz.shape[:2])
    xyz = np.array(xyz)
    flat = xyz.reshape(-1, 3)
    valid = np.flatnonzero(foreground_mask(flat))
    if category.lower() not in EYECANDIES_KEEP_PLANE and valid.size:
        height = flat[valid, 1]
        low, high = height.min(), height.max()
        if high > low:
            normalized = (height - low) / (high - low)
            plane = normalized >= normalized.max() - _EYECANDIES_PLANE_MARGIN
            flat[valid[plane]] = 0
            valid = valid[~plane]
    labels = dbscan(flat[valid], **_EYECANDIES_DBSCAN)
    keep = np.zeros(valid.shape[0], dtype=bool)
    clustered = labels >= 0
    if clustered.any():
        brightness = rgb.reshape(flat.shape[0], -1)[valid].max(axis=1).astype(np.float64)
        brightest = np.full(int(labels.max()) + 1, -np.inf)
        np.maximum.at(brightest, labels[clustered], brightness[clustered])
        keep = labels == int(np.argmax(brightest))
    flat[valid[~keep]] = 0
    return xyz, rgb
