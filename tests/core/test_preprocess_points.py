"""Point-cloud preprocessing against literal definitions and synthetic scenes."""

import numpy as np
import pytest
import torch

from musc_core.preprocess_points import (
    backproject_depth,
    clean_eyecandies,
    clean_mvtec3d,
    depth_from_png,
    fit_support_plane,
    foreground_mask,
    is_support_plane,
    mvtec3d_cleaning,
    normalize_unit_sphere,
    organized_to_points,
    resize_xyz_nearest,
)


def test_unit_sphere_normalization_numpy_and_torch():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(500, 3)) * [3.0, 1.0, 0.2] + [10.0, -4.0, 0.7]
    for got in (normalize_unit_sphere(points), normalize_unit_sphere(torch.tensor(points)).numpy()):
        assert np.allclose(got.mean(axis=0), 0, atol=1e-12)
        assert np.linalg.norm(got, axis=1).max() == pytest.approx(1.0, abs=1e-12)
        centred = points - points.mean(axis=0)
        assert np.allclose(got, centred / np.linalg.norm(centred, axis=1).max())
    assert np.allclose(normalize_unit_sphere(np.ones((4, 3))), 0)  # no division by zero


def test_nearest_resize_keeps_exact_values_and_the_floor_mapping():
    rng = np.random.default_rng(1)
    xyz = rng.normal(size=(37, 53, 3)).astype(np.float32)
    xyz[5:9, 10:20] = 0
    got = resize_xyz_nearest(xyz, 24)
    assert got.shape == (24, 24, 3) and got.dtype == np.float32
    for i in range(24):
        for j in range(24):
            assert np.array_equal(got[i, j], xyz[(i * 37) // 24, (j * 53) // 24])
    up = resize_xyz_nearest(xyz, 100)
    assert set(map(tuple, up.reshape(-1, 3))) <= set(map(tuple, xyz.reshape(-1, 3)))


def test_foreground_and_points_in_row_major_pixel_order():
    xyz = np.ones((4, 5, 3), dtype=np.float32) * np.arange(20).reshape(4, 5, 1)
    xyz[0, 0] = 0  # pixel 0 has value 0 anyway
    xyz[1, 2, 1] = 0  # one zero coordinate: no point
    xyz[2, 3, 0] = np.nan
    expected = [p for p in range(20) if p not in (0, 7, 13)]
    assert foreground_mask(xyz).reshape(-1).nonzero()[0].tolist() == expected
    for source in (xyz, torch.from_numpy(xyz)):
        points, pixel_index = organized_to_points(source)
        assert pixel_index.tolist() == expected and pixel_index.dtype == torch.long
        assert points.dtype == torch.float32
        assert torch.equal(points, torch.from_numpy(xyz.reshape(-1, 3)[expected]))


def _mvtec_scene(height=120, width=150, seed=0):
    """A tilted, noisy support plane with a box on it and a small far-away outlier patch."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    x, y = cols * 0.001, rows * 0.001  # dense enough for DBSCAN's 30 points within 0.006
    z = 0.6 + 0.05 * x - 0.03 * y + rng.uniform(-0.001, 0.001, size=x.shape)
    box = (rows >= 40) & (rows < 80) & (cols >= 50) & (cols < 100)
    outlier = (rows >= 96) & (rows < 108) & (cols >= 16) & (cols < 28)
    z = z + 0.03 * box + 0.10 * outlier
    xyz = np.stack([x + 0.01, y + 0.01, z], axis=-1).astype(np.float32)
    missing = rng.random(size=x.shape) < 0.02
    xyz[missing] = 0
    rgb = rng.integers(1, 256, size=(height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    mask[60:65, 70:75] = True
    return xyz, rgb, mask, box & ~missing, missing


def test_clean_mvtec3d_removes_plane_and_outliers_and_pads_centred():
    xyz, rgb, mask, box, missing = _mvtec_scene()
    out_xyz, out_rgb, out_mask = clean_mvtec3d(xyz, rgb, mask)
    # larger side 150 -> 200; padding split evenly: 40 rows on top, 25 columns on the left
    assert out_xyz.shape == (200, 200, 3) and out_rgb.shape == (200, 200, 3)
    assert out_mask.shape == (200, 200) and out_xyz.dtype == np.float32
    top, left = 40, 25
    inner = (slice(top, top + 120), slice(left, left + 150))
    kept = foreground_mask(out_xyz)
    assert np.array_equal(kept[inner], box)  # only the box survives
    assert kept.sum() == box.sum()
    assert np.array_equal(out_xyz[inner][box], xyz[box])
    # rgb: kept where the box is or the map had no point to begin with; zeroed where cleaned
    assert np.array_equal(out_rgb[inner][box], rgb[box])
    cleaned = ~box & ~missing
    assert (out_rgb[inner][cleaned] == 0).all()
    assert np.array_equal(out_rgb[inner][missing], rgb[missing])
    assert np.array_equal(out_mask[inner], mask) and out_mask.sum() == mask.sum()
    assert (out_rgb[:top] == 0).all() and (out_xyz[:, :left] == 0).all()
    # deterministic
    again = clean_mvtec3d(xyz, rgb, mask)
    assert np.array_equal(again[0], out_xyz) and np.array_equal(again[1], out_rgb)
    # optional inputs
    only_xyz, none_rgb, none_mask = clean_mvtec3d(xyz, None, None)
    assert np.array_equal(only_xyz, out_xyz) and none_rgb is None and none_mask is None


def test_clean_mvtec3d_rejects_a_map_without_border_points():
    xyz = np.zeros((60, 60, 3), dtype=np.float32)
    xyz[20:40, 20:40] = 1.0
    with pytest.raises(ValueError, match="border"):
        clean_mvtec3d(xyz, None, None)


def _sensor_scene(plane=True, reach_border=False, boss=False, fill=False, seed=0):
    """A part seen by a sensor at the origin: XYZ in its frame, the plane 0.5 m away.

    The part is a 30 mm-high slab (top face) with bevelled sides; ``reach_border`` makes its top
    face span the whole width of the view, ``fill`` the whole view, ``boss`` adds a raised
    disc (5.5 mm: joined to the face at this pitch) on top.
    """
    rng = np.random.default_rng(seed)
    size, pitch = 160, 0.0005
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    x0, y0 = (cols - size / 2) * pitch, (rows - size / 2) * pitch
    half = 1.0 if reach_border or fill else 0.02  # half width along x (metres)
    inside = np.maximum(np.abs(x0) / half, np.abs(y0) / (1.0 if fill else 0.02))
    height = 0.03 * np.clip((1.2 - inside) / 0.2, 0, 1)
    if boss:
        height = height + 0.0055 * (np.hypot(x0, y0) < 0.008)
    depth = 0.5 + 0.02 * x0 - height + rng.normal(0, 1e-4, height.shape)
    xyz = np.stack([x0 * depth / 0.5, y0 * depth / 0.5, depth], axis=-1).astype(np.float32)
    if fill:  # a recess in the face: points behind it
        xyz[np.hypot(x0, y0) < 0.01, 2] += 0.0055
    part = height > 0
    if not plane:
        xyz[~part] = 0
    xyz[rng.random(height.shape) < 0.01] = 0
    return xyz, foreground_mask(xyz) & part


def test_auto_removes_the_plane_of_a_raw_scan_as_remove_does():
    xyz, part = _sensor_scene(plane=True)
    plane = fit_support_plane(xyz)
    assert is_support_plane(xyz, plane)
    auto = mvtec3d_cleaning(xyz, None, None, "auto")
    remove = mvtec3d_cleaning(xyz, None, None, "remove")
    assert auto.plane_removed and np.array_equal(auto.xyz, remove.xyz)
    assert np.array_equal(auto.xyz, clean_mvtec3d(xyz, None, None)[0])
    # what is left is the part (its foot, within 5 mm of the plane, goes with the plane)
    kept = foreground_mask(auto.xyz)[20:180, 20:180]  # 160 -> 200, centred
    assert kept.sum() > 0.8 * part.sum() and not (kept & ~part).any()
    read, after_plane, final = auto.points
    assert read == foreground_mask(xyz).sum() and final == kept.sum() <= after_plane < read


@pytest.mark.parametrize("boss", [False, True])
def test_auto_keeps_a_pre_cleaned_part_whose_top_face_reaches_the_border(boss):
    xyz, part = _sensor_scene(plane=False, reach_border=True, boss=boss)
    plane = fit_support_plane(xyz)  # the border holds the part's top face only
    assert abs(plane[3] / plane[2] + 0.47) < 0.01  # z ≈ 0.47 m: the top face
    assert not is_support_plane(xyz, plane)
    auto = mvtec3d_cleaning(xyz, None, None, "auto")
    keep = mvtec3d_cleaning(xyz, None, None, "keep")
    assert not auto.plane_removed and np.array_equal(auto.xyz, keep.xyz)
    assert auto.points == (part.sum(), part.sum(), part.sum())
    # what "remove" would have done: the top face is gone, little of the part is left
    remove = mvtec3d_cleaning(xyz, None, None, "remove")
    assert remove.plane_removed and remove.points[2] < 0.3 * part.sum()


def test_a_part_that_fills_the_view_is_not_a_support_plane():
    # Its top face fills the whole border (the first condition holds); the points off it, a
    # recess, lie behind it.
    xyz, part = _sensor_scene(plane=False, fill=True)
    plane = fit_support_plane(xyz)
    assert not is_support_plane(xyz, plane)
    assert mvtec3d_cleaning(xyz, None, None, "auto").points[2] == part.sum()
    rows, cols = np.meshgrid(np.arange(60), np.arange(60), indexing="ij")
    flat = np.stack([cols * 1e-3, rows * 1e-3, np.full(rows.shape, 0.5)], -1)
    # every point on one plane: nothing tells a support plane, nothing is removed
    assert not is_support_plane(flat, fit_support_plane(flat))


def test_auto_skips_the_fit_without_border_points_and_modes_are_checked():
    xyz, part = _sensor_scene(plane=False)
    assert foreground_mask(xyz)[:10].sum() == 0
    auto = mvtec3d_cleaning(xyz, None, None, "auto")
    assert not auto.plane_removed and auto.points[2] == part.sum()
    with pytest.raises(ValueError, match="border"):
        mvtec3d_cleaning(xyz, None, None, "remove")
    with pytest.raises(ValueError, match="support_plane"):
        mvtec3d_cleaning(xyz, None, None, "sometimes")


def test_depth_from_png_is_the_linear_map():
    raw = np.array([[0, 65535, 32768]], dtype=np.uint16)
    got = depth_from_png(raw, 0.5, 1.3)
    assert got.dtype == np.float32
    assert got[0, 0] == pytest.approx(0.5) and got[0, 1] == pytest.approx(1.3)
    assert got[0, 2] == pytest.approx(0.5 + 0.8 * 32768 / 65535, rel=1e-6)


def test_backproject_fronto_parallel_plane_with_identity_pose():
    d, f = 0.8, 711.11
    depth = np.full((6, 8), d)
    xyz = backproject_depth(depth, np.eye(4), f)
    rows, cols = np.meshgrid(np.arange(6), np.arange(8), indexing="ij")
    assert np.allclose(xyz[..., 2], d)
    assert np.allclose(xyz[..., 0], (cols - 4) * d / f)
    assert np.allclose(xyz[..., 1], (rows - 3) * d / f)


def test_backproject_matches_the_reference_projection_inverse():
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = q, rng.normal(size=3)
    depth = rng.uniform(0.5, 1.5, size=(5, 7))
    depth[2, 3] = 0
    f = 711.11
    xyz = backproject_depth(depth, pose, f)
    k4 = np.array([[f, 0, 7 / 2, 0], [0, f, 5 / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    inverse = np.linalg.inv(k4 @ pose)
    for v in range(5):
        for u in range(7):
            if depth[v, u] == 0:
                assert (xyz[v, u] == 0).all()
                continue
            expected = depth[v, u] * (inverse @ np.array([u, v, 1.0, 1.0 / depth[v, u]]))
            assert np.allclose(xyz[v, u], expected[:3], atol=1e-12)


def _eyecandies_scene():
    """Plane at the largest world y, a bright small candy and a dim large one, far apart."""
    height, width = 60, 80
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    xyz = np.zeros((height, width, 3))
    xyz[..., 0] = cols * 0.005 + 0.01  # dense enough for DBSCAN (30 points within 0.03)
    xyz[..., 2] = rows * 0.005 + 1.0
    xyz[..., 1] = 0.5  # support plane (largest y)
    bright = (rows >= 10) & (rows < 20) & (cols >= 10) & (cols < 20)
    dim = (rows >= 25) & (rows < 50) & (cols >= 40) & (cols < 75)
    xyz[..., 1][bright] = 0.2
    xyz[..., 1][dim] = 0.1
    rgb = np.full((height, width, 3), 255, dtype=np.uint8)
    rgb[bright] = 200
    rgb[dim] = 60
    return xyz, rgb, bright, dim


def test_clean_eyecandies_drops_the_plane_and_keeps_the_brightest_cluster():
    xyz, rgb, bright, _ = _eyecandies_scene()
    got, got_rgb = clean_eyecandies(xyz, rgb, "CandyCane")
    assert np.array_equal(foreground_mask(got), bright)
    assert np.array_equal(got[bright], xyz[bright])
    assert got_rgb is rgb  # the image is left as it is
    assert np.array_equal(xyz[..., 1] == 0.5, ~(bright | _eyecandies_scene()[3]))  # input intact


def test_clean_eyecandies_keeps_the_plane_for_the_listed_categories():
    xyz, rgb, bright, dim = _eyecandies_scene()
    got, _ = clean_eyecandies(xyz, rgb, "GummyBear")
    # The plane is not dropped: it is a cluster of its own, and the brightest (255).
    assert np.array_equal(foreground_mask(got), ~(bright | dim))
