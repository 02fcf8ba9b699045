"""2D extractor: layer tokens through the final norm, weights from every supported source."""

import pickle

import pytest
import torch

from musc_core.features_2d import ViTFeatureExtractor

NAME = "vit_tiny_patch16_224"
SIZE = 64


@pytest.fixture(scope="module")
def extractor():
    return ViTFeatureExtractor.create(NAME, "random", SIZE)


def _hooked_tokens(model, images, blocks):
    """Independent truth: forward hooks on the blocks, final norm applied by hand."""
    captured = {}
    handles = [
        model.blocks[b - 1].register_forward_hook(
            lambda _m, _i, out, b=b: captured.__setitem__(b, out)
        )
        for b in blocks
    ]
    with torch.no_grad():
        model.forward_features(images)
    for h in handles:
        h.remove()
    return [model.norm(captured[b])[:, model.num_prefix_tokens :] for b in blocks]


def test_layers_are_patch_tokens_through_final_norm(extractor):
    images = torch.rand(3, 3, SIZE, SIZE)
    got = extractor.extract(images, (4, 8, 12), batch_size=2)
    want = _hooked_tokens(extractor.model, extractor.normalize(images), (4, 8, 12))
    assert [g.shape for g in got] == [(3, (SIZE // 16) ** 2, 192)] * 3
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_normalization_uses_the_backbone_config(extractor):
    assert extractor.mean == tuple(extractor.model.pretrained_cfg["mean"])
    dino = ViTFeatureExtractor.create("vit_base_patch8_224.dino", "random", 224)
    assert dino.mean == (0.485, 0.456, 0.406) and dino.patch_size == 8
    assert dino.random_weights and "random" in dino.identity


def test_random_init_is_deterministic_and_only_on_request(tmp_path):
    a = ViTFeatureExtractor.create(NAME, "random", SIZE)
    b = ViTFeatureExtractor.create(NAME, "random", SIZE)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(FileNotFoundError, match="random"):
        ViTFeatureExtractor.create(NAME, str(tmp_path / "missing.pth"), SIZE)


def _perturbed_state(extractor):
    torch.manual_seed(123)
    return {k: v + 0.01 * torch.randn_like(v) for k, v in extractor.model.state_dict().items()}


@pytest.mark.parametrize("layout", ["timm", "dino_backbone", "dino_teacher", "dino_student"])
def test_checkpoint_round_trip(extractor, tmp_path, layout):
    state = _perturbed_state(extractor)
    if layout == "timm":
        content = state
    elif layout == "dino_backbone":  # the original DINO backbone-only release
        content = dict(state)
    elif layout == "dino_teacher":  # full DINO training checkpoint
        content = {
            "teacher": {**{f"backbone.{k}": v for k, v in state.items()},
                        "head.mlp.0.weight": torch.zeros(4, 192),
                        "head.last_layer.weight_g": torch.ones(1, 1)},
            "epoch": 100,
        }
    else:
        content = {"student": {f"module.backbone.{k}": v for k, v in state.items()}}
    path = tmp_path / f"{layout}.pth"
    torch.save(content, path)
    loaded = ViTFeatureExtractor.create(NAME, str(path), SIZE)
    assert not loaded.random_weights and "sha256-" in loaded.identity
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, state[key])
    images = torch.rand(2, 3, SIZE, SIZE)
    reference = extractor.model
    reference.load_state_dict(state)
    want = _hooked_tokens(reference, loaded.normalize(images), (4,))
    torch.testing.assert_close(loaded.extract(images, (4,))[0], want[0])


def test_checkpoint_missing_keys_is_an_error(extractor, tmp_path):
    state = dict(extractor.model.state_dict())
    del state["blocks.3.attn.qkv.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="blocks.3.attn.qkv.weight"):
        ViTFeatureExtractor.create(NAME, str(path), SIZE)


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_payload_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": _Payload()}, handle)
    with pytest.raises(ValueError, match="weights_only"):
        ViTFeatureExtractor.create(NAME, str(path), SIZE)
    assert not (tmp_path / "PWNED").exists()
