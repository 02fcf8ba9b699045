"""Point grouping with Iterative Point Grouping (IPG) (paper §III-A, Eq. 1–4).

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

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

# Bytes one working buffer may take; bounds the memory of ``knn`` and IPG independently of P, G.
# The KNN chunk is smaller because its distance rows are re-read several times (cache reuse).
_CHUNK_BYTES = 64 << 20
_KNN_CHUNK_BYTES = 16 << 20
# Farthest point sampling finds each pick's argmax by blocks of this many points.
_FPS_BLOCK = 256
# knn searches a grid of columns instead of every point from this many query×point pairs on;
# the column side is this quantile of the k-th neighbour distance of _GRID_SAMPLE sampled
# queries (at least the extent / _GRID_MAX_SIDE), and the squares of (2r + 1)² columns for r in
# _GRID_RADII are tried before brute force.
_GRID_MIN_PAIRS = 1 << 22
_GRID_SAMPLE = 16
_GRID_QUANTILE = 0.5
_GRID_RADII = (1, 2, 3)
_GRID_MAX_SIDE = 2048


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


@dataclass(frozen=True)
class PointSample:
    """A sample's foreground points and their grouping.

    Attributes:
        points: (P, 3) unit-sphere normalized foreground points.
        pixel_index: (P,) flat pixel index y * S + x of each point.
        grouping: centres, members and curvatures of the G groups.
    """

    points: torch.Tensor
    pixel_index: torch.Tensor
    grouping: Grouping

    @property
    def centre_pixel(self) -> torch.Tensor:
        """(G,) long, flat pixel index of each group centre."""
        return self.pixel_index[self.grouping.centre_index]


def _first_argmax(blocks: torch.Tensor) -> int:
    """Index of the first maximum of a (P,) vector viewed as (P / B, B) ``blocks`` (CPU).

    ``argmax`` over a long vector is a scalar loop on the CPU; the maxima of the blocks are a
    vectorized reduction, so the first maximal block and then its first maximum are found in
    about a third of the time, with the same result (ties resolve to the lowest index).
    """
    block = int(blocks.amax(dim=1).argmax())
    return block * blocks.shape[1] + int(blocks[block].argmax())


def farthest_point_sample(points: torch.Tensor, num: int) -> torch.Tensor:
    """Farthest point sampling, starting from point 0.

    Pick i + 1 is the point whose squared distance to the nearest of the first i picks is
    largest; among equal distances the lowest index wins (``argmax``'s first maximum).

    The reference's CUDA kernel (pointnet2_ops) also never picks a point with squared norm
    ≤ 1e-3, i.e. within 0.032 of the centroid of a unit-sphere normalized cloud; docs/method.md does
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
    on_cpu = points.device.type == "cpu"
    # Padded to whole blocks for the two-level argmax; padding is never picked (-inf).
    width = -(-count // _FPS_BLOCK) * _FPS_BLOCK
    coords = points.new_zeros((3, width))
    coords[:, :count] = points.t()  # one contiguous row per coordinate
    nearest = torch.full((width,), float("inf"), dtype=points.dtype, device=points.device)
    nearest[count:] = float("-inf")
    blocks = nearest.view(-1, _FPS_BLOCK)
    dist = torch.empty_like(nearest)
    diff = torch.empty_like(coords)
    dx, dy, dz = diff
    # On the CPU a Python index is cheaper than a 0-d tensor; on an accelerator the 0-d tensor
    # avoids a host synchronization per pick.
    current: int | torch.Tensor = 0
    picked: list[int | torch.Tensor] = [current]
    for _ in range(1, num):
        torch.sub(coords, coords[:, current, None], out=diff)
        torch.mul(dx, dx, out=dist).addcmul_(dy, dy).addcmul_(dz, dz)
        torch.minimum(nearest, dist, out=nearest)
        current = _first_argmax(blocks) if on_cpu else nearest.argmax()
        picked.append(current)
    if on_cpu:
        return torch.tensor(picked, dtype=torch.long)
    return torch.stack([torch.as_tensor(p, device=points.device) for p in picked]).long()


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


def _resolve_boundary_ties(
    dist: torch.Tensor, ids: torch.Tensor | None, kth: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of rows whose k-th value is tied with entries left out.

    Keeps every entry below the k-th value and, among the entries equal to it, those with the
    lowest ids (columns when ``ids`` is None).

    Args:
        dist: (R, W) values.
        ids: (R, W) long ids of the entries, or None for the column index.
        kth: (R, 1) k-th smallest value of each row.
        k: entries kept per row.

    Returns:
        (R, k) values and ids, unordered.
    """
    below = dist < kth
    equal = dist == kth
    need = k - below.sum(dim=1, keepdim=True)
    if ids is None:
        keep = below | (equal & (torch.cumsum(equal, dim=1) <= need))
    else:
        sentinel = torch.iinfo(ids.dtype).max
        tied_ids = torch.sort(ids.masked_fill(~equal, sentinel), dim=1).values
        keep = below | (equal & (ids <= torch.gather(tied_ids, 1, need - 1)))
    columns = keep.nonzero()[:, 1].view(dist.shape[0], k)
    chosen = columns if ids is None else torch.gather(ids, 1, columns)
    return torch.gather(dist, 1, columns), chosen


def _order_ties_by_index(values: torch.Tensor, index: torch.Tensor) -> tuple:
    """Rows already ascending by value: put runs of equal values in ascending index order.

    Only rows holding equal neighbours are sorted again (in place), so the common case costs
    one comparison pass.
    """
    if values.shape[1] > 1:
        repeated = (values[:, 1:] == values[:, :-1]).any(dim=1)
        if bool(repeated.any()):
            rows = repeated.nonzero().squeeze(1)
            values[rows], index[rows] = _order_by_value_then_index(values[rows], index[rows])
    return values, index


def _smallest_k(
    dist: torch.Tensor, k: int, ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of each row, ordered by (value, id), ties included exactly.

    A row needs tie-breaking only when its (k+1)-th smallest value equals its k-th, which one
    ``topk`` of k + 1 shows; those rows are redone so that the lowest ids are kept.

    Args:
        dist: (Q, W) values, W ≥ k.
        k: entries per row.
        ids: (Q, W) long ids of the entries (e.g. point indices of candidates); None for the
            column index.

    Returns:
        (Q, k) values and ids, ascending by value then id.
    """
    width = dist.shape[1]
    values, index = torch.topk(dist, min(k + 1, width), dim=1, largest=False, sorted=True)
    if ids is not None:
        index = torch.gather(ids, 1, index)
    if width > k:
        # Rows with fewer than k finite entries (padded candidates) are not resolved.
        tied = (values[:, k] == values[:, k - 1]) & torch.isfinite(values[:, k - 1])
        values, index = values[:, :k].contiguous(), index[:, :k].contiguous()
        if bool(tied.any()):
            rows = tied.nonzero().squeeze(1)
            row_ids = None if ids is None else ids[rows]
            kth = values[rows, k - 1 :]
            chosen = _resolve_boundary_ties(dist[rows], row_ids, kth, k)
            values[rows], index[rows] = _order_by_value_then_index(*chosen)
    return _order_ties_by_index(values, index)


class _ColumnGrid(NamedTuple):
    """Points bucketed in square columns over their two widest axes (``knn`` pruning).

    A column is a square cell of the plane of axes ``axes`` (the third coordinate is ignored),
    so a square of columns holds every point whose projection falls in it. Column coordinates
    are shifted by ``pad`` so that every square of radius ≤ ``pad`` around an in-range column
    stays inside the table.

    Attributes:
        axes: (2,) long, the two coordinate axes of the plane.
        origin: (2,) position of the corner of column (pad, pad).
        cell: side of a column.
        pad: columns of padding on every side.
        rows: columns along the second axis (padding included); key = c0 · rows + c1.
        prefix: (keys + 1,) long, number of points in columns of lower key.
        coords: (3, P + 1) coordinates of the points sorted by key (ascending point index within
            a column), then a sentinel column of +inf.
        order: (P + 1,) long, point index of each sorted position, then P for the sentinel.
        scale: magnitude of the point coordinates and extent (bounds the rounding of columns).
    """

    axes: torch.Tensor
    origin: torch.Tensor
    cell: float
    pad: int
    rows: int
    prefix: torch.Tensor
    coords: torch.Tensor
    order: torch.Tensor
    scale: float


def _column_of(grid_origin: torch.Tensor, cell: float, planar: torch.Tensor) -> torch.Tensor:
    """(…, 2) long column coordinates (unshifted) of (…, 2) planar positions."""
    return torch.floor((planar - grid_origin) / cell).long()


def _build_grid(points: torch.Tensor, cell: float, pad: int) -> _ColumnGrid:
    """Bucket (P, 3) points in square columns of side ``cell`` over their two widest axes."""
    extent = points.amax(dim=0) - points.amin(dim=0)
    axes = torch.sort(torch.topk(extent, 2).indices).values
    planar = points[:, axes]
    origin = planar.amin(dim=0)
    columns = _column_of(origin, cell, planar) + pad
    shape = columns.amax(dim=0) + 1 + pad
    rows = int(shape[1])
    key = columns[:, 0] * rows + columns[:, 1]
    key, order = torch.sort(key, stable=True)
    counts = torch.bincount(key, minlength=int(shape[0]) * rows)
    prefix = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    sentinel = points.new_full((3, 1), float("inf"))
    coords = torch.cat([points.t()[:, order], sentinel], dim=1)
    order = torch.cat([order, order.new_full((1,), points.shape[0])])
    scale = float(points.abs().max() + extent.max())
    return _ColumnGrid(axes, origin, cell, pad, rows, prefix, coords, order, scale)


def _square_runs(
    grid: _ColumnGrid, queries: torch.Tensor, radius: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The runs of sorted positions holding the points of each query's square of columns.

    The square is the (2·radius + 1)² columns centred on the query's column; with the key
    order, each of its 2·radius + 1 lines of columns is one contiguous run.

    Returns:
        (Q, 2·radius + 1) start and length of each run, and (Q,) the planar distance from each
        query to the edges of its square (no point outside the square is nearer in 3D).
        Queries outside the table get a square clamped inside it and a negative distance.
    """
    planar = queries[:, grid.axes]
    limit = torch.tensor(
        [(grid.prefix.numel() - 1) // grid.rows - 1 - radius, grid.rows - 1 - radius],
        device=queries.device,
    )
    own = torch.minimum(
        (_column_of(grid.origin, grid.cell, planar) + grid.pad).clamp_min(radius), limit
    )
    line = torch.arange(-radius, radius + 1, device=queries.device)
    first = (own[:, 0:1] + line) * grid.rows + own[:, 1:2] - radius  # (Q, 2r + 1) keys
    start = grid.prefix[first]
    length = grid.prefix[first + 2 * radius + 1] - start
    low = grid.origin + (own - grid.pad - radius) * grid.cell
    high = low + (2 * radius + 1) * grid.cell
    margin = torch.minimum(planar - low, high - planar).amin(dim=1)
    return start, length, margin


def _run_positions(start: torch.Tensor, length: torch.Tensor, sentinel: int) -> torch.Tensor:
    """Concatenate each row's runs: (Q, T) sorted positions, padded with ``sentinel``."""
    end = length.cumsum(dim=1)
    total = end[:, -1:]
    width = int(total.max()) if total.numel() else 0
    slot = torch.arange(width, device=start.device).expand(start.shape[0], width).contiguous()
    run = torch.searchsorted(end, slot, right=True)  # the last run index + 1 past the total
    starts = torch.cat([start, start.new_full(total.shape, sentinel)], dim=1)
    before = torch.cat([end - length, total], dim=1)
    position = torch.gather(starts, 1, run).add_(slot).sub_(torch.gather(before, 1, run))
    return position.clamp_max_(sentinel)


def _grid_search(
    queries: torch.Tensor, k: int, grid: _ColumnGrid, radius: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k nearest points among those in each query's square of columns.

    Returns:
        (Q, k) squared distances and point indices ordered by (distance, index), and (Q,) bool:
        True where the result is exact (the k-th distance is below the square's margin, so no
        point outside the square can be among the k nearest, ties included).
    """
    count = queries.shape[0]
    values = queries.new_full((count, k), float("inf"))
    index = torch.zeros((count, k), dtype=torch.long, device=queries.device)
    start, length, margin = _square_runs(grid, queries, radius)
    sentinel = grid.order.numel() - 1
    # Positions, distances, a temporary and the selection: about 40 bytes per candidate.
    rows = max(1, _KNN_CHUNK_BYTES // (40 * max(1, int(length.sum(dim=1).max()))))
    for first in range(0, count, rows):
        part = slice(first, first + rows)
        position = _run_positions(start[part], length[part], sentinel)
        if position.shape[1] < k:
            continue
        shape = (position.shape[0], grid.coords.shape[1])
        dist = torch.sub(queries[part, 0:1], grid.coords[0].expand(shape).gather(1, position))
        dist.square_()
        for axis in (1, 2):
            coordinate = grid.coords[axis].expand(shape).gather(1, position)
            torch.sub(queries[part, axis : axis + 1], coordinate, out=coordinate)
            dist.addcmul_(coordinate, coordinate)
        ids = grid.order.expand(shape).gather(1, position)
        values[part], index[part] = _smallest_k(dist, k, ids)
    # Positions are rounded to columns in floating point: keep a relative safety gap.
    slack = 8 * torch.finfo(queries.dtype).eps * (queries.abs().max() + grid.scale)
    reach = (margin - slack).clamp_min(0.0)
    exact = torch.isfinite(values[:, -1]) & (values[:, -1] < reach * reach)
    return values, index, exact


def _cell_size(queries: torch.Tensor, coords: torch.Tensor, k: int) -> float:
    """Column side for ``knn``: a quantile of the k-th distance of a few sampled queries."""
    count = queries.shape[0]
    sample = torch.linspace(0, count - 1, min(count, _GRID_SAMPLE), device=queries.device)
    kth = torch.kthvalue(_squared_distances(queries[sample.long()], coords), k, dim=1).values
    return float(torch.quantile(kth.sqrt(), _GRID_QUANTILE))


def _knn_brute(queries: torch.Tensor, points: torch.Tensor, k: int) -> Neighbours:
    """``knn`` by every query×point distance, in chunks of queries."""
    count = points.shape[0]
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


def _knn_grid(queries: torch.Tensor, points: torch.Tensor, k: int) -> Neighbours:
    """``knn`` with candidates pruned by a grid of columns; exact, falls back to brute force.

    The column side is a quantile of the k-th neighbour distance of a few sampled queries
    (at least 1/_GRID_MAX_SIDE of the points' extent). Each query first searches the 3×3
    columns around its own, then (if its k-th distance reaches past that square) the 5×5
    columns, and so on for ``_GRID_RADII``; queries still not settled are searched by brute
    force. A result is accepted only when no point outside the searched square can be as near
    as the k-th neighbour, so the neighbours are exactly those of ``_knn_brute``.
    """
    cell = _cell_size(queries, points.t().contiguous(), k)
    extent = float((points.amax(dim=0) - points.amin(dim=0)).max())
    cell = max(cell, extent / _GRID_MAX_SIDE)
    if not math.isfinite(cell) or cell <= 0:
        return _knn_brute(queries, points, k)
    grid = _build_grid(points, cell, max(_GRID_RADII))
    values = queries.new_empty((queries.shape[0], k))
    index = torch.empty((queries.shape[0], k), dtype=torch.long, device=queries.device)
    todo = torch.arange(queries.shape[0], device=queries.device)
    for radius in _GRID_RADII:
        if todo.numel() == 0:
            break
        found, where, exact = _grid_search(queries[todo], k, grid, radius)
        values[todo[exact]], index[todo[exact]] = found[exact], where[exact]
        todo = todo[~exact]
    if todo.numel():
        rest = _knn_brute(queries[todo], points, k)
        values[todo], index[todo] = rest.sq_dist, rest.index
    return Neighbours(index, values)


def knn(queries: torch.Tensor, points: torch.Tensor, k: int) -> Neighbours:
    """The k nearest points of each query, by exact squared Euclidean distance.

    Distances are formed as sums of squared coordinate differences (no ``|a|² + |b|² - 2ab``
    cancellation). Small problems compare every query with every point, in chunks of queries
    so that one chunk's distance matrix stays under 16 MB. Large ones (at least
    ``_GRID_MIN_PAIRS`` query×point pairs) first bucket the points in a grid of cubic cells
    and search only the cells around each query, accepting a result only when it provably
    equals the brute-force one (see ``_knn_grid``); either way the answer is the same.

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
    if queries.shape[0] * count < _GRID_MIN_PAIRS:
        return _knn_brute(queries, points, k)
    return _knn_grid(queries, points, k)


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
