"""CAE (paper §III-C, Eq. 10–11) against a literal loop-by-loop implementation."""

import statistics

import pytest
import torch

from musc_core.cross_modal import (
    Projection,
    cross_modal_enhance,
    cross_modal_enhance_batch,
    projection_lists,
    rank_remap,
)


def literal_patch_of_group(centre_pixel, image_size, patch_size):
    """For each group: the patch m whose pixel block contains the centre pixel."""
    side = image_size // patch_size
    out = []
    for pixel in centre_pixel.tolist():
        y, x = divmod(pixel, image_size)
        for m in range(side * side):
            top, left = (m // side) * patch_size, (m % side) * patch_size
            if top <= y < top + patch_size and left <= x < left + patch_size:
                out.append(m)
    return out


def literal_remap(src, tgt):
    """Flat lists: the k-th smallest entry of tgt (ties by position) gets src's k-th smallest."""
    values = sorted(src)
    order = sorted(range(len(tgt)), key=lambda t: (tgt[t], t))
    out = [0.0] * len(tgt)
    for rank, position in enumerate(order):
        out[position] = values[rank]
    return out


def literal_std(row):
    return statistics.stdev(row) if len(row) > 1 else 0.0


def literal_cae(d2, d3, patch_of_group):
    """CAE as docs/method.md states it, step by step with Python lists."""
    d2, d3 = d2.double().tolist(), d3.double().tolist()
    m_count, r = len(d2), len(d2[0])
    g_count = len(d3)
    groups_of = [[p for p in range(g_count) if patch_of_group[p] == m] for m in range(m_count)]
    x2 = [[0.0] * r for _ in range(m_count)]
    for m in range(m_count):
        for j in range(r):
            if groups_of[m]:
                x2[m][j] = sum(d3[p][j] for p in groups_of[m]) / len(groups_of[m])
    x3 = [[d2[patch_of_group[p]][j] for j in range(r)] for p in range(g_count)]
    lam2 = [
        1.0 - v
        for v in literal_remap([literal_std(row) for row in d2], [literal_std(row) for row in x2])
    ]
    lam3 = [
        1.0 - v
        for v in literal_remap([literal_std(row) for row in d3], [literal_std(row) for row in x3])
    ]
    flat = literal_remap([v for row in d3 for v in row], [v for row in x3 for v in row])
    x3 = [flat[p * r : (p + 1) * r] for p in range(g_count)]
    filled = [m for m in range(m_count) if groups_of[m]]
    flat = literal_remap(
        [d2[m][j] for m in filled for j in range(r)], [x2[m][j] for m in filled for j in range(r)]
    )
    for idx, m in enumerate(filled):
        x2[m] = flat[idx * r : (idx + 1) * r]
    e2 = [[max(d2[m][j], x2[m][j]) * lam2[m] for j in range(r)] for m in range(m_count)]
    e3 = [[max(d3[p][j], x3[p][j]) * lam3[p] for j in range(r)] for p in range(g_count)]
    flat = literal_remap([v for row in d2 for v in row], [v for row in e2 for v in row])
    e2 = [flat[m * r : (m + 1) * r] for m in range(m_count)]
    flat = literal_remap([v for row in d3 for v in row], [v for row in e3 for v in row])
    e3 = [flat[p * r : (p + 1) * r] for p in range(g_count)]
    out2 = [[(d2[m][j] + e2[m][j]) / 2 for j in range(r)] for m in range(m_count)]
    out3 = [[(d3[p][j] + e3[p][j]) / 2 for j in range(r)] for p in range(g_count)]
    return torch.tensor(out2, dtype=torch.float64), torch.tensor(out3, dtype=torch.float64)


def test_projection_lists_match_the_pixel_blocks():
    torch.manual_seed(0)
    size, patch = 16, 4
    centre_pixel = torch.randint(0, size * size, (9,))
    proj = projection_lists(centre_pixel, size, patch)
    want = literal_patch_of_group(centre_pixel, size, patch)
    assert proj.patch_of_group.tolist() == want
    assert proj.group_count.tolist() == [want.count(m) for m in range(16)]
    assert proj.patch_of_group.dtype == torch.long and proj.group_count.dtype == torch.long


def test_rank_remap_by_hand():
    src = torch.tensor([10.0, 30.0, 20.0])
    tgt = torch.tensor([0.5, 0.1, 0.9])
    assert rank_remap(src, tgt).tolist() == [20.0, 10.0, 30.0]
    # ties in tgt are broken by position (stable)
    assert rank_remap(src, torch.tensor([1.0, 1.0, 0.0])).tolist() == [20.0, 30.0, 10.0]
    # shape follows tgt, values come from src
    out = rank_remap(torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([[0.2, 0.1], [0.4, 0.3]]))
    assert out.tolist() == [[2.0, 1.0], [4.0, 3.0]]
    with pytest.raises(ValueError):
        rank_remap(torch.zeros(3), torch.zeros(4))


@pytest.mark.parametrize("r", [5, 2, 1])
def test_cae_matches_the_literal_loops(r):
    torch.manual_seed(r)
    size, patch = 16, 4  # M = 16 patches
    centre_pixel = torch.cat([torch.randint(0, 64, (5,)), torch.randint(128, 256, (3,))])
    proj = projection_lists(centre_pixel, size, patch)
    assert (proj.group_count == 0).any() and (proj.group_count > 1).any()
    d2 = torch.rand(16, r) + 0.5
    d3 = torch.rand(8, r) * 0.1
    got2, got3 = cross_modal_enhance(d2, d3, proj)
    want2, want3 = literal_cae(d2, d3, proj.patch_of_group.tolist())
    torch.testing.assert_close(got2.double(), want2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got3.double(), want3, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(got2).all() and torch.isfinite(got3).all()


@pytest.mark.parametrize("ties", [False, True])
def test_cae_over_stacked_layers_equals_each_layer_alone(ties):
    torch.manual_seed(11)
    centre_pixel = torch.cat([torch.randint(0, 64, (30,)), torch.randint(128, 256, (20,))])
    proj = projection_lists(centre_pixel, 16, 4)
    d2, d3 = torch.rand(4, 16, 9) + 0.5, torch.rand(4, 50, 9) * 0.1
    if ties:  # many equal values: the stable tie order must hold layer by layer
        d2, d3 = (d2 * 8).round() / 8, (d3 * 40).round() / 40
    e2, e3 = cross_modal_enhance(d2, d3, proj)
    assert e2.shape == d2.shape and e3.shape == d3.shape
    for y in range(4):
        s2, s3 = cross_modal_enhance(d2[y], d3[y], proj)
        assert torch.equal(e2[y], s2) and torch.equal(e3[y], s3)
        if not ties:  # (the float64 literal twin breaks float32 ties differently)
            want2, want3 = literal_cae(d2[y], d3[y], proj.patch_of_group.tolist())
            torch.testing.assert_close(e2[y].double(), want2, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(e3[y].double(), want3, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        cross_modal_enhance(d2, d3[:3], proj)


def test_cae_batch_equals_per_sample_calls():
    torch.manual_seed(7)
    projections = [
        projection_lists(torch.randint(0, 256, (6,)), 16, 4),
        projection_lists(torch.randint(0, 256, (6,)), 16, 4),
    ]
    d2, d3 = torch.rand(2, 16, 3), torch.rand(2, 6, 3)
    b2, b3 = cross_modal_enhance_batch(d2, d3, projections)
    for i, proj in enumerate(projections):
        s2, s3 = cross_modal_enhance(d2[i], d3[i], proj)
        assert torch.equal(b2[i], s2) and torch.equal(b3[i], s3)


def test_rank_remap_orders_negatives_zeros_infinities_and_ties_like_the_literal_remap():
    torch.manual_seed(3)
    special = torch.tensor([-0.0, 0.0, -1.5, float("inf"), -float("inf"), 1e-30, -1e-30, 2.0])
    tgt = torch.cat([special, (torch.randn(500) * 4).round() / 4, special])  # many exact ties
    src = torch.randn(tgt.numel())
    got = rank_remap(src, tgt)
    # Python's float order: -0.0 == 0.0 (a tie, kept in position order), as torch's stable sort.
    want = literal_remap(src.tolist(), tgt.tolist())
    assert got.tolist() == want
    want_torch = torch.empty_like(src)
    want_torch[torch.sort(tgt, stable=True).indices] = torch.sort(src).values
    assert torch.equal(got, want_torch)


def test_cae_rejects_mismatched_projection():
    proj = Projection(torch.zeros(4, dtype=torch.long), torch.tensor([4, 0, 0]))
    with pytest.raises(ValueError):
        cross_modal_enhance(torch.rand(4, 2), torch.rand(4, 2), proj)


def test_cae_is_discontinuous_at_near_ties():
    """A known property the bf16 tolerance has to live with: rank remapping jumps at ties.

    Moving one target value by 2e-4 past its neighbour swaps their ranks, and the output moves
    by the gap between the neighbouring source values (0.7 here). CAE remaps four times, so
    any perturbation of the pair scores — bf16 rounding or float32 kernels of another CPU —
    can move a patch whose scores are nearly tied by far more than the perturbation itself.
    """
    src = torch.tensor([0.1, 0.2, 0.9])
    before = rank_remap(src, torch.tensor([0.5, 0.5001, 0.0]))
    after = rank_remap(src, torch.tensor([0.5002, 0.5001, 0.0]))
    assert before.tolist() == pytest.approx([0.2, 0.9, 0.1])
    assert after.tolist() == pytest.approx([0.9, 0.2, 0.1])

