"""Cache keys change exactly with what the cached computation depends on.

One test per row of ``docs/cache-keys.md``: an input the entry does not depend on is changed
and the key must stay (the entry is reused), an input it depends on is changed and the key
must change.
"""

import dataclasses

import pytest

from musc_core import hardware
from musc_core.config import MuscConfig
from tasks.backbones import BackboneSpec, backbone_identities
from tasks.cache.keys import (
    Identities,
    _key,
    decisions_key,
    pairs_key,
    prepared_keys,
    reduced_key,
    sample_keys,
)
from tasks.planning.blocks import PoolSample, batch_blocks, plan_scoring
from tasks.runtime import agreed_dtypes, worker_dtypes

CONFIG = MuscConfig(modality="2d+3d")
IDS = Identities("vit:a", "point_mae:b")
DIGESTS = {"image": "1" * 64, "xyz": "2" * 64, "mask": "3" * 64}
EYECANDIES = {"image": "1" * 64, "depth": "4" * 64, "info": "5" * 64, "pose": "6" * 64}


def _keys(digests=None, fmt="mvtec3d", category="part", config=CONFIG, identities=IDS):
    prepared = prepared_keys(DIGESTS if digests is None else digests, fmt, category, config)
    return sample_keys(prepared, config, identities)


def _with(**changes):
    return {**DIGESTS, **changes}


def test_prepared_2d_depends_on_image_cleaning_inputs_format_and_size_only():
    base = _keys().prepared.image
    # unrelated: the mask (labels), the modality, scoring settings
    assert _keys(_with(mask="9" * 64)).prepared.image == base
    assert _keys({k: v for k, v in DIGESTS.items() if k != "mask"}).prepared.image == base
    assert _keys(config=dataclasses.replace(CONFIG, modality="2d")).prepared.image == base
    assert _keys(config=dataclasses.replace(CONFIG, num_groups=64)).prepared.image == base
    # related: the image, the XYZ map that cleans MVTec 3D-AD images, format, size
    assert _keys(_with(image="9" * 64)).prepared.image != base
    assert _keys(_with(xyz="9" * 64)).prepared.image != base
    assert _keys(fmt="folder").prepared.image != base
    assert _keys(config=dataclasses.replace(CONFIG, image_size=112)).prepared.image != base
    # the folder format does not clean images: its XYZ map is unrelated there
    folder = _keys(fmt="folder").prepared.image
    assert _keys(_with(xyz="9" * 64), fmt="folder").prepared.image == folder
    # Eyecandies cleaning leaves the image unchanged: the depth files are unrelated
    eye = _keys(EYECANDIES, fmt="eyecandies").prepared.image
    assert _keys({**EYECANDIES, "depth": "9" * 64}, fmt="eyecandies").prepared.image == eye


def test_prepared_3d_depends_on_point_inputs_format_size_and_eyecandies_category():
    base = _keys().prepared.points
    assert _keys(_with(mask="9" * 64)).prepared.points == base
    assert _keys(_with(image="9" * 64)).prepared.points == base  # MVTec 3D-AD: XYZ alone
    assert _keys(config=dataclasses.replace(CONFIG, modality="3d")).prepared.points == base
    assert _keys(category="other").prepared.points == base
    assert _keys(_with(xyz="9" * 64)).prepared.points != base
    assert _keys(fmt="folder").prepared.points != base
    assert _keys(config=dataclasses.replace(CONFIG, image_size=112)).prepared.points != base
    eye = _keys(EYECANDIES, fmt="eyecandies", category="CandyCane").prepared.points
    # Eyecandies: the brightest cluster reads the image; the plane rule reads the category
    bright = _keys({**EYECANDIES, "image": "9" * 64}, "eyecandies", "CandyCane")
    assert bright.prepared.points != eye
    assert _keys(EYECANDIES, "eyecandies", "Marshmallow").prepared.points != eye
    relabelled = _keys({**EYECANDIES, "mask": "9" * 64}, "eyecandies", "CandyCane")
    assert relabelled.prepared.points == eye


def test_mask_depends_on_mask_format_and_size_only():
    base = _keys().prepared.mask
    assert _keys(_with(image="9" * 64, xyz="8" * 64)).prepared.mask == base
    assert _keys(config=dataclasses.replace(CONFIG, modality="2d")).prepared.mask == base
    assert _keys(_with(mask="9" * 64)).prepared.mask != base
    assert _keys(fmt="folder").prepared.mask != base
    assert _keys(config=dataclasses.replace(CONFIG, image_size=112)).prepared.mask != base
    assert _keys({k: v for k, v in DIGESTS.items() if k != "mask"}).prepared.mask is None


def test_tokens_2d_and_snamd_2d():
    keys = _keys()
    for unrelated in (
        _keys(_with(mask="9" * 64)),
        _keys(config=dataclasses.replace(CONFIG, modality="2d")),
        _keys(identities=Identities("vit:a", "point_mae:other")),
        _keys(config=dataclasses.replace(CONFIG, num_groups=64, interval_ratio=0.5)),
    ):
        assert (unrelated.tokens_2d, unrelated.snamd_2d) == (keys.tokens_2d, keys.snamd_2d)
    other = _keys(identities=Identities("vit:other", "point_mae:b"))
    assert other.tokens_2d != keys.tokens_2d and other.snamd_2d != keys.snamd_2d
    assert _keys(_with(image="9" * 64)).tokens_2d != keys.tokens_2d
    assert _keys(config=dataclasses.replace(CONFIG, vit_dtype="bfloat16")).tokens_2d != (
        keys.tokens_2d
    )
    degrees = _keys(config=dataclasses.replace(CONFIG, aggregation_degrees=(1, 3)))
    assert degrees.tokens_2d == keys.tokens_2d and degrees.snamd_2d != keys.snamd_2d


def test_grouping_tokens_3d_and_snamd_3d():
    keys = _keys()
    for unrelated in (
        _keys(_with(mask="9" * 64, image="8" * 64)),
        _keys(config=dataclasses.replace(CONFIG, modality="3d")),
        _keys(identities=Identities("vit:other", "point_mae:b")),
    ):
        assert (unrelated.grouping, unrelated.tokens_3d, unrelated.snamd_3d) == (
            keys.grouping, keys.tokens_3d, keys.snamd_3d
        )
    other_3d = _keys(identities=Identities("vit:a", "point_mae:c"))
    assert other_3d.grouping == keys.grouping  # a new 3D backbone reuses the grouping
    assert other_3d.tokens_3d != keys.tokens_3d and other_3d.snamd_3d != keys.snamd_3d
    regroup = _keys(config=dataclasses.replace(CONFIG, num_groups=512))
    assert regroup.grouping != keys.grouping and regroup.tokens_3d != keys.tokens_3d
    assert _keys(_with(xyz="9" * 64)).grouping != keys.grouping
    batchnorm = _keys(config=dataclasses.replace(CONFIG, point_batchnorm="running"))
    assert batchnorm.grouping == keys.grouping and batchnorm.tokens_3d != keys.tokens_3d
    dtypes = {d: _keys(config=dataclasses.replace(CONFIG, point_dtype=d))
              for d in ("float32", "bfloat16", "auto")}
    assert len({k.tokens_3d for k in dtypes.values()}) == 3
    assert {k.grouping for k in dtypes.values()} == {keys.grouping}
    # float32 tokens keep the key they had before the setting existed (stored caches hold it)
    assert dtypes["float32"].tokens_3d == _key(
        "tokens_3d", grouping=keys.grouping, backbone=IDS.backbone_3d, layers=CONFIG.layers_3d,
        batchnorm=CONFIG.point_batchnorm,
    )
    degrees = _keys(config=dataclasses.replace(CONFIG, aggregation_degrees=(1, 3)))
    assert degrees.tokens_3d == keys.tokens_3d and degrees.snamd_3d != keys.snamd_3d
    assert _keys(config=dataclasses.replace(CONFIG, modality="2d")).grouping is None


def _pool(config, masks, images="0123"):
    return [
        PoolSample(
            f"s{i}", "b",
            _keys({"image": c * 64, "xyz": c * 64, **({"mask": m * 64} if m != " " else {})},
                  config=config),
        )
        for i, (c, m) in enumerate(zip(images, masks, strict=True))
    ]


def test_pairs_and_reduced_keys_ignore_masks_and_follow_features_and_settings():
    config = CONFIG
    base = plan_scoring(batch_blocks(_pool(config, "abcd"), 2), config, None)
    relabelled = plan_scoring(batch_blocks(_pool(config, "e f "), 2), config, None)
    assert [s.key for s in relabelled.shards] == [s.key for s in base.shards]
    assert [i.key for b in relabelled.reduce for i in b] == [i.key for b in base.reduce for i in b]
    other = plan_scoring(batch_blocks(_pool(config, "abcd", "0129"), 2), config, None)
    assert {s.key for s in other.shards} != {s.key for s in base.shards}
    dtype = dataclasses.replace(config, distance_dtype="bfloat16")
    assert {s.key for s in plan_scoring(base.blocks, dtype, None).shards}.isdisjoint(
        s.key for s in base.shards
    )
    # one entry per modality: the 2D pairs of a 2D+3D run are those of a 2D run, and so on
    for modality, slot in (("2d", 0), ("3d", 1)):
        alone = dataclasses.replace(config, modality=modality)
        single = plan_scoring(batch_blocks(_pool(alone, "abcd"), 2), alone, None)
        assert [s.key[slot] for s in single.shards] == [s.key[slot] for s in base.shards]
        assert all(s.key[1 - slot] is None for s in single.shards)
    assert all(None not in s.key for s in base.shards)
    # the reduction: unrelated RsCon window, related Interval Average ratio
    sample, refs = base.samples[0].keys, [s.keys for s in base.samples[1:]]
    windows = dataclasses.replace(config, rescoring_windows=(1, 5))
    assert reduced_key(sample, refs, windows) == reduced_key(sample, refs, config)
    ratio = dataclasses.replace(config, interval_ratio=0.5)
    assert reduced_key(sample, refs, ratio) != reduced_key(sample, refs, config)
    assert reduced_key(sample, refs[:-1], config) != reduced_key(sample, refs, config)


def test_decisions_key_follows_the_pool_and_the_decision_settings():
    config = CONFIG
    pool = ["r1", "r2", "r3", "r4"]
    base = decisions_key(pool, 2, config, False)
    assert decisions_key(list(pool), 2, dataclasses.replace(config, interval_ratio=0.5), False) \
        == base, "the Interval Average ratio reaches the decisions through the reduced keys"
    assert decisions_key(pool, 2, dataclasses.replace(config, image_size=64), False) == base
    changed = [
        decisions_key(pool[:3], 2, config, False),
        decisions_key(["r2", "r1", "r3", "r4"], 2, config, False),
        decisions_key(pool, 3, config, False),
        decisions_key(pool, 2, config, True),
        decisions_key(pool, 2, dataclasses.replace(config, rescoring_windows=(1, 5)), False),
        decisions_key(pool, 2, dataclasses.replace(config, flag_mad_k=4.0), False),
    ]
    assert len({base, *changed}) == len(changed) + 1


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


def test_the_support_plane_mode_enters_mvtec3d_prepared_keys_only():
    keep = dataclasses.replace(CONFIG, support_plane="keep")
    assert _keys(config=keep).prepared.image != _keys().prepared.image
    assert _keys(config=keep).prepared.points != _keys().prepared.points
    assert _keys(config=keep).prepared.mask == _keys().prepared.mask  # padding only
    folder = _keys(fmt="folder").prepared
    assert _keys(fmt="folder", config=keep).prepared == folder  # no plane step there


#: Keys of CONFIG's sample (tokens and SNAMD 2D, 3D; its pairs with itself, 2D and 3D; its
#: reduction) with every dtype setting explicit, as derived before keys named the dtype a
#: worker resolved (commit b9fdd8c): stored caches hold their entries under these.
PINNED = {
    "float32": (
        "406f9ce6442fa49d7e56bfcbaab3401c38e72a2cfc28b80b0861f5bb59f20a13",
        "eda8e8f333ae890b7a3060a8cabb8d66a97027fa5d862d3c5b0304da2b4141cc",
        "35db4c8f562438c8578084ad42f0dc3ecbc59d455fe713a7837453b4efae5c2c",
        "447d1cea53296afe49f5933cdb544da3a443f2cece45a700a7d00eab4a381764",
        "1c97e6fafde856578ab3009c5ae431ac6a786152a912dfa0c13baeca1b3bf025",
        "21db858732abf16cc3155d501412f253055d6dd1dea0d8ee21849f52451fb857",
        "914aa964505830f056bf936ee19d889ca3aa5a1df386562f167d123af618a19b",
    ),
    "bfloat16": (
        "c67c64b0dc8fdedc27cb7f905d2d585f1f27c1abfd62cdc8530b6797d13de330",
        "ea901d2fc0754e6993790cbd46414732b21024dd1f5695ae9d8b7bd0ddfe22a7",
        "c1aa241b673a5881fcb52354e57bbdcab030ff559449638e67466db01c6eca37",
        "413190fe0caf7caac645543bdbc76ebb2f031e8a642f4f49350449afdcfbb790",
        "e80e4ab1e7179cc0be9fb59fc3a65c7ec2a87f48c22da8e7592c98a5b0eb61ce",
        "e527453baee10ae7fb48c97e4a90e9f79e9bbd158ff0bf803411e4cfb072b86d",
        "188bee0ef6fea39bcca42e269012a00cb3e22b2a6b6819cfffe4510c135722b9",
    ),
}


def _dtype_keys(config):
    keys = _keys(config=config)
    return (
        keys.tokens_2d, keys.snamd_2d, keys.tokens_3d, keys.snamd_3d,
        *pairs_key([keys], [keys], config), reduced_key(keys, [keys], config),
    )


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_keys_name_the_dtype_the_workers_resolved(monkeypatch, fast_bf16):
    """``auto`` gives the key of the dtype it runs in: float32 entries keep their old keys."""
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert CONFIG.vit_dtype == CONFIG.point_dtype == CONFIG.distance_dtype == "auto"
    resolved, warnings = agreed_dtypes(CONFIG, {"worker": worker_dtypes(CONFIG, "cpu")})
    assert warnings == []
    assert _dtype_keys(resolved) == PINNED["bfloat16" if fast_bf16 else "float32"]
    explicit = {name: "float32" for name in hardware.DTYPE_SETTINGS}
    assert _dtype_keys(dataclasses.replace(CONFIG, **explicit)) == PINNED["float32"]
    assert set(_dtype_keys(CONFIG)).isdisjoint(PINNED["float32"] + PINNED["bfloat16"])
