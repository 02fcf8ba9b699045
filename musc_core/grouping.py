"""Point grouping with Iterative Point Grouping (IPG) (SPEC §2.3, paper §III-A Eq. 1–4).

A sample's foreground points are split into G groups of K points: farthest point sampling picks
the centres (starting from point 0), each centre's 2K nearest points form its search space, the
curvature at the centre decides between plain KNN (flat surface) and IPG (the group grows from
the K_iter nearest points by repeatedly adding the search-space points closest to the group),
which keeps a group on one surface where two surfaces come close.

Every ranking by distance breaks ties deterministically, by the lower point index (KNN) or the
earlier search-space position (IPG), so a grouping does not depend on the device or the thread
count beyond floating-point rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Bytes one working buffer may take; bounds the memory of ``knn`` and IPG independently of P, G.
# The KNN chunk is smaller because its distance rows are re-read several times (cache reuse).
_CHUNK_BYTES = 64 << 20
_KNN_CHUNK_BYTES = 16 << 20


class Neighbours(NamedTuple):
    """Nearest points of a set of queries, nearest first.

    Attributes:
        index: (Q, k) long, indices into the searched points, sorted by ascending distance;
            equal distances are ordered by ascending point index.
        sq_dist: (Q, k) squared Euclidean distances, same dtype as the points.
    """

    index: torch.Tensor
    sq_dist: torch.Tensor


class Grouping(NamedTuple):
    """The G point groups of one sample.

    Attributes:
        centre_index: (G,) long, index into the points of each group's centre (FPS order).
        centres: (G, 3) centre coordinates (``points[centre_index]``).
        members: (G, K) long, indices into the points of each group's members. Plain-KNN
            groups list their members nearest first (the centre first); IPG groups list the
            K_iter nearest points first, then the additions in the order they were added.
        curvature: (G,) curvature at each centre (Eq. 2), in [0, 1/3].
    """

    centre_index: torch.Tensor
    centres: torch.Tensor
    members: torch.Tensor
    curvature: torch.Tensor


def farthest_point_sample(points: torch.Tensor, num: int) -> torch.Tensor:
    """Farthest point sampling, starting from point 0.

    Pick i + 1 is the point whose squared distance to the nearest of the first i picks is
    largest; among equal distances the lowest index wins (``argmax``'s first maximum).

    The reference's CUDA kernel (pointnet2_ops) also never picks a point with squared norm
    ≤ 1e-3, i.e. within 0.032 of the centroid of a unit-sphere normalized cloud; SPEC §2.3 does
    not ask for that quirk and it is not reproduced.

    Args:
        points: (P, 3) coordinates.
        num: number of points to pick, 1 ≤ num ≤ P.

    Returns:
        (num,) long indices into ``points``, in picking order (the first is 0).
    """
    count = points.shape[0]
    if not 1 <= num <= count:
        raise ValueError(f"farthest point sampling of {num} points from {count}")
    coords = points.t().contiguous()  # (3, P): one contiguous row per coordinate
    nearest = torch.full((count,), float("inf"), dtype=points.dtype, device=points.device)
    picked = torch.zeros(num, dtype=torch.long, device=points.device)
    dist = torch.empty_like(nearest)
    diff = torch.empty_like(nearest)
    # On the CPU a Python index is cheaper than a 0-d tensor; on an accelerator the 0-d tensor
    # avoids a host synchronization per pick.
    current: int | torch.Tensor = 0
    for step in range(1, num):
        centre = coords[:, current]
        torch.sub(coords[0], centre[0], out=dist).square_()
        torch.sub(coords[1], centre[1], out=diff)
        dist.addcmul_(diff, diff)
        torch.sub(coords[2], centre[2], out=diff)
        dist.addcmul_(diff, diff)
        torch.minimum(nearest, dist, out=nearest)
        current = nearest.argmax()
        if points.device.type == "cpu":
            current = int(current)
        picked[step] = current
    return picked


def _squared_distances(queries: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """(Q, P) squared distances from (Q, 3) queries to the points given as (3, P) rows."""
    dist = torch.sub(queries[:, 0:1], coords[0]).square_()
    diff = torch.empty_like(dist)
    for axis in (1, 2):
        torch.sub(queries[:, axis : axis + 1], coords[axis], out=diff)
        dist.addcmul_(diff, diff)
    return dist


def _order_by_value_then_index(values: torch.Tensor, index: torch.Tensor) -> tuple:
    """Sort each row of (values, index) pairs by value, equal values by ascending index."""
    index, by_index = torch.sort(index, dim=1)
    values = torch.gather(values, 1, by_index)
    values, by_value = torch.sort(values, dim=1, stable=True)
    return values, torch.gather(index, 1, by_value)


def _smallest_k(dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of each row, ordered by (value, column), ties included exactly."""
    values, index = torch.topk(dist, k, dim=1, largest=False, sorted=True)
    kth = values[:, -1:]
    # Rows where topk had to choose among entries equal to the k-th value: redo them so that
    # the lowest columns are kept.
    tied = (dist == kth).sum(1) > (values == kth).sum(1)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        sub, sub_kth = dist[rows], kth[rows]
        below = sub < sub_kth
        need = k - below.sum(1, keepdim=True)
        equal = sub == sub_kth
        keep = below | (equal & (torch.cumsum(equal, dim=1) <= need))
        columns = keep.nonzero()[:, 1].view(rows.shape[0], k)
        index[rows] = columns
        values[rows] = torch.gather(sub, 1, columns)
    values, index = _order_by_value_then_index(values, index)
    return values, index


def knn(queries: torch.Tensor, points: torch.Tensor, k: int) -> Neighbours:
    """The k nearest points of each query, by exact squared Euclidean distance.

    Distances are formed as sums of squared coordinate differences (no ``|a|² + |b|² - 2ab``
    cancellation), in chunks of queries so that one chunk's distance matrix stays under 16 MB.

    Args:
        queries: (Q, 3) coordinates.
        points: (P, 3) coordinates searched, P ≥ k.
        k: neighbours per query.

    Returns:
        Indices and squared distances, (Q, k) each, nearest first; equal distances are ordered
        by ascending point index (so a query that is one of the points comes first unless a
        duplicate with a lower index exists).
    """
    count = points.shape[0]
    if not 1 <= k <= count:
        raise ValueError(f"{k} nearest neighbours among {count} points")
    coords = points.t().contiguous()
    # Distance matrix, a same-sized temporary and the comparison masks per query row.
    rows = max(1, _KNN_CHUNK_BYTES // (count * (2 * points.element_size() + 4)))
    index_parts, dist_parts = [], []
    for start in range(0, queries.shape[0], rows):
        dist = _squared_distances(queries[start : start + rows], coords)
        values, index = _smallest_k(dist, k)
        index_parts.append(index)
        dist_parts.append(values)
    if not index_parts:
        empty = points.new_zeros((0, k))
        return Neighbours(empty.long(), empty)
    return Neighbours(torch.cat(index_parts), torch.cat(dist_parts))


def centre_curvature(
    points: torch.Tensor,
    centre_index: torch.Tensor,
    neighbour_index: torch.Tensor,
    k: int,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Curvature at each group centre (paper Eq. 1–2), as the reference computes it.

    The reference takes a centre's K nearest points, which start with the centre itself, and
    drops that first one: the K − 1 nearest other points p_i are used. They are translated by the
    centre (p̄_i = p_i − p_c) and divided by the largest norm ‖p̄_i‖ (Eq. 1); their 3×3
    covariance is taken about their mean with the unbiased divisor (K − 1) − 1 = K − 2; the
    curvature is λ_min / (Σλ + eps) (Eq. 2) from a symmetric eigen-solver. The divisor does not
    change the ratio (beyond ``eps``); it is kept for parity.

    Args:
        points: (P, 3) coordinates.
        centre_index: (G,) long indices of the centres.
        neighbour_index: (G, ≥ k) long indices of each centre's nearest points sorted by
            distance, the centre first.
        k: K, the group size (points of the centre's KNN group, centre included), ≥ 3.
        eps: added to the eigenvalue sum.

    Returns:
        (G,) curvatures, in [0, 1/3] up to rounding.
    """
    if k < 3:
        raise ValueError(f"curvature needs a group size of at least 3, got {k}")
    if neighbour_index.shape[1] < k:
        raise ValueError(f"curvature of K={k} needs {k} neighbours, got {neighbour_index.shape[1]}")
    offsets = points[neighbour_index[:, 1:k]] - points[centre_index].unsqueeze(1)  # (G, K-1, 3)
    scale = torch.linalg.vector_norm(offsets, dim=-1).amax(dim=1)
    # Coincident points only (scale 0): leave the zero offsets as they are instead of NaN.
    offsets = offsets / scale.clamp_min(torch.finfo(offsets.dtype).tiny)[:, None, None]
    centred = offsets - offsets.mean(dim=1, keepdim=True)
    covariance = centred.transpose(1, 2) @ centred / (k - 2)
    eigenvalues = torch.linalg.eigvalsh(covariance)  # (G, 3) ascending
    return eigenvalues[:, 0] / (eigenvalues.sum(dim=1) + eps)


def _ipg_chunk(coords: torch.Tensor, group_size: int, step: int) -> torch.Tensor:
    """IPG of a chunk of high-curvature centres.

    Args:
        coords: (H, M, 3) coordinates of each centre's search space, sorted by distance to the
            centre.
        group_size: K.
        step: K_iter.

    Returns:
        (H, K) long positions into the search space of the group members.
    """
    count, space, _ = coords.shape
    arange = torch.arange(space, device=coords.device)
    positions = torch.empty(count, group_size, dtype=torch.long, device=coords.device)
    positions[:, :step] = arange[:step]
    chosen = torch.zeros(count, space, dtype=torch.bool, device=coords.device)
    chosen[:, :step] = True
    # Distance of every search-space point to its nearest group member (Eq. 3), updated with
    # the members added by each step only.
    nearest = torch.full((count, space), float("inf"), dtype=coords.dtype, device=coords.device)
    new = positions[:, :step]
    size = step
    while True:
        members = torch.gather(coords, 1, new.unsqueeze(-1).expand(-1, -1, 3))  # (H, n, 3)
        dist = torch.cdist(coords, members, compute_mode="donot_use_mm_for_euclid_dist")
        torch.minimum(nearest, dist.amin(dim=2), out=nearest)
        if size == group_size:
            break
        add = min(step, group_size - size)
        # Eq. 4 over the points not yet in the group; a stable sort keeps the earlier
        # search-space position (the one nearer the centre) first among equal distances.
        candidates = nearest.masked_fill(chosen, float("inf"))
        new = torch.sort(candidates, dim=1, stable=True).indices[:, :add]
        positions[:, size : size + add] = new
        chosen.scatter_(1, new, True)
        size += add
    return positions


def iterative_point_grouping(
    points: torch.Tensor,
    search_index: torch.Tensor,
    curvature: torch.Tensor,
    group_size: int,
    step: int,
    threshold: float,
) -> torch.Tensor:
    """Group members by plain KNN or Iterative Point Grouping (paper Eq. 3–4).

    Centres with curvature < ``threshold`` get their K nearest points. The others start from
    their K_iter nearest points and repeatedly add the min(K_iter, K − size) *distinct*
    search-space points not yet in the group with the smallest distance to the group (the
    minimum distance to any member), until the group holds K points. Among equal distances the
    point earlier in the search space (nearer the centre) is taken first.

    Args:
        points: (P, 3) coordinates.
        search_index: (G, M) long, each centre's M ≥ K nearest points (the search space, 2K in
            the paper), sorted by ascending distance to the centre.
        curvature: (G,) curvature at each centre.
        group_size: K.
        step: K_iter, 1 ≤ K_iter ≤ K.
        threshold: C_thr.

    Returns:
        (G, K) long member indices into ``points``, each row K distinct search-space points
        (provided the search space holds distinct indices).
    """
    num_groups, space = search_index.shape
    if space < group_size:
        raise ValueError(f"search space of {space} points is smaller than the group {group_size}")
    if not 1 <= step <= group_size:
        raise ValueError(f"IPG step must be in [1, {group_size}], got {step}")
    members = search_index[:, :group_size].clone()
    regroup = (curvature >= threshold).nonzero().squeeze(1)
    if regroup.numel() == 0 or step == group_size:
        return members
    # Per centre: the (M, K_iter) distance matrix of one expansion step.
    per_centre = space * step * points.element_size()
    rows = max(1, _CHUNK_BYTES // per_centre)
    for start in range(0, regroup.numel(), rows):
        chunk = regroup[start : start + rows]
        space_index = search_index[chunk]
        positions = _ipg_chunk(points[space_index], group_size, step)
        members[chunk] = torch.gather(space_index, 1, positions)
    return members


def _centre_first(neighbour_index: torch.Tensor, centre_index: torch.Tensor) -> torch.Tensor:
    """Move each centre to the front of its neighbour list (it can trail exact duplicates).

    A centre missing from its list (more duplicates than columns) replaces the last entry.
    """
    width = neighbour_index.shape[1]
    is_centre = neighbour_index == centre_index.unsqueeze(1)
    found = is_centre.any(dim=1)
    where = torch.where(found, is_centre.int().argmax(dim=1), width - 1).unsqueeze(1)
    column = torch.arange(width, device=neighbour_index.device).unsqueeze(0)
    source = torch.where(column == 0, 0, torch.where(column <= where, column - 1, column))
    shifted = torch.gather(neighbour_index, 1, source)
    shifted[:, 0] = centre_index
    return shifted


def group_points(
    points: torch.Tensor,
    num_groups: int,
    group_size: int,
    ipg_step: int,
    curvature_threshold: float,
) -> Grouping:
    """FPS centres, 2K-nearest search spaces, centre curvatures and IPG groups of one sample.

    Args:
        points: (P, 3) foreground points (unit-sphere normalized), float32.
        num_groups: G.
        group_size: K.
        ipg_step: K_iter.
        curvature_threshold: C_thr.

    Returns:
        The grouping (centres in FPS order).

    Raises:
        ValueError: when P < 2K or P < G.
    """
    count = points.shape[0]
    needed = max(num_groups, 2 * group_size)
    if count < needed:
        raise ValueError(
            f"grouping into {num_groups} groups of {group_size} points needs at least {needed} "
            f"foreground points, got {count}"
        )
    centre_index = farthest_point_sample(points, num_groups)
    centres = points[centre_index]
    search = knn(centres, points, 2 * group_size).index
    search = _centre_first(search, centre_index)
    curvature = centre_curvature(points, centre_index, search, group_size)
    members = iterative_point_grouping(
        points, search, curvature, group_size, ipg_step, curvature_threshold
    )
    return Grouping(centre_index, centres, members, curvature)
