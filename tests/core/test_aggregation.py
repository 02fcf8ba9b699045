"""SNAMD (paper §III-B) against literal window loops."""

import math

import pytest
import torch

from musc_core import aggregation
from musc_core.aggregation import snamd_2d, snamd_3d


def literal_snamd_2d(tokens, side, degrees):
    """Per sample, per patch, per degree: loop over the r×r window of the zero-padded grid."""
    n, m, c = tokens.shape
    t = tokens.double()
    out = torch.zeros(n, m, c, dtype=torch.float64)
    for i in range(n):
        grid = t[i].reshape(side, side, c)
        for y in range(side):
            for x in range(side):
                centre = grid[y, x]
                total = torch.zeros(c, dtype=torch.float64)
                for r in degrees:
                    num = torch.zeros(c, dtype=torch.float64)
                    den = 0.0
                    for dy in range(-(r // 2), r // 2 + 1):
                        for dx in range(-(r // 2), r // 2 + 1):
                            yy, xx = y + dy, x + dx
                            if 0 <= yy < side and 0 <= xx < side:
                                f = grid[yy, xx]
                            else:
                                f = torch.zeros(c, dtype=torch.float64)  # zero padding
                            w = math.exp(-float(torch.linalg.norm(f - centre)))
                            num += w * f
                            den += w
                    total += num / den
                total /= len(degrees)
                out[i, y * side + x] = total / torch.linalg.norm(total)
    return out


def literal_snamd_3d(tokens, centres, curvature, degrees, threshold):
    n, g, c = tokens.shape
    out = torch.zeros(n, g, c, dtype=torch.float64)
    for i in range(n):
        feats = [tokens[i, p].double() / torch.linalg.norm(tokens[i, p].double()) for p in range(g)]
        for p in range(g):
            if curvature[i, p] >= threshold:
                out[i, p] = feats[p]
                continue
            others = sorted(
                (q for q in range(g) if q != p),
                key=lambda q: float(torch.linalg.norm(centres[i, q] - centres[i, p])),
            )
            order = [p] + others  # itself first
            cat = []
            for r in degrees:
                num = torch.zeros(c, dtype=torch.float64)
                den = 0.0
                for q in order[:r]:
                    w = math.exp(-float(torch.linalg.norm(feats[q] - feats[p])))
                    num += w * feats[q]
                    den += w
                cat.extend((num / den).tolist())
            d = len(degrees)
            out[i, p] = torch.tensor([sum(cat[d * k : d * k + d]) / d for k in range(c)])
    return out


@pytest.mark.parametrize("side,degrees", [(5, (1, 3, 5)), (4, (1, 3, 5)), (6, (1, 3)), (3, (5,))])
def test_snamd_2d_matches_literal_window_loops(side, degrees):
    torch.manual_seed(side)
    tokens = torch.randn(2, side * side, 6) * 0.7
    got = snamd_2d(tokens, side, degrees)
    want = literal_snamd_2d(tokens, side, degrees)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert got.shape == tokens.shape and got.dtype == tokens.dtype


def test_snamd_2d_chunks_do_not_change_the_result(monkeypatch):
    torch.manual_seed(1)
    tokens = torch.randn(5, 16, 4)
    whole = snamd_2d(tokens, 4)
    monkeypatch.setattr(aggregation, "_CHUNK_ELEMENTS", 1)  # one sample per chunk
    torch.testing.assert_close(snamd_2d(tokens, 4), whole, rtol=0, atol=1e-7)


def test_snamd_2d_padded_positions_weigh_in_the_denominator():
    # 1×1 grid, degree 3: eight padded neighbours with f = 0 and weight exp(-||f_m||).
    f = torch.tensor([0.3, -0.4])  # ||f|| = 0.5
    got = aggregation._snamd_2d_chunk(f.view(1, 1, 1, 2), (3,))
    torch.testing.assert_close(got.view(2), f / (1 + 8 * math.exp(-0.5)))


def test_snamd_2d_rejects_a_non_square_grid():
    with pytest.raises(ValueError):
        snamd_2d(torch.randn(1, 10, 3), 3)


@pytest.mark.parametrize("degrees", [(1, 3, 5), (1, 3)])
def test_snamd_3d_matches_literal_neighbour_loops(degrees):
    torch.manual_seed(3)
    n, g, c = 2, 12, 6
    tokens = torch.randn(n, g, c)
    centres = torch.rand(n, g, 3)
    curvature = torch.rand(n, g) * 0.02
    curvature[0, 3] = 0.01  # exactly at the threshold: keeps its own token
    got = snamd_3d(tokens, centres, curvature, degrees, 0.01)
    want = literal_snamd_3d(tokens, centres, curvature, degrees, 0.01)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    gated = curvature >= 0.01
    assert gated.any() and (~gated).any()
    own = torch.nn.functional.normalize(tokens, dim=-1)
    torch.testing.assert_close(got[gated], own[gated])


def test_snamd_3d_pools_consecutive_triples_scale_major():
    # Two groups, identical tokens → every weighted mean equals the normalized token u, so
    # out[c] = mean(cat[3c:3c+3]) with cat = [u, u, u] scale-major.
    u = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    u = u / u.norm()
    tokens = u.expand(1, 5, 9).clone()
    centres = torch.rand(1, 5, 3)
    got = snamd_3d(tokens, centres, torch.zeros(1, 5), (1, 3, 5), 0.01)
    cat = torch.cat([u, u, u])
    want = torch.stack([cat[3 * k : 3 * k + 3].mean() for k in range(9)])
    torch.testing.assert_close(got[0, 0], want)
    assert not torch.allclose(want, u)  # pooling really mixes channels


def test_snamd_3d_with_fewer_groups_than_the_largest_degree():
    torch.manual_seed(4)
    tokens = torch.randn(1, 3, 4)
    centres = torch.rand(1, 3, 3)
    got = snamd_3d(tokens, centres, torch.zeros(1, 3), (1, 3, 5), 0.01)
    # With only 3 groups the degree-5 mean is the degree-3 mean.
    want = literal_snamd_3d(tokens, centres, torch.zeros(1, 3), (1, 3, 3), 0.01)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
