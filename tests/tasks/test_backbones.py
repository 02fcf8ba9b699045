"""3D backbone choice: FPFH is weight-free (never "random weights"), named by its parameters."""

import pytest

from musc_core.config import MuscConfig
from musc_core.fpfh import FpfhFeatureExtractor, FpfhParams
from musc_core.point_mae import PointFeatureExtractor
from tasks.backbones import BackboneSpec, backbone_identities, build_3d, build_backbones

CONFIG_3D = MuscConfig(modality="3d")


def test_fpfh_spec_builds_the_weight_free_extractor():
    spec = BackboneSpec(name_3d="fpfh")
    extractor = build_3d(spec, CONFIG_3D)
    assert isinstance(extractor, FpfhFeatureExtractor)
    assert not spec.random_weights(CONFIG_3D)
    built = build_backbones(spec, CONFIG_3D, "cpu")
    assert not built.random_weights
    assert built.identities() == {"3d": FpfhParams().identity}
    assert backbone_identities(spec, CONFIG_3D).backbone_3d == FpfhParams().identity
    assert "weight-free" in FpfhParams().identity and "random" not in FpfhParams().identity


def test_fpfh_with_a_random_vit_only_reports_the_vit_as_random():
    spec = BackboneSpec("vit_tiny_patch16_224", "random", None, 8, "fpfh")
    assert spec.random_weights(MuscConfig(modality="2d+3d"))
    assert not spec.random_weights(CONFIG_3D)


def test_point_mae_stays_the_default():
    spec = BackboneSpec(weights_3d="random")
    assert spec.name_3d == "point-mae"
    assert isinstance(build_3d(spec, CONFIG_3D), PointFeatureExtractor)
    assert spec.random_weights(CONFIG_3D)
    assert backbone_identities(spec, CONFIG_3D).backbone_3d.startswith("point_mae:random")


def test_bad_3d_backbone_choices_name_the_fix():
    with pytest.raises(ValueError, match="drop --weights-3d"):
        BackboneSpec(weights_3d="random", name_3d="fpfh")
    with pytest.raises(ValueError, match="3D backbone must be one of"):
        BackboneSpec(name_3d="pointnet")
