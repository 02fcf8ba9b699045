"""FPS, KNN, curvature and IPG (paper §III-A, Eq. 1–4) against literal loop implementations."""

import math

import numpy as np
import pytest
import torch

from musc_core import grouping
from musc_core.grouping import (
    centre_curvature,
    farthest_point_sample,
    group_points,
    iterative_point_grouping,
    knn,
)


def sq(a, b):
    return sum((float(x) - float(y)) ** 2 for x, y in zip(a, b, strict=True))


def literal_fps(points, num):
    picked = [0]
    nearest = [math.inf] * len(points)
    while len(picked) < num:
        last = points[picked[-1]]
        for j, p in enumerate(points):
            nearest[j] = min(nearest[j], sq(p, last))
        best = max(range(len(points)), key=lambda j: (nearest[j], -j))
        picked.append(best)
    return picked


def literal_knn(query, points, k):
    order = sorted(range(len(points)), key=lambda j: (sq(query, points[j]), j))
    return order[:k]


def literal_curvature(points, centre, neighbours, k, eps=1e-8):
    """Eq. 1–2 as the reference computes them: the K−1 nearest other points, divisor K−2."""
    pts = np.asarray(points, dtype=np.float64)
    offsets = np.array([pts[j] - pts[centre] for j in neighbours[1:k]])
    offsets = offsets / max(np.linalg.norm(o) for o in offsets)
    mean = offsets.mean(axis=0)
    cov = np.zeros((3, 3))
    for o in offsets:
        cov += np.outer(o - mean, o - mean)
    cov /= k - 2
    lam = np.linalg.eigvalsh(cov)
    return lam.min() / (lam.sum() + eps)


def literal_ipg(points, search, k, step):
    """Eq. 3–4: grow from the K_iter nearest by the closest distinct search-space points."""
    group = list(search[:step])
    while len(group) < k:
        add = min(step, k - len(group))
        candidates = []
        for position, j in enumerate(search):
            if j in group:
                continue
            d = min(math.sqrt(sq(points[j], points[m])) for m in group)
            candidates.append((d, position, j))
        candidates.sort()
        group += [j for _, _, j in candidates[:add]]
    return group


def test_fps_equals_literal_loop_and_is_deterministic():
    torch.manual_seed(0)
    points = torch.randn(300, 3, dtype=torch.float64)
    got = farthest_point_sample(points, 40)
    assert got.tolist() == literal_fps(points.tolist(), 40)
    assert got[0].item() == 0
    assert len(set(got.tolist())) == 40
    assert torch.equal(got, farthest_point_sample(points, 40))
    # float32 too, and picks the same on well-separated data
    assert farthest_point_sample(points.float(), 40).tolist() == got.tolist()


def test_fps_rejects_more_picks_than_points():
    with pytest.raises(ValueError):
        farthest_point_sample(torch.zeros(5, 3), 6)


def test_knn_equals_brute_force_sort():
    torch.manual_seed(1)
    points = torch.randn(500, 3, dtype=torch.float64)
    queries = torch.randn(20, 3, dtype=torch.float64)
    got = knn(queries, points, 17)
    for q in range(20):
        expected = literal_knn(queries[q].tolist(), points.tolist(), 17)
        assert got.index[q].tolist() == expected
        expected_d = [sq(queries[q].tolist(), points[j].tolist()) for j in expected]
        assert np.allclose(got.sq_dist[q].numpy(), expected_d, rtol=1e-12, atol=1e-15)


def test_knn_breaks_exact_ties_by_index_across_chunks(monkeypatch):
    # Integer grid: many exactly equal distances, also at the k-th position.
    g = torch.arange(6, dtype=torch.float32)
    points = torch.cartesian_prod(g, g, g[:3])  # (108, 3)
    points = points[torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(0))]
    queries = points[:15] + torch.tensor([0.0, 0.0, 0.0])
    monkeypatch.setattr(grouping, "_KNN_CHUNK_BYTES", 1)  # one query per chunk
    for k in (1, 7, 19, 40):
        got = knn(queries, points, k)
        for q in range(queries.shape[0]):
            assert got.index[q].tolist() == literal_knn(queries[q].tolist(), points.tolist(), k)
            assert got.index[q, 0].item() == q  # the query itself (distance 0) comes first


def test_curvature_equals_literal_per_centre():
    torch.manual_seed(2)
    points = torch.randn(400, 3, dtype=torch.float64) * torch.tensor([1.0, 1.0, 0.3])
    centres = torch.tensor([0, 5, 17, 99, 250])
    neighbours = knn(points[centres], points, 32).index
    got = centre_curvature(points, centres, neighbours, 24)
    for g, c in enumerate(centres.tolist()):
        expected = literal_curvature(points, c, neighbours[g].tolist(), 24)
        assert got[g].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def _plane_patch(n=300, seed=3):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 2 - 1
    points = torch.cat([xy, torch.zeros(n, 1)], dim=1)
    points[0] = 0
    # tilt the plane: curvature does not depend on orientation
    rot = torch.linalg.qr(torch.randn(3, 3, generator=gen))[0]
    return points @ rot.T


def _curvature_at_zero(points, k=64):
    neighbours = knn(points[:1], points, k).index
    return centre_curvature(points, torch.tensor([0]), neighbours, k).item()


def test_curvature_of_plane_is_zero_and_of_corner_and_cap_is_large():
    assert _curvature_at_zero(_plane_patch()) < 1e-4

    gen = torch.Generator().manual_seed(4)
    faces = []
    for axis in range(3):
        face = torch.rand(100, 3, generator=gen) * 0.5
        face[:, axis] = 0
        faces.append(face)
    corner = torch.cat([torch.zeros(1, 3)] + faces)
    assert _curvature_at_zero(corner) > 0.01

    direction = torch.randn(400, 3, generator=gen)
    direction = direction / direction.norm(dim=1, keepdim=True)
    direction[:, 2] = direction[:, 2].abs()
    direction = direction / direction.norm(dim=1, keepdim=True)
    cap = direction * 0.05 - torch.tensor([0.0, 0.0, 0.05])  # small sphere through the origin
    cap = torch.cat([torch.tensor([[0.0, 0.0, 0.0]]), cap])
    assert _curvature_at_zero(cap) > 0.01


def test_ipg_equals_literal_eq3_eq4():
    torch.manual_seed(5)
    points = torch.randn(600, 3, dtype=torch.float64)
    centres = farthest_point_sample(points, 12)
    k, step = 20, 6
    search = knn(points[centres], points, 2 * k).index
    curvature = torch.linspace(0, 0.02, 12, dtype=torch.float64)
    got = iterative_point_grouping(points, search, curvature, k, step, threshold=0.01)
    plist = points.tolist()
    for g in range(12):
        row = got[g].tolist()
        if curvature[g] < 0.01:
            assert row == search[g, :k].tolist()
        else:
            assert row == literal_ipg(plist, search[g].tolist(), k, step)
        assert len(set(row)) == k
        assert set(row) <= set(search[g].tolist())


def test_ipg_breaks_exact_ties_by_search_space_position():
    g = torch.arange(7, dtype=torch.float64)
    points = torch.cartesian_prod(g, g, g[:2])
    points = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(9))]
    centres = torch.tensor([0, 11, 30, 55])
    search = knn(points[centres], points, 40).index
    got = iterative_point_grouping(points, search, torch.ones(4), 20, 7, 0.5)
    for row, space in zip(got.tolist(), search.tolist(), strict=True):
        assert row == literal_ipg(points.tolist(), space, 20, 7)


def test_ipg_chunks_agree(monkeypatch):
    torch.manual_seed(6)
    points = torch.randn(400, 3, dtype=torch.float64)
    centres = farthest_point_sample(points, 9)
    search = knn(points[centres], points, 32).index
    curvature = torch.ones(9, dtype=torch.float64)
    whole = iterative_point_grouping(points, search, curvature, 16, 5, 0.01)
    monkeypatch.setattr(grouping, "_CHUNK_BYTES", 1)
    assert torch.equal(iterative_point_grouping(points, search, curvature, 16, 5, 0.01), whole)


def _two_sheets(gap=0.055, spacing=0.01, half=0.3):
    axis = torch.arange(-half, half + 1e-9, spacing)
    grid = torch.cartesian_prod(axis, axis)
    lower = torch.cat([grid, torch.zeros(len(grid), 1)], dim=1)
    upper = torch.cat([grid + spacing / 2, torch.full((len(grid), 1), gap)], dim=1)
    return torch.cat([lower, upper]), len(grid)


def test_ipg_keeps_groups_on_one_of_two_close_parallel_sheets():
    points, per_sheet = _two_sheets()
    k, step = 128, 80
    interior = (points[:, :2].abs() < 0.12).all(dim=1).nonzero().squeeze(1)
    centres = interior[:: max(1, len(interior) // 24)]
    search = knn(points[centres], points, 2 * k).index
    search = grouping._centre_first(search, centres)
    curvature = centre_curvature(points, centres, search, k)
    assert (curvature >= 0.01).all()  # the KNN groups span both sheets
    ipg = iterative_point_grouping(points, search, curvature, k, step, 0.01)
    plain = iterative_point_grouping(points, search, curvature, k, step, math.inf)
    sheet = lambda idx: idx >= per_sheet  # noqa: E731
    for g, c in enumerate(centres.tolist()):
        own = sheet(torch.tensor(c))
        assert (sheet(ipg[g]) == own).all(), "IPG group left its surface"
        assert (sheet(plain[g]) != own).any(), "plain KNN was expected to mix the sheets"


def test_group_points_shapes_and_invariants():
    torch.manual_seed(7)
    points = torch.rand(3000, 3)
    points[:, 2] = 0.1 * torch.sin(6 * points[:, 0]) + 0.2 * (points[:, 1] > 0.5)
    out = group_points(points, num_groups=64, group_size=32, ipg_step=20, curvature_threshold=0.01)
    assert out.centre_index.shape == (64,) and out.centre_index[0].item() == 0
    assert torch.equal(out.centres, points[out.centre_index])
    assert out.members.shape == (64, 32) and out.members.dtype == torch.long
    assert out.curvature.shape == (64,)
    for g in range(64):
        row = out.members[g].tolist()
        assert len(set(row)) == 32
        assert out.centre_index[g].item() in row
    again = group_points(points, 64, 32, 20, 0.01)
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))


def test_centre_is_moved_to_the_front_of_its_neighbours():
    # Exact duplicates with lower indices can precede a centre in its KNN list.
    neighbours = torch.tensor([[3, 7, 9, 4], [5, 6, 1, 2], [8, 0, 1, 2]])
    centres = torch.tensor([9, 5, 7])
    got = grouping._centre_first(neighbours, centres)
    assert got.tolist() == [[9, 3, 7, 4], [5, 6, 1, 2], [7, 8, 0, 1]]


def test_group_points_starts_every_plain_group_with_its_centre():
    torch.manual_seed(8)
    points = torch.rand(200, 3)
    points[150] = points[0]  # a duplicate of the first centre
    out = group_points(points, 16, 8, 4, curvature_threshold=math.inf)  # plain KNN
    assert torch.equal(out.members[:, 0], out.centre_index)


def test_group_points_needs_enough_points():
    with pytest.raises(ValueError, match="needs at least 256 foreground points, got 200"):
        group_points(torch.rand(200, 3), 64, 128, 80, 0.01)
    with pytest.raises(ValueError, match="needs at least 1024 foreground points, got 1000"):
        group_points(torch.rand(1000, 3), 1024, 128, 80, 0.01)


def _surface(n, seed):
    """A bumpy height field with a step: a scan-like surface (the grid search's usual input)."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 2 - 1
    z = 0.2 * torch.sin(3 * xy[:, 0]) * torch.cos(2 * xy[:, 1]) + 0.1 * (xy[:, 0] > 0.3)
    return torch.cat([xy, z[:, None] + 0.002 * torch.randn(n, 1, generator=gen)], dim=1)


@pytest.mark.parametrize("k", [1, 3, 40])
def test_knn_grid_search_equals_brute_force(monkeypatch, k):
    monkeypatch.setattr(grouping, "_GRID_MIN_PAIRS", 0)  # always search the grid
    points = _surface(3000, seed=10 + k)
    queries = torch.cat([points[::37], _surface(50, seed=99) * 1.3])  # some outside the cloud
    got = knn(queries, points, k)
    want = grouping._knn_brute(queries, points, k)
    assert torch.equal(got.index, want.index)
    assert torch.equal(got.sq_dist, want.sq_dist)
    for q in range(0, queries.shape[0], 17):
        assert got.index[q].tolist() == literal_knn(queries[q].tolist(), points.tolist(), k)


@pytest.mark.parametrize("radii", [(1,), (1, 2, 3)])
def test_knn_grid_search_falls_back_exactly_for_sparse_regions(monkeypatch, radii):
    # A dense sheet and a few far points: the far queries never settle inside a small square.
    monkeypatch.setattr(grouping, "_GRID_MIN_PAIRS", 0)
    monkeypatch.setattr(grouping, "_GRID_RADII", radii)
    points = torch.cat([_surface(2000, seed=3), torch.tensor([[3.0, 3.0, 1.0], [-3.0, 2.5, 0.0]])])
    queries = torch.cat([points[::50], points[-2:]])
    got = knn(queries, points, 25)
    want = grouping._knn_brute(queries, points, 25)
    assert torch.equal(got.index, want.index) and torch.equal(got.sq_dist, want.sq_dist)


def test_knn_grid_search_breaks_exact_ties_by_index(monkeypatch):
    # Integer grid in a volume, shuffled, with duplicates: many equal distances at the k-th place.
    monkeypatch.setattr(grouping, "_GRID_MIN_PAIRS", 0)
    g = torch.arange(9, dtype=torch.float32)
    points = torch.cartesian_prod(g, g, g[:4])
    points = torch.cat([points, points[::7]])  # exact duplicates with higher indices
    points = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(1))]
    queries = torch.cat([points[:40], points[:10] + 0.5])
    for k in (1, 6, 19, 33):
        got = knn(queries, points, k)
        want = grouping._knn_brute(queries, points, k)
        assert torch.equal(got.index, want.index), k
        for q in range(0, queries.shape[0], 7):
            assert got.index[q].tolist() == literal_knn(queries[q].tolist(), points.tolist(), k)


def test_smallest_k_orders_equal_values_by_id():
    dist = torch.tensor([[3.0, 1.0, 1.0, 2.0, 1.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    ids = torch.tensor([[9, 8, 2, 7, 5, 4], [0, 1, 2, 3, 4, 5]])
    values, index = grouping._smallest_k(dist, 3, ids)
    assert index.tolist() == [[4, 2, 5], [5, 4, 3]]
    assert values.tolist() == [[0.0, 1.0, 1.0], [0.0, 1.0, 2.0]]
    values, index = grouping._smallest_k(dist, 3)  # ids = columns
    assert index.tolist() == [[5, 1, 2], [5, 4, 3]]


def test_fps_ties_pick_the_lowest_index_across_blocks(monkeypatch):
    # Integer grid: equal farthest distances everywhere; blocks of 16 points split the ties.
    monkeypatch.setattr(grouping, "_FPS_BLOCK", 16)
    g = torch.arange(5, dtype=torch.float64)
    points = torch.cartesian_prod(g, g, g[:3])
    points = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(2))]
    got = farthest_point_sample(points, 30)
    assert got.tolist() == literal_fps(points.tolist(), 30)
    assert farthest_point_sample(points[:7], 7).tolist() == literal_fps(points[:7].tolist(), 7)
