"""The per-sample reduction against loops written from the paper's definitions."""

import math

import pytest
import torch

from musc_core.config import MuscConfig
from musc_core.cross_modal import Projection, cross_modal_enhance
from musc_core.grouping import Grouping, PointSample
from musc_core.reduction import grid_patch_size, reduce_sample

S = 8  # image side; 2D grid 4×4 of 2-pixel patches


def _config(modality, blur=0.0):
    return MuscConfig(
        modality=modality, image_size=S, num_groups=4, group_size=2, ipg_step=1,
        map_blur_sigma=blur, interval_ratio=0.4,
    )


def _interval_literal(d, ratio):
    """Layer mean of the mean of the k smallest of each row, k = max(1, floor(ratio · R))."""
    layers, length, refs = d.shape
    k = max(1, math.floor(ratio * refs + 1e-9))
    out = torch.zeros(length, dtype=torch.float64)
    for y in range(layers):
        for m in range(length):
            out[m] += sum(sorted(float(v) for v in d[y, m])[:k]) / k
    return out / layers


def _bilinear_literal(patch, side, size):
    """Bilinear upsampling of a side×side grid to size×size, corners aligned, with loops."""
    grid = patch.double().view(side, side)
    out = torch.zeros(size, size, dtype=torch.float64)
    scale = (side - 1) / (size - 1)
    for y in range(size):
        for x in range(size):
            sy, sx = y * scale, x * scale
            y0, x0 = min(int(sy), side - 2), min(int(sx), side - 2)
            fy, fx = sy - y0, sx - x0
            out[y, x] = (
                grid[y0, x0] * (1 - fy) * (1 - fx) + grid[y0, x0 + 1] * (1 - fy) * fx
                + grid[y0 + 1, x0] * fy * (1 - fx) + grid[y0 + 1, x0 + 1] * fy * fx
            )
    return out


def _idw_literal(scores, sample, size):
    """Unblurred 3D map: every point gets the 1/(d² + 1e-8) mean of its 3 nearest centres."""
    out = torch.zeros(size * size, dtype=torch.float64)
    centres = sample.grouping.centres.double()
    for point, pixel in zip(sample.points.double(), sample.pixel_index.tolist(), strict=True):
        squared = ((centres - point) ** 2).sum(1)
        nearest = sorted(range(len(centres)), key=lambda g: float(squared[g]))[:3]
        weights = [1.0 / (float(squared[g]) + 1e-8) for g in nearest]
        out[pixel] = sum(w * float(scores[g]) for w, g in zip(weights, nearest, strict=True))
        out[pixel] /= sum(weights)
    return out.view(size, size)


def _point_sample(seed):
    g = torch.Generator().manual_seed(seed)
    pixel_index = torch.randperm(S * S, generator=g)[:20]
    points = torch.rand(20, 3, generator=g)
    centre_index = torch.tensor([0, 5, 11, 17])
    grouping = Grouping(centre_index, points[centre_index], torch.zeros(4, 2, dtype=torch.long),
                        torch.zeros(4))
    return PointSample(points, pixel_index, grouping)


def _argmax_literal(scores):
    best = 0
    for m in range(len(scores)):
        if float(scores[m]) > float(scores[best]):
            best = m
    return best


def test_2d_reduction_equals_literal_interval_average_upsampling_and_salient_row():
    g = torch.Generator().manual_seed(1)
    d2 = torch.rand(3, 16, 5, generator=g)
    feats = torch.randn(16, 6, generator=g)
    result = reduce_sample(d2, None, None, feats, None, 2, _config("2d"))
    patch = _interval_literal(d2, 0.4)
    torch.testing.assert_close(result.patch_2d.double(), patch)
    torch.testing.assert_close(result.map_2d.double(), _bilinear_literal(patch, 4, S))
    assert result.patch_3d is None and result.map_3d is None
    assert torch.equal(result.map, result.map_2d)
    assert torch.equal(result.salient, feats[_argmax_literal(result.patch_2d)])


def test_3d_reduction_equals_literal_idw_map_and_salient_row():
    g = torch.Generator().manual_seed(2)
    d3 = torch.rand(2, 4, 6, generator=g)
    feats = torch.randn(4, 5, generator=g)
    sample = _point_sample(2)
    result = reduce_sample(None, d3, sample, None, feats, 0, _config("3d"))
    patch = _interval_literal(d3, 0.4)
    torch.testing.assert_close(result.patch_3d.double(), patch)
    torch.testing.assert_close(result.map_3d.double(), _idw_literal(result.patch_3d, sample, S))
    assert torch.equal(result.map, result.map_3d)
    assert torch.equal(result.salient, feats[_argmax_literal(result.patch_3d)])


def test_both_modalities_use_the_given_patch_size_for_cae_and_sum_the_maps():
    g = torch.Generator().manual_seed(3)
    d2 = torch.rand(2, 16, 6, generator=g)
    d3 = torch.rand(2, 4, 6, generator=g)
    f2, f3 = torch.randn(16, 3, generator=g), torch.randn(4, 5, generator=g)
    sample = _point_sample(3)
    result = reduce_sample(d2, d3, sample, f2, f3, 2, _config("2d+3d", blur=1.5))
    # projection lists by hand: the 2-pixel patch holding each centre's pixel
    centre_pixel = sample.pixel_index[sample.grouping.centre_index].tolist()
    patch_of_group = torch.tensor([(p // S // 2) * 4 + (p % S) // 2 for p in centre_pixel])
    projection = Projection(patch_of_group, torch.bincount(patch_of_group, minlength=16))
    enhanced = [cross_modal_enhance(d2[y], d3[y], projection) for y in range(2)]
    e2 = torch.stack([e[0] for e in enhanced])
    e3 = torch.stack([e[1] for e in enhanced])
    torch.testing.assert_close(result.patch_2d.double(), _interval_literal(e2, 0.4))
    torch.testing.assert_close(result.patch_3d.double(), _interval_literal(e3, 0.4))
    torch.testing.assert_close(result.map, result.map_2d + result.map_3d, rtol=0, atol=0)
    expected_salient = torch.cat(
        [f2[_argmax_literal(result.patch_2d)], f3[_argmax_literal(result.patch_3d)]]
    )
    assert torch.equal(result.salient, expected_salient)
    with pytest.raises(ValueError, match="multiple of patch size"):
        reduce_sample(d2, d3, sample, f2, f3, 3, _config("2d+3d"))


def test_missing_inputs_are_refused():
    d = torch.rand(1, 4, 3)
    with pytest.raises(ValueError, match="points and grouping"):
        reduce_sample(None, d, None, None, torch.zeros(4, 2), 0, _config("3d"))
    with pytest.raises(ValueError, match="salient-layer"):
        reduce_sample(torch.rand(1, 16, 3), None, None, None, None, 2, _config("2d"))
    with pytest.raises(ValueError, match="at least one modality"):
        reduce_sample(None, None, None, None, None, 2, _config("2d"))


@pytest.mark.parametrize(("patches", "size", "expected"), [(784, 224, 8), (16, 8, 2), (1, 5, 5)])
def test_grid_patch_size_is_the_image_side_over_the_grid_side(patches, size, expected):
    assert grid_patch_size(patches, size) == expected


@pytest.mark.parametrize(("patches", "size"), [(15, 8), (9, 8), (0, 8)])
def test_grid_patch_size_refuses_grids_that_do_not_tile_the_image(patches, size):
    with pytest.raises(ValueError, match="square grid"):
        grid_patch_size(patches, size)
