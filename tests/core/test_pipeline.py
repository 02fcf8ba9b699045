"""The in-memory pipeline: shapes, planted anomalies, order and block invariance, errors."""

import dataclasses

import pytest
import torch

from musc_core import hardware
from musc_core.config import MuscConfig
from musc_core.features_2d import ViTFeatureExtractor
from musc_core.pipeline import Sample, score
from musc_core.point_mae import PointFeatureExtractor, load_point_mae
from musc_core.rescoring import rscon

SIZE = 64
CONFIG = MuscConfig(
    modality="2d", image_size=SIZE, num_groups=32, group_size=16, ipg_step=8,
    distance_dtype="float32", vit_dtype="float32", point_dtype="float32",
)


@pytest.fixture(scope="module")
def vit():
    return ViTFeatureExtractor.create("vit_tiny_patch16_224", "random", SIZE, patch_size=8)


@pytest.fixture(scope="module")
def pointmae():
    return PointFeatureExtractor(load_point_mae(None, True, "sample"), weights="random")


def _stripes(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(0, 12.0, SIZE)
    base = 0.5 + 0.3 * torch.sin(x[None, :] + 0.1 * torch.randn(1, generator=g))
    image = base.expand(3, SIZE, SIZE).clone()
    return (image + 0.02 * torch.randn(3, SIZE, SIZE, generator=g)).clamp(0, 1)


def _dome(seed, bump=False):
    g = torch.Generator().manual_seed(seed)
    v, u = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    inside = u**2 + v**2 < 0.8
    z = 1.0 - 0.3 * (u**2 + v**2) + 0.002 * torch.randn(SIZE, SIZE, generator=g)
    if bump:
        z = z + 0.15 * torch.exp(-((u - 0.3) ** 2 + (v - 0.2) ** 2) / 0.01)
    xyz = torch.stack([u, v, z], dim=-1)
    return torch.where(inside[..., None], xyz, torch.zeros(()))


def _line(n, anomalous):
    samples = []
    for i in range(n):
        image = _stripes(i)
        if i == anomalous:
            image[:, 20:30, 30:40] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
        samples.append(Sample(f"s{i}", image=image, xyz=_dome(i, bump=i == anomalous)))
    return samples


def test_2d_shapes_and_planted_anomaly(vit):
    result = score(_line(8, anomalous=5), CONFIG, vit)
    assert result.maps.shape == (8, SIZE, SIZE) and result.maps_3d is None
    assert result.patch_scores_2d.shape == (8, (SIZE // 8) ** 2)
    assert result.scores.shape == result.scores_rescored.shape == (8,)
    assert int(result.scores.argmax()) == 5
    torch.testing.assert_close(result.scores, result.maps.flatten(1).max(1).values)


def test_3d_planted_bump_and_multimodal_shapes(vit, pointmae):
    line = _line(8, anomalous=2)
    result_3d = score(line, dataclasses.replace(CONFIG, modality="3d"), None, pointmae)
    assert result_3d.patch_scores_3d.shape == (8, 32) and result_3d.maps_2d is None
    assert int(result_3d.scores.argmax()) == 2
    both = score(line, dataclasses.replace(CONFIG, modality="2d+3d"), vit, pointmae)
    torch.testing.assert_close(both.maps, both.maps_2d + both.maps_3d)
    assert int(both.scores.argmax()) == 2
    assert both.salient.shape == (8, 192 + 384)


def test_results_do_not_depend_on_sample_order_or_block_size(vit):
    line = _line(6, anomalous=1)
    reference = score(line, CONFIG, vit)
    order = [3, 0, 5, 1, 4, 2]
    shuffled = score([line[i] for i in order], dataclasses.replace(CONFIG, pair_block=1), vit)
    torch.testing.assert_close(shuffled.maps, reference.maps[order], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        shuffled.scores_rescored, reference.scores_rescored[order], rtol=1e-4, atol=1e-5
    )


def test_two_samples_are_enough_and_one_is_not(vit):
    line = _line(2, anomalous=0)
    result = score(line, CONFIG, vit)
    assert torch.isfinite(result.maps).all() and torch.isfinite(result.scores_rescored).all()
    with pytest.raises(ValueError, match="at least 2"):
        score(line[:1], CONFIG, vit)


def test_missing_inputs_are_named(vit):
    line = _line(3, anomalous=0)
    line[1] = Sample("no-image", xyz=line[1].xyz)
    with pytest.raises(ValueError, match="no-image"):
        score(line, CONFIG, vit)
    with pytest.raises(ValueError, match="3D extractor"):
        score(line, dataclasses.replace(CONFIG, modality="3d"), vit)


BF16_FIELDS = [
    {"distance_dtype": "bfloat16"},
    {"vit_dtype": "bfloat16"},
    {"point_dtype": "bfloat16"},
    {"distance_dtype": "bfloat16", "vit_dtype": "bfloat16", "point_dtype": "bfloat16"},
]
# The dtype settings each modality's run reads.
ENTERS = {"2d": {"distance_dtype", "vit_dtype"}, "3d": {"distance_dtype", "point_dtype"}}


@pytest.fixture
def bf16_numerics(monkeypatch):
    """Run the bfloat16 paths on any CPU.

    The bf16 numerics (rounded operands, float32 accumulation, one rounding of the result) are
    the same on every CPU; only their speed needs AVX512-BF16/AMX, and on other CPUs the
    pipeline refuses an explicit ``bfloat16`` (``test_explicit_bfloat16_is_refused_...``).
    The accuracy claims are therefore checked everywhere with the refusal switched off.
    """
    if not hardware.cpu_has_fast_bf16():
        monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)


@pytest.mark.parametrize("modality", ["2d", "3d"])
@pytest.mark.parametrize("fields", BF16_FIELDS)
def test_bfloat16_stays_within_tolerance_of_float32(vit, pointmae, bf16_numerics, modality, fields):
    """Stated tolerance for one modality: every map pixel within 1% of the float32 map range,
    RsCon scores within 0.01, same top sample."""
    if not ENTERS[modality] & set(fields):
        pytest.skip(f"{sorted(fields)} does not enter a {modality}-only run")
    line = _line(6, anomalous=4)
    config = dataclasses.replace(CONFIG, modality=modality)
    exact = score(line, config, vit, pointmae)
    fast = score(line, dataclasses.replace(config, **fields), vit, pointmae)
    tolerance = 0.01 * float(exact.maps.max() - exact.maps.min())
    assert float((fast.maps - exact.maps).abs().max()) <= tolerance
    assert float((fast.scores_rescored - exact.scores_rescored).abs().max()) <= 0.01
    assert int(fast.scores.argmax()) == int(exact.scores.argmax()) == 4


@pytest.mark.parametrize("fields", BF16_FIELDS)
def test_bfloat16_2d3d_stays_within_tolerance_of_float32(vit, pointmae, bf16_numerics, fields):
    """Stated tolerance with CAE: 99% of the map pixels within 1% of the float32 map range,
    sample scores within 1% of it, the same top sample, and RsCon scores within 0.01 for every
    sample given the same salient features (and for all when no salient patch switched).

    CAE's rank remapping (paper Eq. 10–11) is discontinuous where two pair scores are nearly
    tied: a perturbation of the size of bf16's distance error swaps their ranks and moves the
    patch by the gap between neighbouring scores. Float32 noise of that size does the same
    (``test_cae_is_discontinuous_at_near_ties`` in test_cross_modal.py), so the pixelwise bound
    holds for the continuous single-modality pipeline only. RsCon's salient feature is the
    feature at a sample's best patch (an argmax): where two patches nearly tie, the other one
    can win, and that sample's row of RsCon's similarity changes. Such a switch is allowed only
    at a near tie, which the test checks on the float32 patch scores.
    """
    line = _line(6, anomalous=4)
    config = dataclasses.replace(CONFIG, modality="2d+3d")
    exact = score(line, config, vit, pointmae)
    fast = score(line, dataclasses.replace(config, **fields), vit, pointmae)
    tolerance = 0.01 * float(exact.maps.max() - exact.maps.min())
    within = (fast.maps - exact.maps).abs() <= tolerance
    assert float(within.float().mean()) >= 0.99
    assert float((fast.scores - exact.scores).abs().max()) <= tolerance
    switched = set()
    for before, after in ((exact.patch_scores_2d, fast.patch_scores_2d),
                          (exact.patch_scores_3d, fast.patch_scores_3d)):
        best, best_fast = before.argmax(dim=1), after.argmax(dim=1)
        for i in torch.nonzero(best != best_fast).flatten().tolist():
            gap = before[i, best[i]] - before[i, best_fast[i]]
            assert float(gap) <= 0.01 * float(before[i].max() - before[i].min()), f"sample {i}"
            switched.add(i)
    steady = [i for i in range(len(line)) if i not in switched]
    assert len(steady) >= len(line) - 1
    moved = (fast.salient - exact.salient).norm(dim=1)[steady]
    assert float((moved / exact.salient.norm(dim=1)[steady]).max()) <= 0.01
    # Given the same salient features, the scores' error moves RsCon by at most 0.01.
    same_salient = rscon(exact.scores, fast.salient, config.rescoring_windows)
    assert float((fast.scores_rescored - same_salient).abs().max()) <= 0.01
    if not switched:
        assert float((fast.scores_rescored - exact.scores_rescored).abs().max()) <= 0.01
    assert int(fast.scores.argmax()) == int(exact.scores.argmax()) == 4
    assert int(fast.scores_rescored.argmax()) == int(exact.scores_rescored.argmax()) == 4


@pytest.mark.parametrize(
    ("field", "modality"),
    [("distance_dtype", "2d"), ("vit_dtype", "2d"), ("point_dtype", "3d")],
)
def test_explicit_bfloat16_is_refused_without_native_bf16(vit, pointmae, monkeypatch, field,
                                                          modality):
    """Forced fallback: on a CPU without native bf16 an explicit bfloat16 stops with a message
    naming the setting and the fix; ``auto`` runs in float32 and equals ``float32``."""
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    line = _line(3, anomalous=0)
    config = dataclasses.replace(CONFIG, modality=modality)
    with pytest.raises(ValueError, match=f"{field}=bfloat16 needs native bfloat16.*{field}=auto"):
        score(line, dataclasses.replace(config, **{field: "bfloat16"}), vit, pointmae)
    auto = score(line, dataclasses.replace(config, **{field: "auto"}), vit, pointmae)
    exact = score(line, config, vit, pointmae)
    assert torch.equal(auto.maps, exact.maps)


@pytest.mark.gpu
def test_cuda_matches_cpu(vit, pointmae):
    line = _line(6, anomalous=3)
    config = dataclasses.replace(CONFIG, modality="2d+3d")
    on_cpu = score(line, config, vit, pointmae, device="cpu")
    on_gpu = score(line, config, vit, pointmae, device="cuda")
    vit.to("cpu")
    pointmae.to("cpu")
    tolerance = 0.01 * float(on_cpu.maps.max() - on_cpu.maps.min())
    assert float((on_gpu.maps - on_cpu.maps).abs().max()) <= tolerance
    assert int(on_gpu.scores.argmax()) == int(on_cpu.scores.argmax()) == 3
