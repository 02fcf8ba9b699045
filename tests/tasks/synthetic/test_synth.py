"""The synthetic line generator: layout, determinism, defects that show where they should."""

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from tasks.formats.datasets import read_dataset
from tasks.synthetic.generator import DEFECT_TYPES, SHAPES, generate_line, plan_line, render_sample

SIZE = 64
FOLDERS = ("good",) + DEFECT_TYPES


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = generate_line(root, num_samples=12, image_size=SIZE, defect_rate=0.5, seed=7)
    return root, summary


def rgb_of(path):
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def gt_of(path):
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.asarray(image)


def files_of(root):
    paths = sorted(Path(root).rglob("*"))
    return {p.relative_to(root): p.read_bytes() for p in paths if p.is_file()}


def rendered(seed=7, num_samples=12, defect_rate=0.5, **kwargs):
    """(spec, with defect, without defect) for every sample of a planned line."""
    model, specs = plan_line(
        num_samples=num_samples, image_size=SIZE, defect_rate=defect_rate, seed=seed, **kwargs
    )
    return model, [
        (spec, render_sample(model, spec), render_sample(model, spec, apply_defect=False))
        for spec in specs
    ]


# ------------------------------------------------------------------------------------------
# layout, files, summary


def test_layout_file_types_and_summary(line):
    root, summary = line
    assert summary.root == root and summary.category == "part" and summary.image_size == SIZE
    assert summary.num_samples == 12 and sum(summary.counts.values()) == 12
    assert summary.shape in SHAPES
    test = root / "part" / "test"
    folders = sorted(p.name for p in test.iterdir())
    assert folders == sorted(k for k in FOLDERS if summary.counts[k])
    for folder in folders:
        stems = {sub: sorted(p.stem for p in (test / folder / sub).iterdir()) for sub in
                 ("rgb", "xyz", "gt")}
        expected = [f"{i:03d}" for i in range(summary.counts[folder])]
        assert stems == {"rgb": expected, "xyz": expected, "gt": expected}
        for stem in expected:
            rgb = rgb_of(test / folder / "rgb" / f"{stem}.png")
            assert rgb.shape == (SIZE, SIZE, 3) and rgb.dtype == np.uint8
            xyz = tifffile.imread(test / folder / "xyz" / f"{stem}.tiff")
            assert xyz.shape == (SIZE, SIZE, 3) and xyz.dtype == np.float32
            assert np.isfinite(xyz).all()
            gt = gt_of(test / folder / "gt" / f"{stem}.png")
            assert gt.shape == (SIZE, SIZE) and gt.dtype == np.uint8
            assert set(np.unique(gt)) <= {0, 255}
    info = json.loads((root / "part" / "line.json").read_text())
    assert "synthetic data" in info["note"]
    assert info["parameters"] == {
        "category": "part", "num_samples": 12, "image_size": SIZE, "defect_rate": 0.5,
        "seed": 7, "support_plane": True, "shape": summary.shape, "pixel_pitch": None,
        "camera_distance": None, "framing": "centred",
    }
    assert info["counts"] == summary.counts and len(info["samples"]) == 12


def test_reader_sees_the_line(line):
    root, summary = line
    records = read_dataset(root, "mvtec3d", "part")
    assert len(records) == 12
    assert sum(r.label == 1 for r in records) == 12 - summary.counts["good"]
    assert all(r.image_path and r.xyz_path and r.mask_path for r in records)


def test_files_are_what_render_sample_gives(line):
    root, _ = line
    model, specs = plan_line(num_samples=12, image_size=SIZE, defect_rate=0.5, seed=7)
    for spec in specs:
        folder = root / "part" / "test" / spec.defect_type
        sample = render_sample(model, spec)
        np.testing.assert_array_equal(rgb_of(folder / "rgb" / f"{spec.stem}.png"), sample.rgb)
        np.testing.assert_array_equal(tifffile.imread(folder / "xyz" / f"{spec.stem}.tiff"),
                                      sample.xyz)
        np.testing.assert_array_equal(gt_of(folder / "gt" / f"{spec.stem}.png") > 0, sample.mask)


# ------------------------------------------------------------------------------------------
# determinism


def test_same_arguments_give_byte_identical_files(tmp_path):
    kwargs = dict(num_samples=6, image_size=SIZE, defect_rate=0.5, seed=11)
    generate_line(tmp_path / "a", **kwargs)
    generate_line(tmp_path / "b", **kwargs)
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 6 * 3 + 1
    assert all(a[k] == b[k] for k in a)
    generate_line(tmp_path / "c", **{**kwargs, "seed": 12})
    c = files_of(tmp_path / "c")
    rgb_a = [v for k, v in sorted(a.items()) if k.parts[-2] == "rgb"]
    rgb_c = [v for k, v in sorted(c.items()) if k.parts[-2] == "rgb"]
    assert rgb_a != rgb_c


def test_rewriting_own_line_is_allowed_foreign_folder_is_refused(tmp_path):
    generate_line(tmp_path, num_samples=3, image_size=SIZE, seed=1)
    before = files_of(tmp_path)
    generate_line(tmp_path, num_samples=3, image_size=SIZE, seed=1)
    assert files_of(tmp_path) == before
    generate_line(tmp_path, num_samples=2, image_size=SIZE, seed=1)  # no stale files left
    assert len(files_of(tmp_path)) == 2 * 3 + 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="mine"):
        generate_line(tmp_path, category="mine", num_samples=2, image_size=SIZE)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "user data"


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_samples=0), dict(image_size=16), dict(defect_rate=1.5), dict(defect_rate=-0.1),
     dict(shape="teapot")],
)
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_line(tmp_path, **{"image_size": SIZE, **kwargs})


# ------------------------------------------------------------------------------------------
# defects


@pytest.mark.parametrize(
    ("num_samples", "rate"), [(12, 0.5), (10, 0.25), (7, 0.4), (5, 0.0), (4, 1.0), (40, 0.4)]
)
def test_defect_counts_follow_the_rate_and_are_balanced(num_samples, rate):
    _, specs = plan_line(num_samples=num_samples, image_size=SIZE, defect_rate=rate, seed=3)
    kinds = [s.defect_type for s in specs]
    defective = sum(k != "good" for k in kinds)
    assert defective == int(np.floor(num_samples * rate + 0.5))
    per_kind = [kinds.count(k) for k in DEFECT_TYPES]
    assert max(per_kind) - min(per_kind) <= 1
    if defective >= 3:
        assert min(per_kind) >= 1


def test_gt_nonempty_exactly_for_defective_samples_and_sized(tmp_path):
    generate_line(tmp_path, num_samples=12, image_size=SIZE, defect_rate=0.75, seed=2,
                  support_plane=False)
    for record in read_dataset(tmp_path, "mvtec3d", "part"):
        gt = gt_of(record.mask_path) > 0
        assert gt.any() == (record.label == 1), record.name
        if record.label == 1:
            xyz = tifffile.imread(record.xyz_path)
            obj = np.all(xyz != 0, axis=-1)  # no plane: measured pixels are the object
            fraction = gt.sum() / obj.sum()
            assert 0.02 < fraction < 0.12, (record.name, fraction)
            assert (gt & obj).sum() >= 0.6 * gt.sum()  # on the object


def test_dent_changes_only_the_geometry():
    _, samples = rendered(defect_rate=1.0, num_samples=9)
    dents = [(s, a, b) for s, a, b in samples if s.defect_type == "dent"]
    assert len(dents) == 3
    for _, dented, plain in dents:
        mask = dented.mask
        assert mask.sum() > 20
        # The image is exactly the one of the same sample without the dent.
        np.testing.assert_array_equal(dented.rgb, plain.rgb)
        assert not plain.mask.any()
        # The geometry differs inside the mask (same noise in both renders, so the difference
        # is the deformation itself), and nowhere else.
        both = np.all(dented.xyz != 0, -1) & np.all(plain.xyz != 0, -1)
        dz = dented.xyz[..., 2] - plain.xyz[..., 2]
        assert np.median(np.abs(dz[mask & both])) > 2e-4  # > the 0.2 mm sensor noise
        assert np.abs(dz).max() > 5e-4
        assert np.abs(dz[~mask & both]).max() < 2e-4
        # The check above can fail: shading the dented surface would change the image.
        # Normals tilt by several degrees inside the dent (visible under Lambertian shading).
        pitch = 0.10 / SIZE
        gy, gx = np.gradient(dz.astype(np.float64) * both, pitch)
        tilt = np.degrees(np.arctan(np.hypot(gx, gy)))[mask & both]
        assert tilt.max() > 2.0


def test_dent_rgb_is_statistically_like_the_undeformed_part_file_level(line):
    # File level, no hook: inside a dent mask the image matches the undented render within
    # sensor noise (the RGB noise has sigma 2 levels); a shaded dent would move it further.
    root, _ = line
    model, specs = plan_line(num_samples=12, image_size=SIZE, defect_rate=0.5, seed=7)
    for spec in specs:
        if spec.defect_type != "dent":
            continue
        folder = root / "part" / "test" / "dent"
        rgb = rgb_of(folder / "rgb" / f"{spec.stem}.png").astype(float)
        mask = gt_of(folder / "gt" / f"{spec.stem}.png") > 0
        plain = render_sample(model, spec, apply_defect=False).rgb.astype(float)
        assert np.abs(rgb - plain)[mask].mean() < 0.5


def test_colour_changes_only_the_image():
    _, samples = rendered(defect_rate=1.0, num_samples=9)
    colours = [(s, a, b) for s, a, b in samples if s.defect_type == "colour"]
    assert len(colours) == 3
    for _, stained, plain in colours:
        np.testing.assert_array_equal(stained.xyz, plain.xyz)
        diff = np.abs(stained.rgb.astype(int) - plain.rgb.astype(int)).max(-1)
        assert np.median(diff[stained.mask]) > 20
        assert diff[~stained.mask].max() == 0


def test_crack_changes_image_and_geometry():
    _, samples = rendered(defect_rate=1.0, num_samples=9)
    cracks = [(s, a, b) for s, a, b in samples if s.defect_type == "crack"]
    assert len(cracks) == 3
    for _, cracked, plain in cracks:
        mask = cracked.mask
        darker = plain.rgb.astype(int).sum(-1) - cracked.rgb.astype(int).sum(-1)
        assert np.median(darker[mask]) > 60
        valid_a, valid_b = np.all(cracked.xyz != 0, -1), np.all(plain.xyz != 0, -1)
        both = valid_a & valid_b
        dz = cracked.xyz[..., 2] - plain.xyz[..., 2]
        assert np.median(dz[mask & both]) > 1e-3  # the groove floor is deeper by > 1 mm
        assert (mask & valid_b & ~valid_a).any()  # part of the floor is not measured


# ------------------------------------------------------------------------------------------
# geometry: missing points, support plane, camera


def test_missing_points_are_exact_zeros_and_the_border_is_empty(line):
    root, _ = line
    for path in sorted((root / "part" / "test").rglob("*.tiff")):
        xyz = tifffile.imread(path)
        zero = xyz == 0
        assert np.array_equal(zero.any(-1), zero.all(-1)), path  # a point has all or nothing
        assert zero[0].all() and zero[-1].all() and zero[:, 0].all() and zero[:, -1].all()
        assert 0 < zero.all(-1).mean() < 0.1  # border + dropouts only: the plane is measured
        assert (xyz[..., 2][~zero.all(-1)] > 0.3).all()  # camera ~0.4 m away


def test_support_plane_is_a_tilted_plane_below_the_object(line):
    root, _ = line
    info = json.loads((root / "part" / "line.json").read_text())
    focal = info["model"]["focal"]
    for path in sorted((root / "part" / "test").rglob("*.tiff"))[:4]:
        xyz = tifffile.imread(path).astype(np.float64)
        valid = np.all(xyz != 0, -1)
        band = np.zeros_like(valid)
        band[:8], band[-8:], band[:, :8], band[:, -8:] = True, True, True, True
        pts = xyz[band & valid]
        design = np.c_[pts[:, 0], pts[:, 1], np.ones(len(pts))]
        coef, *_ = np.linalg.lstsq(design, pts[:, 2], rcond=None)
        assert np.abs(design @ coef - pts[:, 2]).max() < 1.5e-3  # noise 0.2 mm
        tilt = np.degrees(np.arctan(np.hypot(coef[0], coef[1])))
        assert 0.5 < tilt < 4.0
        all_pts = xyz[valid]
        height = all_pts[:, 0] * coef[0] + all_pts[:, 1] * coef[1] + coef[2] - all_pts[:, 2]
        assert (height > 0.008).sum() > 0.1 * valid.sum()  # the object stands out > 8 mm
        # pinhole camera: x = (u - cx) z / f, y = (v - cy) z / f
        rows, cols = np.nonzero(valid)
        u = xyz[rows, cols, 0] / xyz[rows, cols, 2] * focal + SIZE / 2 - 0.5
        v = xyz[rows, cols, 1] / xyz[rows, cols, 2] * focal + SIZE / 2 - 0.5
        np.testing.assert_allclose(u, cols, atol=1e-3)
        np.testing.assert_allclose(v, rows, atol=1e-3)


def test_without_support_plane_the_background_is_empty():
    _, samples = rendered(num_samples=4, support_plane=False)
    _, with_plane = rendered(num_samples=4)
    for (_, bare, _), (_, full, _) in zip(samples, with_plane, strict=True):
        measured = np.all(bare.xyz != 0, -1)
        assert 0.1 < measured.mean() < 0.5  # the object only
        np.testing.assert_array_equal(bare.xyz[measured], full.xyz[measured])
        assert np.all(full.xyz != 0, -1).mean() > 0.9


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_renders_a_textured_object(shape):
    _, samples = rendered(num_samples=3, defect_rate=0.0, shape=shape)
    images = [a.rgb.astype(float) for _, a, _ in samples]
    for (_, sample, _), image in zip(samples, images, strict=True):
        obj = np.all(sample.xyz != 0, -1)
        assert obj.sum() > 0.5 * SIZE * SIZE
        assert image[SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4].std() > 15  # texture
    # samples differ by pose, lighting and noise
    assert np.abs(images[0] - images[1]).mean() > 1.0


def test_shape_is_drawn_from_the_seed():
    shapes = {plan_line(num_samples=1, image_size=SIZE, seed=s)[0].shape for s in range(12)}
    assert shapes == set(SHAPES)


def test_defect_seed_repeats_the_same_defect_on_other_parts():
    from dataclasses import replace

    from tasks.synthetic.generator import plan_line, render_sample

    model, specs = plan_line(num_samples=3, image_size=64, defect_rate=0.0, seed=4)
    first = replace(specs[0], defect_type="crack")
    other = replace(specs[1], defect_type="crack", shift=first.shift, angle=first.angle)
    same_a = render_sample(model, first, defect_seed=7).mask
    same_b = render_sample(model, other, defect_seed=7).mask
    assert same_a.any() and np.array_equal(same_a, same_b)
    own_b = render_sample(model, other).mask
    assert not np.array_equal(same_a, own_b)  # without the seed each part draws its own
    np.testing.assert_array_equal(
        render_sample(model, first).mask, render_sample(model, first, defect_seed=0).mask
    )
