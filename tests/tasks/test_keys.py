"""Cache keys change exactly with what the cached computation depends on."""

import dataclasses

from musc_core.config import MuscConfig
from tasks.backbones import BackboneSpec, backbone_identities
from tasks.keys import Identities, prepared_key, sample_keys

CONFIG = MuscConfig(modality="2d+3d")
IDS = Identities("vit:a", "point_mae:b")


def test_prepared_key_depends_on_input_format_size_and_modality():
    base = prepared_key("ab" * 32, "mvtec3d", CONFIG)
    assert base == prepared_key("ab" * 32, "mvtec3d", CONFIG)
    assert base != prepared_key("cd" * 32, "mvtec3d", CONFIG)
    assert base != prepared_key("ab" * 32, "folder", CONFIG)
    assert base != prepared_key("ab" * 32, "mvtec3d", dataclasses.replace(CONFIG, image_size=112))
    assert base != prepared_key("ab" * 32, "mvtec3d", dataclasses.replace(CONFIG, modality="2d"))
    # scoring settings do not touch preprocessing
    assert base == prepared_key(
        "ab" * 32, "mvtec3d", dataclasses.replace(CONFIG, interval_ratio=0.5)
    )


def test_feature_keys_follow_their_chain():
    keys = sample_keys("p" * 64, CONFIG, IDS)
    other_2d = sample_keys("p" * 64, CONFIG, Identities("vit:other", "point_mae:b"))
    assert other_2d.tokens_2d != keys.tokens_2d and other_2d.snamd_2d != keys.snamd_2d
    assert other_2d.grouping == keys.grouping and other_2d.tokens_3d == keys.tokens_3d
    other_3d = sample_keys("p" * 64, CONFIG, Identities("vit:a", "point_mae:c"))
    assert other_3d.grouping == keys.grouping  # a new 3D backbone reuses the grouping
    assert other_3d.tokens_3d != keys.tokens_3d and other_3d.tokens_2d == keys.tokens_2d
    regroup = sample_keys("p" * 64, dataclasses.replace(CONFIG, num_groups=512), IDS)
    assert regroup.grouping != keys.grouping and regroup.tokens_3d != keys.tokens_3d
    assert regroup.tokens_2d == keys.tokens_2d
    degrees = sample_keys("p" * 64, dataclasses.replace(CONFIG, aggregation_degrees=(1, 3)), IDS)
    assert degrees.tokens_2d == keys.tokens_2d and degrees.snamd_2d != keys.snamd_2d
    rescoring = sample_keys("p" * 64, dataclasses.replace(CONFIG, interval_ratio=0.5), IDS)
    assert rescoring == keys
    only_2d = sample_keys("p" * 64, dataclasses.replace(CONFIG, modality="2d"), IDS)
    assert only_2d.grouping is None and only_2d.snamd_3d is None


def test_identities_name_weights_without_loading_models(tmp_path):
    config = MuscConfig(modality="2d+3d", image_size=64)
    random_ids = backbone_identities(
        BackboneSpec("vit_tiny_patch16_224", "random", "random"), config
    )
    assert random_ids.backbone_2d.endswith("random-seed0")
    checkpoint = tmp_path / "w.pth"
    checkpoint.write_bytes(b"one")
    first = backbone_identities(
        BackboneSpec("vit_tiny_patch16_224", str(checkpoint), str(checkpoint)), config
    )
    checkpoint.write_bytes(b"two")
    second = backbone_identities(
        BackboneSpec("vit_tiny_patch16_224", str(checkpoint), str(checkpoint)), config
    )
    assert first.backbone_2d != second.backbone_2d and first.backbone_3d != second.backbone_3d
