"""Exact DBSCAN of 3D points on a grid: the cluster step of the dataset cleaning.

The cleaning keeps the largest DBSCAN cluster of a scan (eps 6 mm for MVTec 3D-AD). A KD-tree
DBSCAN (Open3D's ``cluster_dbscan``) lists every point's neighbours, a cost of points ×
neighbours: at the pitch of real scans (0.1–0.2 mm) a 6 mm ball holds thousands of points, and
one 200k-point scan takes minutes. :func:`dbscan` returns the same labels — the same clusters,
numbered the same way, the same border points in the same cluster — from a grid of cubes of
side eps / (2√3), on which most decisions need no distance at all:

- Two points in the same cube or in touching cubes (the 27-cube block around a cube) are
  always closer than eps. Every point of a cube whose block holds at least ``min_points``
  points is therefore a core point; only points of sparse blocks have their neighbours counted
  (with a KD-tree, and an exact check of the distances close to eps).
- Touching cubes that hold core points belong to one cluster. Cubes up to four apart are
  joined only when two of their core points are closer than eps, and that is checked only for
  cubes whose clusters are not joined already.
- Clusters are numbered in the order of their lowest-index core point (the order in which a
  scan over the points in index order meets them, as Open3D numbers them); a point that is
  not a core point takes the lowest-numbered cluster with a core point closer than eps, else
  it is noise (−1).

Neighbourhoods are Open3D's: a point is its own neighbour, and ``q`` is a neighbour of ``p``
when ``(px − qx)² + (py − qy)² + (pz − qz)² < eps²`` in float64 (strictly less).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

# Cube side in units of eps: touching cubes are closer than 2·side·√3 = eps (with a margin that
# keeps rounding far from eps).
_SIDE = (1 - 1e-9) / (2 * math.sqrt(3))
# Farthest cube offset whose points can be closer than eps: (|d| − 1)·side < eps.
_REACH = 4
# Relative radius margin of the KD-tree counts; counts between the two radii are checked exactly.
_RADIUS_MARGIN = 1e-9
# Largest linear cube key, and cube number along one axis (the grid falls back to Open3D
# beyond them).
_MAX_KEY = 1 << 62
_MAX_CELLS = float(1 << 52)

_TOUCHING = [d for d in itertools.product((-1, 0, 1), repeat=3) if d != (0, 0, 0)]
# Offsets of cubes further apart than touching whose points can still be closer than eps, one
# of each ± pair.
_FAR = [
    d
    for d in itertools.product(range(-_REACH, _REACH + 1), repeat=3)
    if max(map(abs, d)) > 1
    and sum(max(abs(c) - 1, 0) ** 2 for c in d) * _SIDE**2 < 1
    and d > (0, 0, 0)
]


def _compressed_axis(cells: np.ndarray) -> tuple[np.ndarray, int]:
    """Cube coordinates of one axis with long empty stretches shortened to ``_REACH + 1``.

    Offsets of up to ``_REACH`` cubes keep their value, larger ones stay larger than
    ``_REACH``, so neighbourhoods are unchanged while the range stays ≤ 5 × the number of
    distinct values.

    Returns:
        ``(coordinates, size)``: coordinates ≥ ``_REACH`` and the size of the axis with a
        margin of ``_REACH`` on both sides.
    """
    values, inverse = np.unique(cells, return_inverse=True)
    steps = np.minimum(np.diff(values), _REACH + 1)
    ranks = np.concatenate([[0], np.cumsum(steps)])
    return ranks[inverse.reshape(-1)] + _REACH, int(ranks[-1]) + 2 * _REACH + 1


def _open3d_dbscan(points: np.ndarray, eps: float, min_points: int) -> np.ndarray:
    """Open3D's DBSCAN (the reference; used for grids too large for a linear key)."""
    import open3d as o3d

    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
        labels = cloud.cluster_dbscan(eps=eps, min_points=min_points, print_progress=False)
    return np.asarray(labels, dtype=np.int64)


class _Grid:
    """The points sorted into cubes.

    Attributes:
        order: (n,) point indices sorted by cube.
        cell: (n,) cube index of each point.
        keys: (C,) sorted linear keys of the occupied cubes.
        starts, counts: (C,) first position in ``order`` and number of points of each cube.
        strides: key step of one cube along x, y, z.
        touching: (C,) :meth:`neighbour` of each touching offset, in ``_TOUCHING`` order.
    """

    def __init__(self, coords: np.ndarray, strides: tuple[int, int, int]) -> None:
        linear = coords @ np.asarray(strides, dtype=np.int64)
        self.order = np.argsort(linear, kind="stable")
        self.keys, self.starts, self.counts = np.unique(
            linear[self.order], return_index=True, return_counts=True
        )
        self.cell = np.empty(coords.shape[0], dtype=np.int64)
        self.cell[self.order] = np.repeat(np.arange(self.keys.size), self.counts)
        self.strides = strides
        self.touching = [self.neighbour(offset) for offset in _TOUCHING]

    def neighbour(self, offset: tuple[int, int, int]) -> np.ndarray:
        """(C,) index of the cube at ``offset`` from each cube, −1 where it is empty."""
        target = self.keys + int(np.dot(offset, self.strides))
        found = np.searchsorted(self.keys, target).clip(max=self.keys.size - 1)
        return np.where(self.keys[found] == target, found, -1)


def _neighbour_counts(
    tree: cKDTree, points: np.ndarray, queries: np.ndarray, eps: float
) -> np.ndarray:
    """Exact neighbour counts (themselves included) of ``points[queries]``."""
    low = tree.query_ball_point(points[queries], eps * (1 - _RADIUS_MARGIN), return_length=True)
    high = tree.query_ball_point(points[queries], eps * (1 + _RADIUS_MARGIN), return_length=True)
    counts = np.asarray(low, dtype=np.int64)
    for row in np.flatnonzero(np.asarray(high) != counts):
        candidates = tree.query_ball_point(points[queries[row]], eps * (1 + _RADIUS_MARGIN))
        counts[row] = int(_close(points[queries[row]][None], points[candidates], eps).sum())
    return counts


def _close(a: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """(|a|, |b|) whether each pair is closer than eps (Open3D's float64 arithmetic)."""
    diff = a[:, None, :] - b[None, :, :]
    return diff[..., 0] * diff[..., 0] + diff[..., 1] * diff[..., 1] + diff[..., 2] * diff[
        ..., 2
    ] < eps * eps


class _Components:
    """Union-find over cluster ids (path halving)."""

    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        parent = self.parent
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _core_points(grid: _Grid, tree: cKDTree, points: np.ndarray, eps: float, min_points: int):
    """(n,) bool core points: dense 27-cube blocks without distances, the rest counted."""
    block = grid.counts.copy()
    for found in grid.touching:
        block += np.where(found >= 0, grid.counts[found], 0)
    core = block[grid.cell] >= min_points
    uncertain = np.flatnonzero(~core)
    if uncertain.size:
        core[uncertain] = _neighbour_counts(tree, points, uncertain, eps) >= min_points
    return core


def _cluster_cells(grid: _Grid, points: np.ndarray, core: np.ndarray, eps: float) -> np.ndarray:
    """(C,) cluster id of each cube holding core points (−1 for the others)."""
    sorted_core = core[grid.order]
    core_cells = np.zeros(grid.keys.size, dtype=bool)
    core_cells[grid.cell[core]] = True
    rows, cols = [], []
    for found in grid.touching:
        linked = core_cells & (found >= 0)
        linked[linked] = core_cells[found[linked]]
        rows.append(np.flatnonzero(linked))
        cols.append(found[linked])
    size = grid.keys.size
    rows_all, cols_all = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(rows_all.size, dtype=np.int8), (rows_all, cols_all)), (size, size))
    count, component = connected_components(graph, directed=False)
    if len(np.unique(component[core_cells])) == 1:
        return np.where(core_cells, component, -1)
    low, high = _core_bounds(grid, points, sorted_core)
    union = _Components(count)
    for offset in _FAR:
        found = grid.neighbour(offset)
        pairs = np.flatnonzero(core_cells & (found >= 0))
        pairs = pairs[core_cells[found[pairs]] & (component[pairs] != component[found[pairs]])]
        other = found[pairs]
        gap = np.maximum(np.maximum(low[other] - high[pairs], low[pairs] - high[other]), 0)
        pairs = pairs[(gap * gap).sum(axis=1) < eps * eps * (1 + _RADIUS_MARGIN)]
        for a in pairs.tolist():
            b = int(found[a])
            ca, cb = union.find(int(component[a])), union.find(int(component[b]))
            if ca == cb:
                continue
            if _close(_cell_core(grid, points, sorted_core, a),
                      _cell_core(grid, points, sorted_core, b), eps).any():
                union.union(ca, cb)
    roots = np.asarray([union.find(int(c)) for c in component], dtype=np.int64)
    return np.where(core_cells, roots, -1)


def _core_bounds(
    grid: _Grid, points: np.ndarray, sorted_core: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(C, 3) lower and upper corners of each cube's core points (±inf without any)."""
    ordered = points[grid.order]
    low = np.where(sorted_core[:, None], ordered, np.inf)
    high = np.where(sorted_core[:, None], ordered, -np.inf)
    return np.minimum.reduceat(low, grid.starts), np.maximum.reduceat(high, grid.starts)


def _cell_core(grid: _Grid, points: np.ndarray, sorted_core: np.ndarray, cell: int) -> np.ndarray:
    """(k, 3) core points of one cube."""
    span = slice(int(grid.starts[cell]), int(grid.starts[cell] + grid.counts[cell]))
    return points[grid.order[span][sorted_core[span]]]


def dbscan(points: np.ndarray, eps: float, min_points: int) -> np.ndarray:
    """DBSCAN labels, identical to Open3D's ``PointCloud.cluster_dbscan``.

    Args:
        points: (n, 3) finite coordinates (any float dtype; computed in float64).
        eps: neighbourhood radius, > 0 (same unit as the points).
        min_points: neighbours (the point itself included) that make a core point, ≥ 1.

    Returns:
        (n,) int64 labels: clusters 0, 1, … in the order of their lowest-index core point,
        −1 for noise.

    Raises:
        ValueError: points not of shape (n, 3) or not finite, eps ≤ 0 or min_points < 1.
    """
    points = np.ascontiguousarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"expected (n, 3) points, got shape {points.shape}")
    if not eps > 0 or min_points < 1:
        raise ValueError(f"eps must be > 0 and min_points ≥ 1, got {eps} and {min_points}")
    if not np.isfinite(points).all():
        raise ValueError("points must be finite")
    if points.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    side = eps * _SIDE
    spans = (points - points.min(axis=0)) / side
    if not spans.max() < _MAX_CELLS:  # cube numbers would not fit int64
        return _open3d_dbscan(points, eps, min_points)
    raw = np.floor(spans).astype(np.int64)
    axes = [_compressed_axis(raw[:, axis]) for axis in range(3)]
    sizes = [size for _, size in axes]
    if math.prod(sizes) >= _MAX_KEY:
        return _open3d_dbscan(points, eps, min_points)
    coords = np.stack([coordinate for coordinate, _ in axes], axis=1)
    grid = _Grid(coords, (sizes[1] * sizes[2], sizes[2], 1))
    tree = cKDTree(points)
    core = _core_points(grid, tree, points, eps, min_points)
    labels = np.full(points.shape[0], -1, dtype=np.int64)
    if not core.any():
        return labels
    cluster = _cluster_cells(grid, points, core, eps)[grid.cell]
    core_index = np.flatnonzero(core)
    roots, first = np.unique(cluster[core_index], return_index=True)
    number = np.empty(roots.size, dtype=np.int64)
    number[np.argsort(core_index[first], kind="stable")] = np.arange(roots.size)
    labels[core_index] = number[np.searchsorted(roots, cluster[core_index])]
    _label_border(tree, points, core, labels, eps)
    return labels


def _label_border(
    tree: cKDTree, points: np.ndarray, core: np.ndarray, labels: np.ndarray, eps: float
) -> None:
    """Give each non-core point the lowest label of a core point closer than eps, in place."""
    others = np.flatnonzero(~core)
    if not others.size:
        return
    found = tree.query_ball_point(points[others], eps * (1 + _RADIUS_MARGIN))
    lengths = np.fromiter((len(f) for f in found), dtype=np.int64, count=others.size)
    members = np.fromiter(itertools.chain.from_iterable(found), dtype=np.int64,
                          count=int(lengths.sum()))
    owner = np.repeat(others, lengths)
    diff = points[owner] - points[members]
    near = diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1] + diff[:, 2] * diff[:, 2] < eps * eps
    near &= core[members]
    if not near.any():
        return
    best = np.full(points.shape[0], np.iinfo(np.int64).max)
    np.minimum.at(best, owner[near], labels[members[near]])
    claimed = others[best[others] != np.iinfo(np.int64).max]
    labels[claimed] = best[claimed]
