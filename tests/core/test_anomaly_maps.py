"""Anomaly maps (docs/method.md, *Anomaly maps*) on hand-computed cases."""

import math

import pytest
import torch

from musc_core import grouping
from musc_core.anomaly_maps import gaussian_blur, map_2d, map_3d, sample_scores


def test_map_2d_shape_corners_and_centre():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 8.0]])  # 2×2 grids
    maps = map_2d(scores, 3)
    assert maps.shape == (2, 3, 3)
    # align_corners=True: the corner pixels are the corner patches
    assert maps[0, 0, 0] == 1.0 and maps[0, 0, 2] == 2.0
    assert maps[0, 2, 0] == 3.0 and maps[0, 2, 2] == 4.0
    assert maps[0, 1, 1] == pytest.approx(2.5)  # centre = mean of the four
    assert maps[0, 0, 1] == pytest.approx(1.5)  # top edge midpoint
    assert maps[1, 1, 2] == pytest.approx(4.0)
    with pytest.raises(ValueError):
        map_2d(torch.zeros(1, 5), 4)


def test_map_3d_idw_by_hand_without_blur():
    centres = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [0.0, 1, 0], [0.0, 0, 5]])
    group_scores = torch.tensor([1.0, 2.0, 3.0, 100.0])
    points = torch.tensor([[0.5, 0, 0], [0.0, 0, 0], [0.0, 1.0, 0.0]])
    pixel_index = torch.tensor([5, 0, 15])  # S = 4
    got = map_3d(group_scores, centres, points, pixel_index, 4, sigma=0.0)
    # point (0.5, 0, 0): squared distances 0.25, 0.25, 1.25 → weights 4, 4, 0.8
    w = [1 / (0.25 + 1e-8), 1 / (0.25 + 1e-8), 1 / (1.25 + 1e-8)]
    first = (w[0] * 1 + w[1] * 2 + w[2] * 3) / sum(w)
    assert first == pytest.approx(14.4 / 8.8, rel=1e-6)
    want = torch.zeros(16)
    want[5] = first
    # point on centre 0: weight 1e8 against 1 and 1 / 2
    w0 = [1 / 1e-8, 1 / (1 + 1e-8), 1 / (1 + 1e-8)]
    want[0] = (w0[0] * 1 + w0[1] * 2 + w0[2] * 3) / sum(w0)
    w2 = [1 / (1 + 1e-8), 1 / (2 + 1e-8), 1 / 1e-8]  # point on centre 2
    want[15] = (w2[0] * 1 + w2[1] * 2 + w2[2] * 3) / sum(w2)
    torch.testing.assert_close(got.view(16), want)


def test_map_3d_chunks_and_blur(monkeypatch):
    torch.manual_seed(0)
    centres, scores = torch.rand(20, 3), torch.rand(20)
    points = torch.rand(50, 3)
    pixel_index = torch.randperm(64)[:50]
    unblurred = map_3d(scores, centres, points, pixel_index, 8, 0.0)
    monkeypatch.setattr(grouping, "_KNN_CHUNK_BYTES", 7 * 20 * 12)  # 7 points per chunk
    torch.testing.assert_close(map_3d(scores, centres, points, pixel_index, 8, 0.0), unblurred)
    blurred = map_3d(scores, centres, points, pixel_index, 8, 1.5)
    torch.testing.assert_close(blurred, gaussian_blur(unblurred, 1.5))


def test_gaussian_blur_by_hand():
    sigma = 1.0
    radius = math.ceil(3 * sigma)
    image = torch.zeros(15, 15)
    image[7, 7] = 1.0
    out = gaussian_blur(image, sigma)
    taps = [math.exp(-0.5 * (k / sigma) ** 2) for k in range(-radius, radius + 1)]
    norm = sum(taps)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            want = taps[dy + radius] * taps[dx + radius] / norm**2
            assert out[7 + dy, 7 + dx] == pytest.approx(want, rel=1e-5, abs=1e-9)
    assert out.sum() == pytest.approx(1.0, rel=1e-5)
    # replicated edges: a constant image stays constant, also at the border
    torch.testing.assert_close(gaussian_blur(torch.full((6, 6), 2.0), 4.0), torch.full((6, 6), 2.0))
    assert torch.equal(gaussian_blur(image, 0.0), image)


def test_sample_scores_is_the_map_maximum():
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 2] = 5.0
    maps[1, 3, 3] = -1.0
    maps[2] = 0.5
    assert sample_scores(maps).tolist() == [5.0, 0.0, 0.5]
