"""RsCon (paper §III-D, Eq. 14–15) on small hand-built examples."""

import pytest
import torch
import torch.nn.functional as F

from musc_core.rescoring import rscon, salient_features


def literal_window_scores(w, c, k):
    """Row i: keep the k largest W[i, j], normalize them to sum 1, weight c_j."""
    n = len(c)
    out = []
    for i in range(n):
        nearest = sorted(range(n), key=lambda j: -w[i][j])[:k]
        total = sum(w[i][j] for j in nearest)
        out.append(sum(w[i][j] / total * c[j] for j in nearest))
    return out


def normalized(scores):
    lo, hi = min(scores), max(scores)
    return [(s - lo) / (hi - lo) for s in scores]


def test_rscon_is_half_c_plus_p7_c():
    torch.manual_seed(0)
    feats = F.normalize(torch.rand(8, 5), dim=-1)  # unit norm, positive → W[i, i] is the max
    scores = torch.rand(8) * 3 + 1
    w = [[float(feats[i] @ feats[j]) for j in range(8)] for i in range(8)]
    c = normalized(scores.tolist())
    p7c = literal_window_scores(w, c, 7)
    want = [(ci + pi) / 2 for ci, pi in zip(c, p7c, strict=True)]
    got = rscon(scores, feats, (1, 7))
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64))
    # the window of 7 really drops one sample per row
    assert not torch.allclose(got, rscon(scores, feats, (1, 8)))


def test_rscon_with_a_given_similarity_matrix():
    # Features whose Gram matrix is a chosen W (Cholesky factor).
    w = torch.tensor(
        [[4.0, 2.0, 1.0, 0.5], [2.0, 5.0, 1.5, 1.0], [1.0, 1.5, 3.0, 0.2], [0.5, 1.0, 0.2, 2.0]],
        dtype=torch.float64,
    )
    feats = torch.linalg.cholesky(w)
    scores = torch.tensor([0.2, 0.9, 0.4, 0.6], dtype=torch.float64)
    c = normalized(scores.tolist())  # [0, 1, 2/7, 4/7]
    w_list = w.tolist()
    for windows in [(1, 2), (2,), (1, 7)]:
        per_window = [literal_window_scores(w_list, c, min(k, 4)) for k in windows]
        want = [sum(v) / len(windows) for v in zip(*per_window, strict=True)]
        got = rscon(scores, feats, windows)
        torch.testing.assert_close(
            got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6
        )
    # row 0, window 2: neighbours 0 and 1 with weights 4 and 2 → (4·0 + 2·1) / 6
    assert rscon(scores, feats, (2,))[0] == pytest.approx(2 / 6)


def test_rscon_with_fewer_samples_than_the_window():
    feats = F.normalize(torch.rand(3, 4), dim=-1)
    scores = torch.tensor([1.0, 2.0, 4.0])
    got = rscon(scores, feats, (1, 7))
    w = (feats @ feats.T).tolist()
    c = normalized(scores.tolist())
    pall = literal_window_scores(w, c, 3)
    torch.testing.assert_close(
        got, torch.tensor([(a + b) / 2 for a, b in zip(c, pall, strict=True)])
    )


def test_rscon_equal_scores_give_zeros():
    got = rscon(torch.ones(4), torch.rand(4, 3), (1, 7))
    assert torch.equal(got, torch.zeros(4))


def test_salient_features_take_the_argmax_patch():
    torch.manual_seed(1)
    scores = torch.rand(3, 6)
    feats = torch.randn(3, 6, 4)
    got = salient_features(scores, feats)
    for i in range(3):
        best = max(range(6), key=lambda m: float(scores[i, m]))
        assert torch.equal(got[i], feats[i, best])


@pytest.mark.parametrize("rows", [1, 7, 50])
def test_rscon_in_row_blocks_matches_the_literal_definition(rows):
    torch.manual_seed(2)
    n = 50
    feats = F.normalize(torch.rand(n, 8, dtype=torch.float64), dim=-1)
    scores = torch.rand(n, dtype=torch.float64)
    w = (feats @ feats.T).tolist()
    c = normalized(scores.tolist())
    per_window = [literal_window_scores(w, c, k) for k in (1, 7)]
    want = torch.tensor([sum(v) / 2 for v in zip(*per_window, strict=True)], dtype=torch.float64)
    got = rscon(scores, feats, (1, 7), block_entries=rows * n)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # row blocks agree with the whole matrix to float32 rounding (a GEMM of fewer rows may sum
    # in another order)
    whole = rscon(scores, feats, (1, 7), block_entries=n * n)
    torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-7)
