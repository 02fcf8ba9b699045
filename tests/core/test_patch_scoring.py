"""`sample_patch_scores` against a literal Interval Average + CAE, and `pair_minima_tiled`."""

import pytest
import torch

from musc_core.cross_modal import cross_modal_enhance, projection_lists
from musc_core.mutual_scoring import pair_minima_tiled, sample_patch_scores


def _interval_literal(d, ratio):
    """Mean of the k smallest of each row, k = max(1, floor(ratio * R)), written as loops."""
    layers, length, refs = d.shape
    k = max(1, int(ratio * refs + 1e-9))
    out = torch.zeros(length)
    for y in range(layers):
        for m in range(length):
            values = sorted(float(v) for v in d[y, m])
            out[m] += sum(values[:k]) / k
    return out / layers


@pytest.mark.parametrize("refs", [1, 3, 7])
def test_single_modality_is_the_layer_mean_of_interval_averages(refs):
    g = torch.Generator().manual_seed(refs)
    d = torch.rand(3, 16, refs, generator=g)
    result = sample_patch_scores(d, None, None, 0.3)
    assert result.scores_3d is None
    torch.testing.assert_close(result.scores_2d, _interval_literal(d, 0.3))
    only3d = sample_patch_scores(None, d, None, 0.5)
    torch.testing.assert_close(only3d.scores_3d, _interval_literal(d, 0.5))


def test_both_modalities_apply_cae_per_layer_before_interval_average():
    g = torch.Generator().manual_seed(5)
    d2 = torch.rand(3, 16, 6, generator=g)  # 4×4 patches of 2 px on an 8 px image
    d3 = torch.rand(3, 10, 6, generator=g)
    centre_pixel = torch.randint(0, 64, (10,), generator=g)
    projection = projection_lists(centre_pixel, 8, 2)
    result = sample_patch_scores(d2, d3, projection, 0.3)
    e2 = torch.stack([cross_modal_enhance(d2[y], d3[y], projection)[0] for y in range(3)])
    e3 = torch.stack([cross_modal_enhance(d2[y], d3[y], projection)[1] for y in range(3)])
    torch.testing.assert_close(result.scores_2d, _interval_literal(e2, 0.3))
    torch.testing.assert_close(result.scores_3d, _interval_literal(e3, 0.3))
    with pytest.raises(ValueError):
        sample_patch_scores(d2, d3, None, 0.3)
    with pytest.raises(ValueError):
        sample_patch_scores(None, None, None, 0.3)


@pytest.mark.parametrize("block", [1, 2, 5])
def test_tiled_block_minima_equal_brute_force(block):
    g = torch.Generator().manual_seed(block)
    a, b = torch.randn(5, 7, 4, generator=g), torch.randn(3, 6, 4, generator=g)
    result = pair_minima_tiled(a, b, block, torch.float32)
    for i in range(5):
        for j in range(3):
            d = torch.cdist(a[i].double(), b[j].double())
            torch.testing.assert_close(result.a_to_b[i, :, j], d.min(1).values.float(),
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(result.b_to_a[j, :, i], d.min(0).values.float(),
                                       atol=1e-5, rtol=1e-5)
