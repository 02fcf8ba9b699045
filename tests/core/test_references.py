"""Reference plans: every sample's references and the block pairs they need."""

import itertools

import pytest

from musc_core.references import reference_plan


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
