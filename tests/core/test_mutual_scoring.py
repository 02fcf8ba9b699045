"""Mutual scoring (paper §III-C, Eq. 7–8) against literal per-sample loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from musc_core import hardware, mutual_scoring
from musc_core.mutual_scoring import (
    interval_average,
    pair_distances,
    pair_minima_untiled,
    reference_distances,
    resolve_distance_dtype,
)

# bfloat16 tolerance on unit-norm features: max abs error of a distance vs float64. The inputs
# are rounded to bf16 (≈2⁻⁹ relative per element) and the squared distance is rounded once,
# relative to itself; measured ≈2e-3 for random and ≈1e-3 for near-duplicate features.
BF16_ATOL = 5e-3


def literal_distance(a, b):
    """Eq. 7 for one patch vector a against one sample b (L2, C): min_n ||a − b(n)||."""
    return min(float(torch.linalg.norm(a.double() - b[n].double())) for n in range(b.shape[0]))


def literal_pair_distances(features):
    n, length, _ = features.shape
    out = torch.full((n, length, n), math.inf, dtype=torch.float64)
    for i in range(n):
        for m in range(length):
            for j in range(n):
                if j != i:
                    out[i, m, j] = literal_distance(features[i, m], features[j])
    return out


def literal_interval_average(features, ratio):
    n, length, _ = features.shape
    out = torch.zeros(n, length, dtype=torch.float64)
    for i in range(n):
        for m in range(length):
            scores = sorted(
                literal_distance(features[i, m], features[j]) for j in range(n) if j != i
            )
            k = max(1, math.floor(ratio * (n - 1)))
            out[i, m] = sum(scores[:k]) / k
    return out


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_pair_distances_and_interval_average_match_eq_7_8(n):
    torch.manual_seed(n)
    features = torch.randn(n, 5, 8)
    d = pair_distances(features, 2, torch.float32)
    want = literal_pair_distances(features)
    assert d.shape == (n, 5, n) and d.dtype == torch.float32
    assert torch.isinf(d.diagonal(dim1=0, dim2=2)).all()
    torch.testing.assert_close(d.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        interval_average(d, 0.3).double(),
        literal_interval_average(features, 0.3),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("n", [2, 3, 7])
def test_block_size_does_not_change_the_distances(n):
    torch.manual_seed(10 + n)
    features = torch.randn(n, 6, 8)
    results = [pair_distances(features, block, torch.float32) for block in (1, 2, 3, n)]
    for other in results[1:]:
        assert torch.equal(torch.isinf(other), torch.isinf(results[0]))
        # Equal up to the GEMM kernel's summation order (BLAS may pick a different kernel per
        # block shape); bitwise equality is not promised by BLAS.
        torch.testing.assert_close(other, results[0], rtol=1e-6, atol=1e-6)
    bf = [pair_distances(features, block, torch.bfloat16) for block in (1, 2, n)]
    for other in bf[1:]:
        torch.testing.assert_close(other, bf[0], rtol=1e-6, atol=1e-6)


def test_pair_minima_untiled_gives_both_directions_with_different_lengths():
    torch.manual_seed(2)
    a, b = torch.randn(3, 5, 7), torch.randn(2, 4, 7)
    result = pair_minima_untiled(a, b, torch.float32)
    assert result.a_to_b.shape == (3, 5, 2) and result.b_to_a.shape == (2, 4, 3)
    for i in range(3):
        for j in range(2):
            for m in range(5):
                assert result.a_to_b[i, m, j] == pytest.approx(literal_distance(a[i, m], b[j]))
            for n in range(4):
                assert result.b_to_a[j, n, i] == pytest.approx(literal_distance(b[j, n], a[i]))


def test_identical_patches_give_zero_distance_not_nan():
    torch.manual_seed(3)
    f = torch.randn(1, 6, 16) * 30.0
    result = pair_minima_untiled(f, f.clone(), torch.float32)
    assert torch.isfinite(result.a_to_b).all()
    # ||a||² ≈ 1.4e4 cancels in ||a||² + ||b||² − 2ab: the residue is ≈ ||a||·sqrt(eps_fp32),
    # clamped at 0 before the square root, so never NaN.
    norm = float(f.norm(dim=-1).max())
    assert float(result.a_to_b.max()) < 1e-3 * norm


def test_reference_distances_match_the_literal_definition():
    torch.manual_seed(4)
    queries, refs = torch.randn(3, 5, 6), torch.randn(4, 5, 6)
    for block in (1, 2, 4):
        got = reference_distances(queries, refs, block, torch.float32)
        assert got.shape == (3, 5, 4)
        for i in range(3):
            for m in range(5):
                for j in range(4):
                    assert got[i, m, j] == pytest.approx(
                        literal_distance(queries[i, m], refs[j]), rel=1e-5
                    )


@pytest.mark.parametrize("near", [False, True])
def test_bfloat16_stays_within_tolerance_of_float64(near):
    torch.manual_seed(5)
    features = F.normalize(torch.randn(5, 16, 64), dim=-1)
    if near:  # near-duplicate samples: small distances, where cancellation would hurt most
        features = F.normalize(features[:1] + 0.003 * torch.randn(5, 16, 64), dim=-1)
    want = literal_pair_distances(features)
    got = pair_distances(features, 2, torch.bfloat16)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    err = (got.double() - want)[finite].abs().max()
    assert err < BF16_ATOL, f"bf16 error {err:.2e}"
    if near:
        assert float(want[finite].mean()) < 0.05  # the case really has small distances


def test_resolve_distance_dtype(monkeypatch):
    assert resolve_distance_dtype("float32", torch.device("cpu")) == torch.float32
    if hardware.cpu_has_fast_bf16():
        assert resolve_distance_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
        assert resolve_distance_dtype("auto", "cpu") == torch.bfloat16
    else:
        with pytest.raises(ValueError, match="distance_dtype=bfloat16 needs native bfloat16"):
            resolve_distance_dtype("bfloat16", torch.device("cpu"))
        assert resolve_distance_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert resolve_distance_dtype("auto", "cpu") == torch.float32
    with pytest.raises(ValueError, match="Use distance_dtype=auto"):
        resolve_distance_dtype("bfloat16", "cpu")
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert resolve_distance_dtype("auto", "cpu") == torch.bfloat16
    assert resolve_distance_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError):
        resolve_distance_dtype("float16", "cpu")
    with pytest.raises(ValueError):
        pair_distances(torch.randn(2, 3, 4), 1, torch.float16)


def _bf16_accumulation(a, b):
    """A GEMM that accumulates in bfloat16 (rounding after every product): what must not run."""
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.bfloat16)
    for k in range(a.shape[1]):
        acc = (acc.float() + a[:, k, None].float() * b[None, :, k].float()).bfloat16()
    return acc


def test_bfloat16_gemm_accumulates_in_float32_and_rounds_once():
    """On this CPU's kernel, whichever it is (oneDNN on AVX512-BF16/AMX, torch's fallback on
    AVX2): each augmented-GEMM output is the exact dot product of the rounded operands up to
    float32 accumulation error (K·2⁻²⁴·Σ|a_k b_k|) and one bf16 rounding (2⁻⁹ relative)."""
    torch.manual_seed(10)
    base = F.normalize(torch.randn(1, 1, 384), dim=-1)
    features = F.normalize(base + 0.005 * torch.randn(4, 24, 384), dim=-1)  # small distances
    left = mutual_scoring._prepare(features[:2], torch.bfloat16, "a")
    right = mutual_scoring._prepare(features[2:], torch.bfloat16, "b")
    got = mutual_scoring._squared_distances(left, right, None).double()
    a, b = left.vectors.double(), right.vectors.double()
    exact = a @ b.T
    accumulation = a.shape[1] * 2.0**-24 * (a.abs() @ b.abs().T)
    bound = 2.0**-9 * (exact.abs() + accumulation) + accumulation
    assert float(exact.median()) < 0.05  # cancellation-heavy: d² ≪ the norms (≈ 1 + 1)
    assert bool(((got - exact).abs() <= bound).all())
    # the bound separates the kernels: accumulating in bf16 breaks it
    wrong = _bf16_accumulation(left.vectors, right.vectors).double()
    assert not bool(((wrong - exact).abs() <= bound).all())


def test_interval_average_by_hand():
    inf = math.inf
    d = torch.tensor(
        [
            [[inf, 4.0, 1.0, 3.0, 2.0, 9.0, 8.0, 7.0]],  # 7 valid → k = 2 → (1 + 2) / 2
            [[5.0, inf, inf, inf, inf, inf, inf, inf]],  # 1 valid → k = max(1, 0) = 1
            [[6.0, 2.0, inf, inf, 4.0, inf, inf, 1.0]],  # 4 valid → k = 1 (reference: NaN)
        ]
    )
    torch.testing.assert_close(interval_average(d, 0.3), torch.tensor([[1.5], [5.0], [1.0]]))
    # ratio 1: mean of every valid reference
    torch.testing.assert_close(interval_average(d, 1.0)[0], torch.tensor([34.0 / 7]))
    with pytest.raises(ValueError):
        interval_average(torch.full((1, 2, 3), inf), 0.3)


def test_interval_average_k_follows_interval_count():
    torch.manual_seed(6)
    for r in (1, 2, 3, 4, 9, 10, 11, 33):
        d = torch.rand(2, 3, r)
        k = max(1, math.floor(0.3 * r + 1e-9))
        want = d.sort(dim=-1).values[..., :k].mean(-1)
        torch.testing.assert_close(interval_average(d, 0.3), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_integer_minima_equal_clamped_float_minima(dtype):
    torch.manual_seed(7)
    values = torch.randn(6, 50).to(dtype) * torch.logspace(-30, 3, 50).to(dtype)
    values[0, :10] = -0.0
    values[1] = values[1].abs()
    values[2, 5] = math.inf
    values[3] = -values[3].abs()  # all negative: rounding residue of near-duplicates
    keys = mutual_scoring._order_keys(values)
    got = mutual_scoring._distances(keys.amin(dim=1), dtype)
    want = values.float().amin(dim=1).clamp_min(0.0).sqrt()
    assert torch.equal(got, want)


def test_chunks_cover_the_range_with_near_equal_parts():
    assert mutual_scoring._chunks(3, 3, 4) == []
    assert mutual_scoring._chunks(0, 9, 8) == [(0, 4), (4, 9)]
    assert mutual_scoring._chunks(2, 10, 4) == [(2, 6), (6, 10)]
    for start, stop, block in [(0, 40, 8), (5, 39, 7), (1, 2, 3)]:
        parts = mutual_scoring._chunks(start, stop, block)
        assert parts[0][0] == start and parts[-1][1] == stop
        assert all(a1 == b0 for (_, a1), (b0, _) in zip(parts, parts[1:], strict=False))
        sizes = [b - a for a, b in parts]
        assert max(sizes) <= block and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_strips_equal_the_accelerator_block_layout(monkeypatch, dtype):
    """One sample per GEMM (CPU) and blocks of samples per GEMM (accelerators) agree."""
    torch.manual_seed(8)
    features = F.normalize(torch.randn(7, 9, 12), dim=-1)
    queries, refs = features[:3], features[3:]
    strips = [
        pair_distances(features, 3, dtype),
        reference_distances(queries, refs, 2, dtype),
        pair_minima_untiled(queries, refs, dtype),
    ]
    monkeypatch.setattr(mutual_scoring, "_strip", lambda device, block: block)
    blocks = [
        pair_distances(features, 3, dtype),
        reference_distances(queries, refs, 2, dtype),
        pair_minima_untiled(queries, refs, dtype),
    ]
    for got, want in zip(strips[:2] + list(strips[2]), blocks[:2] + list(blocks[2]), strict=True):
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mirrored_right_operand_equals_a_fresh_one(monkeypatch, dtype):
    torch.manual_seed(9)
    features = torch.randn(3, 5, 13) * 4
    monkeypatch.setattr(mutual_scoring, "_NORM_BLOCK_ELEMENTS", 20)  # norms in blocks of rows
    left = mutual_scoring._prepare(features, dtype, "a")
    fresh = mutual_scoring._prepare(features, dtype, "b")
    mirrored = mutual_scoring._mirror(left, 13)
    assert torch.equal(mirrored.vectors, fresh.vectors)
    monkeypatch.undo()
    assert torch.equal(mutual_scoring._prepare(features, dtype, "a").vectors, left.vectors)
