"""Preparation of real-dataset layouts: pre-cleaned MVTec 3D-AD, 2D runs that see what 2D+3D
runs see, unusable masks and too-small inputs set aside per sample."""

import dataclasses
import shutil

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from musc_core.config import MuscConfig
from musc_core.preprocess_points import clean_mvtec3d, foreground_mask
from tasks.formats.datasets import (
    SampleRecord,
    load_image,
    load_mask,
    load_xyz,
    read_dataset,
)
from tasks.formats.prepare import (
    PLANE_ALREADY_REMOVED,
    PLANE_KEPT,
    PLANE_NOT_BEHIND,
    PLANE_REMOVED,
    prepare_record,
    prepare_records,
)
from tasks.synthetic.generator import generate_line
from tests.core.test_preprocess_points import _sensor_scene

SIZE = 64
CONFIG_2D = MuscConfig(modality="2d", image_size=SIZE)
CONFIG_3D = MuscConfig(modality="3d", image_size=SIZE, num_groups=32, group_size=16, ipg_step=8)
CONFIG_BOTH = MuscConfig(
    modality="2d+3d", image_size=SIZE, num_groups=32, group_size=16, ipg_step=8
)


def pre_clean(root, category="part"):
    """Clean every sample of an MVTec 3D-AD line in place, as the authors' script does: the
    project's own cleaning, written back as the XYZ TIFF, the RGB PNG and the GT PNG."""
    for xyz_path in sorted((root / category / "test").glob("*/xyz/*.tiff")):
        rgb_path = xyz_path.parent.parent / "rgb" / f"{xyz_path.stem}.png"
        gt_path = xyz_path.parent.parent / "gt" / f"{xyz_path.stem}.png"
        mask = load_mask(gt_path) if gt_path.exists() else None
        xyz, rgb, mask = clean_mvtec3d(load_xyz(xyz_path), load_image(rgb_path), mask)
        tifffile.imwrite(xyz_path, xyz, photometric="rgb")
        Image.fromarray(rgb).save(rgb_path)
        if mask is not None:
            Image.fromarray(mask.astype(np.uint8) * 255).save(gt_path)


@pytest.fixture(scope="module")
def lines(tmp_path_factory):
    """The same synthetic MVTec 3D-AD line twice: raw, and pre-cleaned in place."""
    raw = tmp_path_factory.mktemp("raw")
    cleaned = tmp_path_factory.mktemp("cleaned")
    for root in (raw, cleaned):
        generate_line(root, category="part", num_samples=4, image_size=SIZE, defect_rate=0.5,
                      seed=5)
    pre_clean(cleaned)
    return raw, cleaned


def _records(root):
    return read_dataset(root, "mvtec3d", "part")


def test_pre_cleaned_mvtec3d_is_prepared_like_the_raw_data(lines):
    raw, cleaned = lines
    for before, after in zip(_records(raw), _records(cleaned), strict=True):
        fresh = prepare_record(before, "mvtec3d", CONFIG_BOTH)
        again = prepare_record(after, "mvtec3d", CONFIG_BOTH)
        assert fresh.info.cleaning == PLANE_REMOVED
        assert again.info.cleaning == PLANE_ALREADY_REMOVED
        # Independent truth: cleaning is idempotent, so the pre-cleaned files prepare to
        # the tensors the raw files give.
        np.testing.assert_array_equal(again.sample.xyz.numpy(), fresh.sample.xyz.numpy())
        np.testing.assert_array_equal(again.sample.image.numpy(), fresh.sample.image.numpy())
        np.testing.assert_array_equal(again.mask.numpy(), fresh.mask.numpy())


@pytest.mark.parametrize("which", [0, 1], ids=["raw", "pre-cleaned"])
def test_mvtec3d_2d_run_prepares_the_images_of_a_2d_3d_run(lines, which):
    for record in _records(lines[which]):
        only_2d = prepare_record(record, "mvtec3d", CONFIG_2D)
        both = prepare_record(record, "mvtec3d", CONFIG_BOTH)
        assert only_2d.sample.xyz is None
        np.testing.assert_array_equal(only_2d.sample.image.numpy(), both.sample.image.numpy())
        np.testing.assert_array_equal(only_2d.mask.numpy(), both.mask.numpy())
        if which == 0:  # the raw background is zeroed in 2D too: not the uncleaned image
            uncleaned = prepare_record(record, "folder", CONFIG_2D).sample.image
            assert not np.array_equal(only_2d.sample.image.numpy(), uncleaned.numpy())


def test_mvtec3d_2d_sample_without_xyz_is_set_aside(lines, tmp_path):
    record = _records(lines[0])[0]
    alone = record.__class__(**{**record.__dict__, "xyz_path": None})
    prepared, aside = prepare_records([alone], "mvtec3d", CONFIG_2D)
    assert prepared == [] and "no XYZ map" in aside[0].problem
    assert record.image_path in aside[0].problem


def _folder(tmp_path, image, mask=None):
    root = tmp_path / "line"
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "s.png")
    if mask is not None:
        Image.fromarray(mask).save(root / "masks" / "s.png")
    return read_dataset(root, "folder", "line")


def test_mask_of_another_size_is_set_aside_with_its_path(tmp_path):
    image = np.full((32, 32, 3), 90, np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 255
    prepared, aside = prepare_records(_folder(tmp_path, image, mask), "folder", CONFIG_2D)
    assert prepared == []
    assert "masks/s.png" in aside[0].problem and "16x16" in aside[0].problem
    assert "32x32" in aside[0].problem


def test_non_binary_colour_mask_is_set_aside(tmp_path):
    image = np.full((32, 32, 3), 90, np.uint8)
    mask = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    prepared, aside = prepare_records(_folder(tmp_path, image, mask), "folder", CONFIG_2D)
    assert prepared == [] and "not a binary mask" in aside[0].problem


@pytest.mark.parametrize("side", [1, 7])
def test_input_below_one_patch_is_set_aside(tmp_path, side):
    image = np.full((side, side, 3), 90, np.uint8)
    prepared, aside = prepare_records(_folder(tmp_path, image), "folder", CONFIG_2D)
    assert prepared == []
    assert f"{side}x{side}" in aside[0].problem and "at least 8" in aside[0].problem
    ok, none_aside = prepare_records(
        _folder(tmp_path, np.full((8, 8, 3), 90, np.uint8)), "folder", CONFIG_2D
    )
    assert len(ok) == 1 and none_aside == []


def test_eyecandies_2d_run_prepares_the_images_of_a_2d_3d_run(tmp_path):
    data = tmp_path / "CandyCane" / "test_public" / "data"
    data.mkdir(parents=True)
    v, u = np.mgrid[0:32, 0:32] / 32 - 0.5
    rgb = np.full((32, 32, 3), 40, np.uint8)
    rgb[u**2 + v**2 < 0.1] = 220
    Image.fromarray(rgb).save(data / "000_image_0.png")
    depth = (30000 - 8000 * (u**2 + v**2 < 0.1)).astype(np.uint16)
    Image.fromarray(depth).save(data / "000_depth.png")
    (data / "000_info_depth.yaml").write_text("normalization:\n  min: 0.5\n  max: 1.5\n")
    np.savetxt(data / "000_pose.txt", np.eye(4))
    (record,) = read_dataset(tmp_path, "eyecandies", "CandyCane")
    both = prepare_record(record, "eyecandies", CONFIG_BOTH)
    only_2d = prepare_record(record, "eyecandies", CONFIG_2D)
    assert both.info.cleaning == "eyecandies" and both.sample.xyz is not None
    # Eyecandies cleaning leaves the image as it is: both runs score the same pixels, which
    # are the uncleaned image's
    np.testing.assert_array_equal(only_2d.sample.image.numpy(), both.sample.image.numpy())
    uncleaned = prepare_record(record, "folder", CONFIG_2D).sample.image
    np.testing.assert_array_equal(only_2d.sample.image.numpy(), uncleaned.numpy())


def test_xyz_map_below_one_patch_is_set_aside(tmp_path):
    root = tmp_path / "line"
    (root / "xyz").mkdir(parents=True)
    Image.fromarray(np.full((2, 2, 3), 90, np.uint8)).save(root / "s.png")
    tifffile.imwrite(root / "xyz" / "s.tiff", np.ones((2, 2, 3), np.float32), photometric="rgb")
    records = read_dataset(root, "folder", "line")
    for config in (CONFIG_3D, CONFIG_BOTH):
        prepared, aside = prepare_records(records, "folder", config)
        assert prepared == [] and "at least 8" in aside[0].problem


def test_cached_entries_are_checked_again_under_each_run_s_settings(lines, tmp_path):
    from tasks.cache.keys import prepared_keys
    from tasks.discover import discover_line
    from tasks.features import prepare_samples
    from tasks.runtime import Runtime

    data = tmp_path / "data"
    shutil.copytree(lines[0], data)
    runtime = Runtime(str(tmp_path / "cache"), "cpu")

    def outcomes(config):
        found, aside = discover_line(str(data), "mvtec3d", "part")
        assert aside == []
        items = [(s, prepared_keys(s.digests, "mvtec3d", "part", config)) for s in found]
        return prepare_samples.fn(items, "mvtec3d", config, runtime)

    first = outcomes(CONFIG_BOTH)
    assert [problem for _, problem, _ in first] == [None] * 4
    assert {cleaning for _, _, cleaning in first} == {PLANE_REMOVED}
    # more groups than the samples have points: the same cached entries, refused now
    more = MuscConfig(modality="2d+3d", image_size=SIZE, num_groups=4096, group_size=16,
                      ipg_step=8)
    assert all("the grouping needs at least 4096" in problem for _, problem, _ in outcomes(more))
    # a mask replaced by one of another size: that sample alone is set aside
    mask_file = sorted((data / "part" / "test").glob("*/gt/*.png"))[0]
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(mask_file)
    again = outcomes(CONFIG_BOTH)
    refused = [(name, problem) for name, problem, _ in again if problem]
    assert len(refused) == 1 and str(mask_file) in refused[0][1]


def _frame_filling_record(tmp_path):
    """An MVTec 3D-AD record of a pre-cleaned part whose top face crosses the border."""
    xyz, _ = _sensor_scene(plane=False, reach_border=True)
    tifffile.imwrite(tmp_path / "000.tiff", xyz, photometric="rgb")
    rgb = np.full(xyz.shape, 128, dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "000.png")
    return SampleRecord(
        name="good/000", category="part", image_path=str(tmp_path / "000.png"),
        xyz_path=str(tmp_path / "000.tiff"), label=0,
    )


def test_a_pre_cleaned_part_reaching_the_border_keeps_its_top_face(tmp_path):
    record = _frame_filling_record(tmp_path)
    config = MuscConfig(image_size=64, num_groups=64, group_size=16, ipg_step=8)
    auto = prepare_record(record, "mvtec3d", config)
    assert auto.info.cleaning == PLANE_NOT_BEHIND
    read, after_plane, kept = auto.info.cleaned_points
    assert read == after_plane == kept
    keep = prepare_record(record, "mvtec3d", dataclasses.replace(config, support_plane="keep"))
    assert keep.info.cleaning == PLANE_KEPT and torch.equal(keep.sample.xyz, auto.sample.xyz)


def test_a_part_destroyed_by_the_plane_removal_is_set_aside_naming_the_step(tmp_path):
    record = _frame_filling_record(tmp_path)
    config = MuscConfig(image_size=64, num_groups=1024, group_size=16, ipg_step=8,
                        support_plane="remove")
    prepared, aside = prepare_records([record], "mvtec3d", config)
    assert prepared == [] and len(aside) == 1
    problem = aside[0].problem
    assert problem.startswith(record.xyz_path) and "the grouping needs at least 1024" in problem
    assert "support-plane removal took" in problem and "--support-plane keep" in problem


@pytest.mark.parametrize("framing", ["centred", "crossing"])
def test_realistic_raw_and_pre_cleaned_scans_clean_to_the_same_part(tmp_path, framing):
    # The same parts rendered raw and pre-cleaned (the pre-cleaned scan is the raw one without
    # its plane points): cleaning the raw scan removes its plane and keeps the part; the
    # pre-cleaned part keeps every point, also where its top face crosses the border.
    from tasks.synthetic.generator import realistic_line_kwargs

    config = MuscConfig(modality="3d", image_size=224)
    prepared = {}
    for plane in (True, False):
        root = tmp_path / str(plane)
        generate_line(root, num_samples=2, defect_rate=0.0, seed=4,
                      **realistic_line_kwargs(400, support_plane=plane, framing=framing))
        records = read_dataset(root, "mvtec3d", "part")
        prepared[plane] = [prepare_record(r, "mvtec3d", config) for r in records]
    for raw, cleaned in zip(prepared[True], prepared[False], strict=True):
        assert raw.info.cleaning == PLANE_REMOVED
        expected = PLANE_NOT_BEHIND if framing == "crossing" else PLANE_ALREADY_REMOVED
        assert cleaned.info.cleaning == expected
        read, after_plane, kept = cleaned.info.cleaned_points
        assert read == after_plane == kept > 50_000
        raw_kept = raw.info.cleaned_points[2]
        assert 0.8 * kept < raw_kept <= kept  # the part, less its foot near the plane
        raw_points = foreground_mask(raw.sample.xyz.numpy())
        part_points = foreground_mask(cleaned.sample.xyz.numpy())
        assert (raw_points <= part_points).all()  # nothing of the plane is left
