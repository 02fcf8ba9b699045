"""Point-MAE encoder (paper §III-A) against a literal re-implementation of the release's forward."""

import copy
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from musc_core import point_mae
from musc_core.grouping import Grouping
from musc_core.point_mae import (
    PointFeatureExtractor,
    PointTransformer,
    load_point_mae,
    map_point_mae_keys,
)


@pytest.fixture(scope="module")
def model():
    m = load_point_mae(None, random_init=True, batchnorm="sample")
    # Non-trivial BatchNorm affine weights and running statistics.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for norm in (m.encoder.first_conv[1], m.encoder.second_conv[1]):
            norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=gen))
            norm.bias.copy_(0.2 * torch.randn(norm.bias.shape, generator=gen))
            norm.running_mean.copy_(0.1 * torch.randn(norm.running_mean.shape, generator=gen))
            norm.running_var.copy_(0.5 + torch.rand(norm.running_var.shape, generator=gen))
    return m


def literal_forward(model, neighbourhood, centres, layers, train_bn):
    """The release's forward, one sample at a time, with nn modules and explicit attention."""
    outs = [[] for _ in layers]
    for b in range(neighbourhood.shape[0]):
        m = copy.deepcopy(model).double()
        m.train(train_bn)  # train-mode BatchNorm = statistics of this sample's G*K points
        groups = neighbourhood[b].double()  # (G, K, 3)
        g, n, _ = groups.shape
        feature = m.encoder.first_conv(groups.transpose(2, 1))  # (G, 256, K)
        glob = torch.max(feature, dim=2, keepdim=True)[0]
        feature = torch.cat([glob.expand(-1, -1, n), feature], dim=1)
        feature = m.encoder.second_conv(feature)
        x = torch.max(feature, dim=2)[0][None]  # (1, G, 384)
        pos = m.pos_embed(centres[b : b + 1].double())
        for i, block in enumerate(m.blocks.blocks, start=1):
            x = x + pos
            h = block.norm1(x)
            heads = block.attn.heads
            qkv = block.attn.qkv(h).reshape(1, g, 3, heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = x + block.attn.proj((attn @ v).transpose(1, 2).reshape(1, g, -1))
            x = x + block.mlp.fc2(torch.nn.functional.gelu(block.mlp.fc1(block.norm2(x))))
            if i in layers:
                outs[layers.index(i)].append(m.norm(x)[0])
    return [torch.stack(o) for o in outs]


def _inputs(batch=3, groups=16, k=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    neighbourhood = torch.randn(batch, groups, k, 3, generator=gen) * 0.05
    # very different scales per sample: batch-level statistics would differ from per-sample ones
    neighbourhood = neighbourhood * torch.tensor([1.0, 4.0, 0.25])[:batch, None, None, None]
    centres = torch.randn(batch, groups, 3, generator=gen) * 0.5
    return neighbourhood, centres


def test_output_shapes(model):
    neighbourhood, centres = _inputs(batch=2)
    with torch.inference_mode():
        out = model.forward_intermediates(neighbourhood, centres, (4, 8, 12))
    assert [tuple(o.shape) for o in out] == [(2, 16, 384)] * 3
    with pytest.raises(ValueError):
        model.forward_intermediates(neighbourhood, centres, (13,))


def test_sample_batchnorm_equals_per_sample_train_mode(model):
    neighbourhood, centres = _inputs()
    layers = [2, 12]
    with torch.inference_mode():
        got = model.forward_intermediates(neighbourhood, centres, layers)
    expected = literal_forward(model, neighbourhood, centres, layers, train_bn=True)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4)
    # batching does not mix samples
    with torch.inference_mode():
        alone = model.forward_intermediates(neighbourhood[1:2], centres[1:2], layers)
    torch.testing.assert_close(alone[1][0], got[1][1], rtol=1e-5, atol=1e-5)


def test_running_batchnorm_equals_eval_mode(model):
    running = copy.deepcopy(model)
    running.batchnorm = "running"
    neighbourhood, centres = _inputs(batch=2)
    with torch.inference_mode():
        got = running.forward_intermediates(neighbourhood, centres, [5])
    expected = literal_forward(model, neighbourhood, centres, [5], train_bn=False)
    torch.testing.assert_close(got[0].double(), expected[0], rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        sample = model.forward_intermediates(neighbourhood, centres, [5])
    assert not torch.allclose(sample[0], got[0], atol=1e-3)


def _checkpoint(model, drop=None):
    state = {f"module.MAE_encoder.{k}": v.clone() for k, v in model.state_dict().items()}
    if drop is not None:
        del state[f"module.MAE_encoder.{drop}"]
    state["module.MAE_decoder.blocks.0.norm1.weight"] = torch.ones(384)
    state["module.mask_token"] = torch.zeros(1, 1, 384)
    state["module.increase_dim.0.weight"] = torch.zeros(384, 384, 1)
    return {"base_model": state, "epoch": 300, "metrics": {"acc": 0.0}, "optimizer": {}}


def test_checkpoint_round_trip(model, tmp_path):
    saved = copy.deepcopy(model)
    with torch.no_grad():
        for p in saved.parameters():
            p.mul_(1.5).add_(0.01)
    path = tmp_path / "pointmae_pretrain.pth"
    torch.save(_checkpoint(saved), path)
    loaded = load_point_mae(str(path), random_init=False, batchnorm="sample")
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not loaded.random_weights
    extractor = PointFeatureExtractor(loaded, weights=str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert extractor.identity == f"point_mae:sha256-{digest}"
    neighbourhood, centres = _inputs(batch=1)
    with torch.inference_mode():
        a = saved.forward_intermediates(neighbourhood, centres, (4, 8, 12))
        b = loaded.forward_intermediates(neighbourhood, centres, (4, 8, 12))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_key_mapping_strips_prefixes_and_drops_the_decoder(model):
    mapped = map_point_mae_keys(_checkpoint(model))
    assert set(mapped) == set(model.state_dict())
    bare = map_point_mae_keys({"blocks.blocks.0.norm1.weight": torch.ones(384)})
    assert list(bare) == ["blocks.blocks.0.norm1.weight"]


def test_checkpoint_missing_a_transformer_key_is_refused(model, tmp_path):
    path = tmp_path / "broken.pth"
    torch.save(_checkpoint(model, drop="blocks.blocks.7.attn.qkv.weight"), path)
    with pytest.raises(ValueError, match="blocks.blocks.7.attn.qkv.weight"):
        load_point_mae(str(path), random_init=False, batchnorm="sample")


def test_no_weights_without_explicit_random_request():
    with pytest.raises(ValueError, match="random"):
        load_point_mae(None, random_init=False, batchnorm="sample")
    with pytest.raises(FileNotFoundError):
        load_point_mae("/nonexistent/pointmae.pth", random_init=False, batchnorm="sample")
    with pytest.raises(ValueError):
        PointTransformer(batchnorm="eval")


def _plant(path):
    Path(path).write_text("code ran")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_plant, (self.marker,))


def test_pickled_code_in_a_checkpoint_is_refused_and_not_run(model, tmp_path):
    marker = tmp_path / "marker.txt"
    content = _checkpoint(model)
    content["extra"] = _Payload(str(marker))
    path = tmp_path / "malicious.pth"
    torch.save(content, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_point_mae(str(path), random_init=False, batchnorm="sample")
    assert not marker.exists()


def _state_digest(m):
    h = hashlib.sha256()
    for k, v in sorted(m.state_dict().items()):
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_random_init_is_seeded_identically_across_processes():
    before = torch.random.get_rng_state()
    local = load_point_mae(None, random_init=True, batchnorm="sample")
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    code = (
        "import torch, hashlib\n"
        "torch.manual_seed(12345)\n"
        "from musc_core.point_mae import load_point_mae\n"
        "m = load_point_mae(None, random_init=True, batchnorm='sample')\n"
        "h = hashlib.sha256()\n"
        "for k, v in sorted(m.state_dict().items()):\n"
        "    h.update(k.encode()); h.update(v.contiguous().numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == _state_digest(local)
    extractor = PointFeatureExtractor(local, weights="random")
    assert extractor.random_weights and extractor.identity == "point_mae:random-seed0"


def test_extract_gathers_relative_neighbourhoods(model):
    torch.manual_seed(3)
    points = torch.randn(200, 3)
    members = torch.stack([torch.randperm(200)[:8] for _ in range(12)])
    centre_index = members[:, 0]
    grouping = Grouping(centre_index, points[centre_index], members, torch.zeros(12))
    extractor = PointFeatureExtractor(model)
    got = extractor.extract(points, grouping, (3, 12))
    neighbourhood = torch.stack(
        [torch.stack([points[j] - points[centre_index[g]] for j in members[g]]) for g in range(12)]
    )
    with torch.inference_mode():
        expected = model.forward_intermediates(
            neighbourhood[None], points[centre_index][None], (3, 12)
        )
    assert [tuple(t.shape) for t in got] == [(12, 384), (12, 384)]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e[0])


@pytest.mark.parametrize("batchnorm", ["sample", "running"])
def test_extract_many_equals_extract_per_sample(model, batchnorm):
    m = copy.deepcopy(model)
    m.batchnorm = batchnorm
    extractor = PointFeatureExtractor(m)
    gen = torch.Generator().manual_seed(4)
    points, groupings = [], []
    for count, scale in ((150, 1.0), (230, 3.0), (180, 0.2)):
        p = torch.randn(count, 3, generator=gen) * scale
        members = torch.stack([torch.randperm(count, generator=gen)[:8] for _ in range(12)])
        centre_index = members[:, 0]
        points.append(p)
        groupings.append(Grouping(centre_index, p[centre_index], members, torch.zeros(12)))
    batched = extractor.extract_many(points, groupings, (2, 12))
    assert [tuple(t.shape) for t in batched] == [(3, 12, 384)] * 2
    for b in range(3):
        alone = extractor.extract(points[b], groupings[b], (2, 12))
        for got, want in zip(batched, alone, strict=True):
            torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        extractor.extract_many(points[:2], groupings, (2,))


@pytest.mark.parametrize("batchnorm", ["sample", "running"])
def test_encoder_chunks_do_not_change_the_tokens(model, monkeypatch, batchnorm):
    neighbourhood, _ = _inputs(batch=2, groups=16, k=8)
    m = copy.deepcopy(model)
    with torch.inference_mode():
        whole = m.encoder(neighbourhood, batchnorm)
        monkeypatch.setattr(point_mae, "_ENCODER_CHUNK_POINTS", 24)  # 3 groups per chunk
        chunked = m.encoder(neighbourhood, batchnorm)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_encoder_stays_float32_under_bfloat16_autocast(model):
    neighbourhood, _ = _inputs(batch=2)
    with torch.inference_mode():
        exact = model.encoder(neighbourhood, "sample")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = model.encoder(neighbourhood, "sample")
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, exact, rtol=0, atol=0)


def _relative_error(got, expected):
    return float((got.double() - expected).detach().norm() / expected.detach().norm())


def test_bfloat16_products_stay_within_one_percent_of_the_float64_forward(model):
    """bf16 wide products, float32 statistics: every token layer within 1% (relative norm) of
    the release's forward in float64, returned as float32."""
    neighbourhood, centres = _inputs()
    layers = [1, 2]
    with torch.inference_mode():
        got = model.forward_intermediates(neighbourhood, centres, layers, torch.bfloat16)
    expected = literal_forward(model, neighbourhood, centres, layers, train_bn=True)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.float32
        assert _relative_error(g, e) <= 0.01


def test_bfloat16_tokens_do_not_see_the_biases_before_sample_batchnorms(model):
    """With per-sample statistics a constant before a BatchNorm cancels out. The bf16 path
    rounds only what varies, so a large bias before either BatchNorm changes no token; rounding
    the biased convolution output (what autocasting the release's encoder does) moves them."""
    neighbourhood, centres = _inputs(batch=2)
    layers = [1]
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted.encoder.first_conv[0].bias.add_(25.0)
        shifted.encoder.second_conv[0].bias.add_(25.0)
    with torch.inference_mode():
        base = model.forward_intermediates(neighbourhood, centres, layers, torch.bfloat16)
        moved = shifted.forward_intermediates(neighbourhood, centres, layers, torch.bfloat16)
        exact = literal_forward(model, neighbourhood, centres, layers, train_bn=True)[0]
        rounded = copy.deepcopy(shifted)
        rounded.encoder.first_conv[0].register_forward_hook(
            lambda _m, _i, out: out.bfloat16().to(out.dtype)
        )
        naive = literal_forward(rounded, neighbourhood, centres, layers, train_bn=True)[0]
    torch.testing.assert_close(moved[0], base[0], rtol=0, atol=0)
    assert _relative_error(naive, exact) > 5 * _relative_error(base[0], exact)


def test_unknown_gemm_dtype_is_refused(model):
    neighbourhood, centres = _inputs(batch=1)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        model.forward_intermediates(neighbourhood, centres, [1], torch.float16)
