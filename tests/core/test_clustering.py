"""The grid DBSCAN against a literal loop over the definition and against Open3D itself."""

import numpy as np
import pytest

from musc_core import clustering
from musc_core.clustering import dbscan


def literal_dbscan(points, eps, min_points):
    """Open3D's cluster_dbscan written out: scan points in index order, expand each new core."""
    points = np.asarray(points, dtype=np.float64)
    diff = points[:, None, :] - points[None, :, :]
    sq = diff[..., 0] * diff[..., 0] + diff[..., 1] * diff[..., 1] + diff[..., 2] * diff[..., 2]
    neighbours = [np.flatnonzero(row < eps * eps) for row in sq]
    labels = np.full(len(points), -2)
    cluster = 0
    for start in range(len(points)):
        if labels[start] != -2:
            continue
        if len(neighbours[start]) < min_points:
            labels[start] = -1
            continue
        labels[start] = cluster
        todo = list(neighbours[start])
        while todo:
            point = todo.pop()
            if labels[point] == -1:
                labels[point] = cluster
            if labels[point] != -2:
                continue
            labels[point] = cluster
            if len(neighbours[point]) >= min_points:
                todo.extend(neighbours[point])
        cluster += 1
    return labels


def open3d_dbscan(points, eps, min_points):
    o3d = pytest.importorskip("open3d")
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(points, np.float64)))
    return np.asarray(cloud.cluster_dbscan(eps=eps, min_points=min_points), dtype=np.int64)


def blobs(rng, n, k, spread, noise):
    centres = rng.uniform(0, 1, (k, 3))
    points = centres[rng.integers(0, k, n)] + rng.normal(0, spread, (n, 3))
    points = np.concatenate([points, rng.uniform(-0.2, 1.2, (noise, 3))])
    return points[rng.permutation(len(points))]


@pytest.mark.parametrize("seed", range(12))
def test_random_blobs_with_noise_match_the_definition_and_open3d(seed):
    rng = np.random.default_rng(seed)
    points = blobs(rng, int(rng.integers(100, 700)), int(rng.integers(1, 6)),
                   float(rng.uniform(0.01, 0.08)), int(rng.integers(0, 150)))
    eps, min_points = float(rng.uniform(0.02, 0.15)), int(rng.integers(2, 30))
    labels = dbscan(points, eps, min_points)
    assert np.array_equal(labels, literal_dbscan(points, eps, min_points))
    assert np.array_equal(labels, open3d_dbscan(points, eps, min_points))


def test_thin_bridge_joins_two_clusters_only_while_its_points_are_close():
    rng = np.random.default_rng(3)
    left = rng.normal((0, 0, 0), 0.02, (300, 3))
    right = rng.normal((1, 0, 0), 0.02, (300, 3))
    for step, expected in ((0.04, 1), (0.06, 2)):
        bridge = np.stack([np.arange(0.05, 0.95, step), np.zeros_like(np.arange(0.05, 0.95, step)),
                           np.zeros_like(np.arange(0.05, 0.95, step))], axis=1)
        points = np.concatenate([left, bridge, right])
        # eps 0.05, min_points 3: a bridge point with both bridge neighbours is a core point
        labels = dbscan(points, 0.05, 3)
        assert labels.max() + 1 == expected
        assert np.array_equal(labels, literal_dbscan(points, 0.05, 3))
        assert np.array_equal(labels, open3d_dbscan(points, 0.05, 3))


def test_a_border_point_between_two_clusters_joins_the_lower_label():
    # Two lines of points 0.2 apart; the point in the gap is within eps of one end of each
    # (3 neighbours with itself: not a core point), so it is a border point of both.
    first = np.c_[np.arange(-50, 1) * 0.01, np.zeros((51, 2))]
    second = np.c_[np.arange(20, 71) * 0.01, np.zeros((51, 2))]
    middle = np.array([[0.1, 0, 0]])
    for points, owner in ((np.concatenate([middle, first, second]), first),
                          (np.concatenate([second, middle, first]), second)):
        labels = dbscan(points, 0.105, 5)
        assert np.array_equal(labels, literal_dbscan(points, 0.105, 5))
        assert np.array_equal(labels, open3d_dbscan(points, 0.105, 5))
        middle_label = labels[np.flatnonzero((points == middle).all(axis=1))[0]]
        owner_label = labels[np.flatnonzero((points == owner[0]).all(axis=1))[0]]
        assert labels.max() == 1 and middle_label == 0 == owner_label  # the first one met


def test_equal_clusters_are_numbered_by_their_lowest_index_core_point():
    grid = np.stack(np.meshgrid(*[np.arange(4) * 0.01] * 3, indexing="ij"), -1).reshape(-1, 3)
    a, b = grid, grid + 1.0
    points = np.concatenate([b[:5], a, b[5:]])  # b's first point comes first
    labels = dbscan(points, 0.015, 4)
    assert np.bincount(labels).tolist() == [64, 64]
    assert labels[0] == 0 and labels[5] == 1
    assert np.array_equal(labels, open3d_dbscan(points, 0.015, 4))


def test_distances_of_exactly_eps_are_not_neighbours():
    grid = np.stack(np.meshgrid(np.arange(12), np.arange(12), np.arange(2), indexing="ij"), -1)
    points = grid.reshape(-1, 3).astype(np.float64)
    assert (dbscan(points, 1.0, 2) == -1).all()  # every neighbour exactly 1.0 away
    for eps, min_points in ((1.5, 5), (2.0, 12), (np.nextafter(1.0, 2), 6)):
        labels = dbscan(points, eps, min_points)
        assert np.array_equal(labels, literal_dbscan(points, eps, min_points))
        assert np.array_equal(labels, open3d_dbscan(points, eps, min_points))


def test_surfaces_a_few_cells_apart_are_joined_only_by_a_close_pair():
    # Two dense sheets whose gap spans several grid cells: only the far-cell check can join
    # them, and only where two points are closer than eps.
    rng = np.random.default_rng(5)
    sheet = np.stack(np.meshgrid(np.arange(25), np.arange(25), indexing="ij"), -1)
    sheet = sheet.reshape(-1, 2) * 0.0004
    for gap, expected in ((0.0055, 1), (0.0062, 2)):
        lower = np.c_[sheet, np.zeros(len(sheet))]
        upper = np.c_[sheet, np.full(len(sheet), gap)]
        points = np.concatenate([lower, upper]) + rng.normal(0, 1e-6, (2 * len(sheet), 3))
        labels = dbscan(points, 0.006, 30)
        assert labels.max() + 1 == expected
        assert np.array_equal(labels, open3d_dbscan(points, 0.006, 30))


def test_a_scan_at_real_pitch_matches_open3d():
    # 0.3 mm pitch height field: a dome on a plate, a separate fragment and flying pixels.
    rng = np.random.default_rng(2)
    v, u = np.mgrid[0:90, 0:90] * 0.0003
    height = 0.004 * np.exp(-((u - 0.013) ** 2 + (v - 0.013) ** 2) / 1e-4)
    points = np.stack([u, v, 0.5 - height], -1).reshape(-1, 3)
    fragment = rng.normal((0.05, 0.05, 0.49), 0.001, (60, 3))
    flying = rng.uniform((0, 0, 0.45), (0.03, 0.03, 0.5), (40, 3))
    points = np.concatenate([points, fragment, flying])
    labels = dbscan(points, 0.006, 30)
    assert labels.max() + 1 == 2
    assert np.array_equal(labels, open3d_dbscan(points, 0.006, 30))


def test_grids_too_large_for_a_linear_key_use_open3d(monkeypatch):
    rng = np.random.default_rng(1)
    points = blobs(rng, 300, 3, 0.03, 40)
    expected = dbscan(points, 0.05, 5)
    monkeypatch.setattr(clustering, "_MAX_KEY", 1)
    assert np.array_equal(dbscan(points, 0.05, 5), expected)


def test_coordinates_far_beyond_the_grid_use_open3d():
    rng = np.random.default_rng(4)
    points = blobs(rng, 200, 2, 0.02, 10)
    points[0] = (1e30, 0, 0)  # far outside any grid of eps-sized cubes
    labels = dbscan(points, 0.05, 5)
    assert labels[0] == -1
    assert np.array_equal(labels, open3d_dbscan(points, 0.05, 5))


def test_edge_cases_and_bad_input():
    assert dbscan(np.zeros((0, 3)), 0.1, 5).shape == (0,)
    assert dbscan(np.zeros((1, 3)), 0.1, 1).tolist() == [0]
    assert dbscan(np.zeros((1, 3)), 0.1, 2).tolist() == [-1]
    assert dbscan(np.zeros((40, 3)), 0.1, 40).tolist() == [0] * 40  # coincident points
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        dbscan(np.zeros((4, 2)), 0.1, 2)
    with pytest.raises(ValueError, match="eps"):
        dbscan(np.zeros((4, 3)), 0.0, 2)
    with pytest.raises(ValueError, match="finite"):
        dbscan(np.array([[0.0, np.nan, 0.0]]), 0.1, 1)
