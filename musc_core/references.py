"""Which references each sample is scored against, and which blocks of pairs that needs (§8.3).

Pair distances are computed in blocks of samples: a *block pair* (a, b) gives the distances of
every sample of block a to every sample of block b and back (one GEMM serves both directions).
With no reference budget every sample is scored against all the others, which needs every
block pair once: O(N²). With a budget R each sample is scored against at most R references,
chosen deterministically from the blocks nearest to its own on a cycle of the blocks (its own
block first, then the next block, the previous one, the one after next, ...): O(N·R) pairs.
The blocks' order is the caller's; the pipeline orders samples by a hash of their content, so
neighbouring blocks are an unbiased draw from the line rather than, say, one defect folder.

*Similar* references (``reference_choice="similar"``) take the samples that look most alike
instead of arbitrary ones: a sample's normal patches then find closer matches among its R
references, while a defect stays unlike anything. Shards must stay blocks, so the choice is
made in two block-compatible steps: :func:`similarity_tour` lays a batch's samples out along a
nearest-neighbour tour of a cheap global descriptor (consecutive samples, hence a block, are
alike), and :func:`similar_blocks` ranks, for each block, the other blocks by the similarity of
their mean descriptors; :func:`reference_plan` then takes the sample's own block and the most
similar blocks first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

#: Most samples one tour orders at once: its (n, n) float64 similarity matrix takes n² · 8 bytes
#: (128 MiB here); a larger batch is toured in consecutive segments of this many samples.
TOUR_SEGMENT = 4096


class ReferencePlan(NamedTuple):
    """References of every sample of a pool and the block pairs they need.

    Attributes:
        references: one list per sample (pool order) of the pool indices of its references,
            in the order they were chosen; never the sample itself.
        block_pairs: sorted unordered block pairs ``(a, b)``, ``a <= b``, whose distances the
            references need (``(a, a)``: the pairs inside block a).
        block_of: block index of each sample.
    """

    references: list[list[int]]
    block_pairs: list[tuple[int, int]]
    block_of: list[int]


def _cycle_order(block: int, num_blocks: int) -> Iterator[int]:
    """Blocks by cyclic distance from ``block``: itself, +1, −1, +2, −2, … (each once).

    Lazy: a sample with a budget takes only the first few, so a pool of many blocks does not
    pay for the whole order of every block.
    """
    yield block
    seen = {block}
    for step in range(1, num_blocks):
        for candidate in ((block + step) % num_blocks, (block - step) % num_blocks):
            if candidate not in seen:
                seen.add(candidate)
                yield candidate
        if len(seen) == num_blocks:
            return


def _block_order(block: int, num_blocks: int, preferred: Sequence[int]) -> Iterator[int]:
    """``block``, then ``preferred``, then the rest in :func:`_cycle_order` (each once)."""
    yield block
    seen = {block}
    for other in preferred:
        if other not in seen:
            seen.add(other)
            yield other
    for other in _cycle_order(block, num_blocks):
        if other not in seen:
            seen.add(other)
            yield other


def similarity_tour(descriptors: torch.Tensor) -> list[int]:
    """Samples in nearest-neighbour tour order of their global descriptors.

    The tour starts at sample 0 and always moves to the most similar sample not yet placed
    (cosine similarity; ties go to the lowest index), so consecutive samples are alike. More
    than :data:`TOUR_SEGMENT` samples are toured in consecutive segments of that many.

    Args:
        descriptors: (n, C) descriptors, one per sample, in the caller's order.

    Returns:
        A permutation of ``range(n)``.
    """
    n = descriptors.shape[0]
    units = torch.nn.functional.normalize(descriptors.double(), dim=1)
    order: list[int] = []
    for start in range(0, n, TOUR_SEGMENT):
        segment = units[start : start + TOUR_SEGMENT]
        similarity = segment @ segment.T
        placed = torch.zeros(segment.shape[0], dtype=torch.bool)
        current = 0
        for _ in range(segment.shape[0]):
            order.append(start + current)
            placed[current] = True
            if bool(placed.all()):
                break
            current = int(similarity[current].masked_fill(placed, float("-inf")).argmax())
    return order


def similar_blocks(centroids: torch.Tensor, count: int) -> list[list[int]]:
    """Per block, the ``count`` other blocks most similar to it, most similar first.

    Args:
        centroids: (B, C) one descriptor per block (the mean of its samples' descriptors).
        count: how many other blocks to rank per block (at most B − 1).

    Returns:
        B lists of block indices, by decreasing cosine similarity (ties: lower index first).
    """
    num_blocks = centroids.shape[0]
    count = min(count, num_blocks - 1)
    if count <= 0:
        return [[] for _ in range(num_blocks)]
    units = torch.nn.functional.normalize(centroids.double(), dim=1)
    similarity = units @ units.T
    similarity.fill_diagonal_(float("-inf"))
    # A stable sort keeps ties in index order, which topk does not promise.
    ranked = torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, :count]
    return [[int(b) for b in row] for row in ranked]


def reference_plan(
    block_sizes: Sequence[int],
    budget: int | None = None,
    preferred: Sequence[Sequence[int]] | None = None,
) -> ReferencePlan:
    """Deterministic reference sets for a pool of samples laid out in blocks.

    Args:
        block_sizes: number of samples of each block, in pool order (samples are numbered
            block after block).
        budget: R, the most references a sample is scored against; None (or R ≥ N − 1) for
            all the other samples.
        preferred: per block, other blocks to take references from first, in that order
            (:func:`similar_blocks`); None for the cycle order alone.

    Returns:
        The plan. Each sample gets ``min(R, N − 1)`` references: the other samples of its
        block, then the samples of its ``preferred`` blocks, then of the remaining blocks in
        :func:`_cycle_order`, each block in sample order, the last block possibly in part.
    """
    if any(size <= 0 for size in block_sizes):
        raise ValueError(f"blocks must not be empty: {list(block_sizes)}")
    if budget is not None and budget < 1:
        raise ValueError(f"reference budget must be at least 1, got {budget}")
    starts = [0]
    for size in block_sizes:
        starts.append(starts[-1] + size)
    total = starts[-1]
    if total < 2:
        raise ValueError(f"mutual scoring needs at least 2 samples, got {total}")
    num_blocks = len(block_sizes)
    if preferred is not None and len(preferred) != num_blocks:
        raise ValueError(f"preferred blocks for {len(preferred)} blocks, the pool has {num_blocks}")
    wanted = total - 1 if budget is None else min(budget, total - 1)
    block_of = [b for b, size in enumerate(block_sizes) for _ in range(size)]
    references: list[list[int]] = []
    pairs: set[tuple[int, int]] = set()
    for block in range(num_blocks):
        for sample in range(starts[block], starts[block + 1]):
            chosen: list[int] = []
            order = _block_order(block, num_blocks, preferred[block] if preferred else ())
            for other in order:
                if len(chosen) == wanted:
                    break
                candidates = [j for j in range(starts[other], starts[other + 1]) if j != sample]
                take = candidates[: wanted - len(chosen)]
                if take:
                    chosen.extend(take)
                    pairs.add((min(block, other), max(block, other)))
            references.append(chosen)
    return ReferencePlan(references, sorted(pairs), block_of)
