"""Which references each sample is scored against, and which blocks of pairs that needs (§8.3).

Pair distances are computed in blocks of samples: a *block pair* (a, b) gives the distances of
every sample of block a to every sample of block b and back (one GEMM serves both directions).
With no reference budget every sample is scored against all the others, which needs every
block pair once: O(N²). With a budget R each sample is scored against at most R references,
chosen deterministically from the blocks nearest to its own on a cycle of the blocks (its own
block first, then the next block, the previous one, the one after next, ...): O(N·R) pairs.
The blocks' order is the caller's; the pipeline orders samples by a hash of their content, so
neighbouring blocks are an unbiased draw from the line rather than, say, one defect folder.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple


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


def reference_plan(block_sizes: Sequence[int], budget: int | None = None) -> ReferencePlan:
    """Deterministic reference sets for a pool of samples laid out in blocks.

    Args:
        block_sizes: number of samples of each block, in pool order (samples are numbered
            block after block).
        budget: R, the most references a sample is scored against; None (or R ≥ N − 1) for
            all the other samples.

    Returns:
        The plan. Each sample gets ``min(R, N − 1)`` references: the other samples of its
        block, then the samples of the blocks in :func:`_cycle_order`, each block in sample
        order, the last block possibly in part.
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
    wanted = total - 1 if budget is None else min(budget, total - 1)
    block_of = [b for b, size in enumerate(block_sizes) for _ in range(size)]
    references: list[list[int]] = []
    pairs: set[tuple[int, int]] = set()
    for block in range(num_blocks):
        for sample in range(starts[block], starts[block + 1]):
            chosen: list[int] = []
            for other in _cycle_order(block, num_blocks):
                if len(chosen) == wanted:
                    break
                candidates = [j for j in range(starts[other], starts[other + 1]) if j != sample]
                take = candidates[: wanted - len(chosen)]
                if take:
                    chosen.extend(take)
                    pairs.add((min(block, other), max(block, other)))
            references.append(chosen)
    return ReferencePlan(references, sorted(pairs), block_of)
