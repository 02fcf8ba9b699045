"""Reference plans: every sample's references and the block pairs they need."""

import itertools

import pytest
import torch

from musc_core import references
from musc_core.references import reference_plan, similar_blocks, similarity_tour


def _blocks(sizes):
    out, start = [], 0
    for size in sizes:
        out.append(list(range(start, start + size)))
        start += size
    return out


@pytest.mark.parametrize("sizes", [[2], [3, 3], [4, 4, 1], [1, 1, 1, 1, 1], [5, 2, 3, 4]])
def test_without_budget_every_sample_is_scored_against_all_others(sizes):
    plan = reference_plan(sizes)
    n = sum(sizes)
    for i, refs in enumerate(plan.references):
        assert sorted(refs) == [j for j in range(n) if j != i]
    pairs = {(a, b) for a in range(len(sizes)) for b in range(a, len(sizes))}
    if any(s == 1 for s in sizes):  # a single-sample block needs no pairs inside itself
        pairs -= {(a, a) for a, s in enumerate(sizes) if s == 1}
    assert set(plan.block_pairs) == pairs


@pytest.mark.parametrize(
    ("sizes", "budget"), [([4, 4, 4, 4], 5), ([3, 3, 3, 3, 3], 2), ([2, 5, 3], 6), ([4, 4], 100)]
)
def test_budget_caps_references_and_the_pairs_cover_exactly_what_is_used(sizes, budget):
    plan = reference_plan(sizes, budget)
    n = sum(sizes)
    block_of = [b for b, block in enumerate(_blocks(sizes)) for _ in block]
    assert plan.block_of == block_of
    used = set()
    for i, refs in enumerate(plan.references):
        assert len(refs) == min(budget, n - 1)
        assert i not in refs and len(set(refs)) == len(refs)
        own = [j for j in _blocks(sizes)[block_of[i]] if j != i]
        assert refs[: len(own)] == own[: len(refs)]  # own block first
        used |= {tuple(sorted((block_of[i], block_of[j]))) for j in refs}
    assert set(plan.block_pairs) == used


def test_budget_takes_nearest_blocks_on_the_cycle_first():
    # 5 blocks of 2, budget 3: own partner, then block +1 (2 samples): never block -1.
    plan = reference_plan([2] * 5, 3)
    assert plan.references[0] == [1, 2, 3]
    assert plan.references[9] == [8, 0, 1]  # block 4's next block on the cycle is block 0
    # Work grows linearly: each block pairs with itself and its successor.
    assert len(plan.block_pairs) == 10


def test_plan_is_deterministic_and_rejects_bad_input():
    assert reference_plan([3, 2, 4], 4) == reference_plan([3, 2, 4], 4)
    with pytest.raises(ValueError):
        reference_plan([1])
    with pytest.raises(ValueError):
        reference_plan([2, 0])
    with pytest.raises(ValueError):
        reference_plan([2, 2], 0)


def test_block_pairs_are_sorted_and_unique():
    plan = reference_plan([2, 3, 2, 3], 4)
    assert plan.block_pairs == sorted(set(plan.block_pairs))
    assert all(a <= b for a, b in plan.block_pairs)
    assert not any(p == q for p, q in itertools.pairwise(plan.block_pairs))


def _brute_tour(descriptors):
    """Nearest-neighbour tour by the definition: from 0, the most similar unplaced sample."""
    units = [d / d.norm() for d in descriptors.double()]
    order, left = [0], set(range(1, len(units)))
    while left:
        last = units[order[-1]]
        best = max(sorted(left), key=lambda j: (float(last @ units[j]), -j))
        order.append(best)
        left.remove(best)
    return order


def test_tour_moves_to_the_most_similar_sample_left():
    # Unit vectors at 0°, 50°, 10°, 30° (by hand: 0 → 10° → 30° → 50°).
    angles = torch.deg2rad(torch.tensor([0.0, 50.0, 10.0, 30.0]))
    descriptors = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[1.0], [3.0],
                                                                                  [0.5], [2.0]])
    assert similarity_tour(descriptors) == [0, 2, 3, 1]


@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_tour_equals_the_brute_force_tour(n):
    descriptors = torch.randn(n, 5, generator=torch.Generator().manual_seed(n))
    order = similarity_tour(descriptors)
    assert order == _brute_tour(descriptors)
    assert sorted(order) == list(range(n))


def test_large_batches_are_toured_in_segments(monkeypatch):
    monkeypatch.setattr(references, "TOUR_SEGMENT", 4)
    descriptors = torch.randn(10, 3, generator=torch.Generator().manual_seed(1))
    order = similarity_tour(descriptors)
    expected = []
    for start in (0, 4, 8):
        expected += [start + i for i in _brute_tour(descriptors[start : start + 4])]
    assert order == expected


def test_similar_blocks_rank_by_cosine_similarity_with_ties_in_index_order():
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [2.0, 0.0], [1.0, 1.0]])
    ranked = similar_blocks(centroids, 4)
    for b, row in enumerate(ranked):
        units = torch.nn.functional.normalize(centroids.double(), dim=1)
        expected = sorted((o for o in range(5) if o != b),
                          key=lambda o: (-float(units[b] @ units[o]), o))
        assert row == expected
    assert ranked[0][0] == 3  # the same direction (a tie with nothing): first
    assert similar_blocks(centroids, 2) == [row[:2] for row in ranked]
    assert similar_blocks(centroids[:1], 3) == [[]]


def test_preferred_blocks_come_first_then_the_cycle():
    # 4 blocks of 2; block 0 prefers block 2, then the cycle (+1, −1): blocks 1, 3.
    plan = reference_plan([2, 2, 2, 2], 5, preferred=[[2], [], [], []])
    assert plan.references[0] == [1, 4, 5, 2, 3]
    assert plan.references[2] == [3, 4, 5, 0, 1]  # block 1 keeps the plain cycle order
    used = {tuple(sorted((plan.block_of[i], plan.block_of[j])))
            for i, refs in enumerate(plan.references) for j in refs}
    assert set(plan.block_pairs) == used
    with pytest.raises(ValueError, match="preferred"):
        reference_plan([2, 2], 1, preferred=[[1]])
