"""Synthetic lines like real scans: pixel pitch, resolution, framing, raw vs pre-cleaned.

The truths are the pinhole model (x = u·z/f with f = distance / pitch, so neighbouring pixels
on a plane at the nominal distance lie one pitch apart), the area of the part's outline, a
plane fitted to the raw scan's own points, and a digest of the files the generator wrote
before these settings existed.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tasks.synthetic.generator import (
    FRAMINGS,
    PRESETS,
    generate_line,
    plan_line,
    preset_kwargs,
    realistic_line_kwargs,
    render_sample,
)

BAND = 10  # px: the border band where a part at the frame must have points
TOP = 0.0065  # metres above the plane: the parts' flat top faces are higher than this


def digest(root: Path) -> str:
    """sha256 over the names and bytes of a line's images, XYZ maps and masks."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != "line.json":
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def valid(xyz: np.ndarray) -> np.ndarray:
    return xyz.any(axis=-1)


def band_counts(points: np.ndarray) -> list[int]:
    """Points of an (S, S) bool map in the 10-px band along each border (top, bottom, left,
    right)."""
    return [int(points[:BAND].sum()), int(points[-BAND:].sum()), int(points[:, :BAND].sum()),
            int(points[:, -BAND:].sum())]


def fit_plane(xyz: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Least-squares plane z = a·x + b·y + c through the points ``where``: (a, b, c)."""
    p = xyz[where].astype(np.float64)
    design = np.column_stack([p[:, 0], p[:, 1], np.ones(len(p))])
    return np.linalg.lstsq(design, p[:, 2], rcond=None)[0]


def height_above(xyz: np.ndarray, plane: np.ndarray) -> np.ndarray:
    """(S, S) height of each point above the plane along the view (metres)."""
    p = xyz.astype(np.float64)
    return plane[0] * p[..., 0] + plane[1] * p[..., 1] + plane[2] - p[..., 2]


def raw_and_cleaned(model, spec):
    """The same sample rendered with its support plane and pre-cleaned (plane removed)."""
    raw = render_sample(dataclasses.replace(model, support_plane=True), spec).xyz
    cleaned = render_sample(dataclasses.replace(model, support_plane=False), spec).xyz
    return raw, cleaned


# ------------------------------------------------------------------------------------------
# defaults unchanged


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(num_samples=6, seed=3),
         "675d565104c02e090488f8547cb2821b0c36b6f0d4813200419b187bdfdf8615"),
        (dict(num_samples=4, image_size=64, seed=5, support_plane=False, shape="ribs"),
         "b1cb471a98a35d7d623e363edf50e690b229afe071c80b5680e0bc412cf209b6"),
    ],
)
def test_lines_with_the_default_camera_and_framing_are_byte_identical_to_before(
    tmp_path, kwargs, expected
):
    # Digests of the files written by the generator before pitch, distance and framing existed.
    generate_line(tmp_path, **kwargs)
    assert digest(tmp_path) == expected


def test_the_default_pitch_spans_a_tenth_of_a_metre():
    for size in (64, 224, 400):
        model, _ = plan_line(num_samples=1, image_size=size, seed=1)
        assert model.pixel_pitch * size == pytest.approx(0.10, rel=1e-12)
        assert 0.38 <= model.camera_distance <= 0.45


# ------------------------------------------------------------------------------------------
# pixel pitch and resolution


@pytest.mark.parametrize(("size", "pitch"), [(400, 0.2), (256, 0.5), (128, 0.05)])
def test_neighbouring_pixels_are_one_pitch_apart_at_the_nominal_distance(size, pitch):
    model, specs = plan_line(num_samples=1, image_size=size, seed=2, defect_rate=0.0,
                             pixel_pitch=pitch, camera_distance=0.5)
    xyz = render_sample(model, specs[0]).xyz.astype(np.float64)
    both = valid(xyz)[:, 1:] & valid(xyz)[:, :-1]
    dx = (xyz[:, 1:, 0] - xyz[:, :-1, 0])[both]
    z = 0.5 * (xyz[:, 1:, 2] + xyz[:, :-1, 2])[both]
    # Pinhole: x = u·z/f, f = 0.5 m / pitch, so dx = pitch·z / 0.5 m (+ noise through z).
    assert np.median(dx / (z / 0.5)) == pytest.approx(pitch / 1000, rel=0.005)
    # Points on the plane (0.5 m ± its tilt; the part is ≥ 8 mm higher): dx is the pitch.
    plane = both & (np.abs(0.5 * (xyz[:, 1:, 2] + xyz[:, :-1, 2]) - 0.5) < 0.004)
    if plane.sum() > 1000:
        assert np.median((xyz[:, 1:, 0] - xyz[:, :-1, 0])[plane]) == pytest.approx(
            pitch / 1000, rel=0.01)


def outline_area(model) -> float:
    """Area (m²) of a puck's footprint: the disc of the line's radius."""
    return float(np.pi * model.radius**2)


@pytest.mark.parametrize(("size", "pitch", "low", "high"),
                         [(400, 0.2, 60_000, 90_000), (800, 0.1, 240_000, 340_000)])
def test_a_pre_cleaned_part_has_as_many_points_as_its_area_holds_pixels(size, pitch, low, high):
    model, specs = plan_line(num_samples=1, image_size=size, seed=4, defect_rate=0.0,
                             pixel_pitch=pitch, camera_distance=0.5, support_plane=False,
                             shape="puck")
    count = int(valid(render_sample(model, specs[0]).xyz).sum())
    expected = outline_area(model) / (pitch / 1000) ** 2
    # Dropouts (0.2 %), the unmeasured steep rim and the noise keep it a little below.
    assert 0.95 * expected <= count <= expected
    assert low <= count <= high


def test_the_800_px_preset_has_mvtec_3d_ad_like_point_counts():
    model, specs = plan_line(num_samples=1, seed=4, defect_rate=0.0, shape="box",
                             **{**preset_kwargs("mvtec3d-800"), "framing": "centred"})
    count = int(valid(render_sample(model, specs[0]).xyz).sum())
    assert 150_000 <= count <= 230_000


# ------------------------------------------------------------------------------------------
# framing


def framed(framing, shape, num_samples=4, seed=8):
    kwargs = {**realistic_line_kwargs(400, framing=framing), "shape": shape}
    return plan_line(num_samples=num_samples, seed=seed, defect_rate=0.0, **kwargs)


@pytest.mark.parametrize("shape", ["puck", "box"])
def test_touching_and_crossing_parts_reach_the_border_centred_ones_do_not(shape):
    centred_model, centred_specs = framed("centred", shape)
    centred = [valid(render_sample(centred_model, s).xyz) for s in centred_specs]
    assert all(max(band_counts(points)) == 0 for points in centred)
    for framing, lo, hi in (("touching", 0.95, 1.0), ("crossing", 0.5, 0.93)):
        model, specs = framed(framing, shape)
        for spec, whole in zip(specs, centred, strict=True):
            assert spec.framing == framing
            points = valid(render_sample(model, spec).xyz)
            assert max(band_counts(points)) > 0
            # Same part, same pose but for the shift: touching loses a sliver, crossing a piece.
            assert lo * whole.sum() <= points.sum() <= hi * whole.sum()


@pytest.mark.parametrize("shape", ["puck", "dome", "box", "ribs"])
def test_a_crossing_pre_cleaned_parts_top_face_reaches_the_border(shape):
    model, specs = framed("crossing", shape, num_samples=2)
    for spec in specs:
        raw, cleaned = raw_and_cleaned(model, spec)
        plane = fit_plane(raw, valid(raw) & ~valid(cleaned))
        top = valid(cleaned) & (height_above(cleaned, plane) > TOP)
        assert max(band_counts(top)) >= 100  # a stretch of the top face, not a corner


def test_a_frame_filling_part_crosses_every_border():
    model, specs = plan_line(num_samples=1, seed=3, defect_rate=0.0, shape="puck",
                             **preset_kwargs("mvtec3d-400-filling"))
    assert model.image_size * model.pixel_pitch == pytest.approx(0.048)
    raw, cleaned = raw_and_cleaned(model, specs[0])
    plane = fit_plane(raw, valid(raw) & ~valid(cleaned))
    top = valid(cleaned) & (height_above(cleaned, plane) > TOP)
    assert min(band_counts(top)) >= 100
    assert not valid(cleaned)[:BAND, :BAND].any()  # the disc leaves the corners to the plane


@pytest.mark.parametrize(
    ("shape", "seed", "kwargs"),
    [("box", 2, realistic_line_kwargs(400, framing="crossing")),
     ("puck", 1, preset_kwargs("mvtec3d-400-filling"))],
)
def test_defects_of_a_part_at_the_border_lie_on_its_visible_top(shape, seed, kwargs):
    model, specs = plan_line(num_samples=4, seed=seed, defect_rate=1.0, shape=shape, **kwargs)
    for spec in specs:
        sample = render_sample(model, spec)
        points = valid(sample.xyz)
        assert sample.mask.sum() > 1000
        edge = np.ones(points.shape, dtype=bool)
        edge[4:-4, 4:-4] = False  # the unmeasured frame at 400 px
        assert (sample.mask & edge).sum() <= 0.05 * sample.mask.sum()
        assert (sample.mask & points).sum() >= 0.75 * sample.mask.sum()


def test_mixed_framing_is_drawn_per_sample_from_the_seed_and_changes_nothing_else():
    model, specs = plan_line(num_samples=40, seed=5, framing="mixed")
    again = plan_line(num_samples=40, seed=5, framing="mixed")[1]
    plain = plan_line(num_samples=40, seed=5)[1]
    other = plan_line(num_samples=40, seed=6, framing="mixed")[1]
    kinds = [s.framing for s in specs]
    assert set(kinds) == {"centred", "touching", "crossing"}
    assert 10 <= kinds.count("centred") <= 30
    assert specs == again and kinds != [s.framing for s in other]
    for spec, base in zip(specs, plain, strict=True):
        assert (spec.light, spec.angle, spec.defect_type) == (base.light, base.angle,
                                                              base.defect_type)
        assert (spec.shift == base.shift) == (spec.framing == "centred")


# ------------------------------------------------------------------------------------------
# raw scans and pre-cleaned parts


@pytest.mark.parametrize("framing", ["centred", "crossing"])
def test_a_pre_cleaned_scan_is_the_raw_scan_without_its_plane(framing):
    model, specs = framed(framing, "dome", num_samples=1)
    raw, cleaned = raw_and_cleaned(model, specs[0])
    kept, removed = valid(cleaned), valid(raw) & ~valid(cleaned)
    assert not (kept & ~valid(raw)).any()
    np.testing.assert_array_equal(cleaned[kept], raw[kept])
    assert (cleaned[~kept] == 0).all()
    plane = fit_plane(raw, removed)
    # What was removed is a plane (noise σ = 0.2 mm), what is kept stands above it.
    assert np.quantile(np.abs(height_above(raw, plane)[removed]), 0.999) < 0.001
    assert np.mean(height_above(cleaned, plane)[kept] > 0.001) > 0.98
    assert removed.sum() > 0.2 * raw.shape[0] ** 2  # the plane was a good part of the scan


# ------------------------------------------------------------------------------------------
# files, determinism, arguments


def test_a_realistic_line_is_deterministic_and_records_its_camera(tmp_path):
    kwargs = dict(num_samples=2, seed=1, **preset_kwargs("mvtec3d-400"))
    generate_line(tmp_path / "a", **kwargs)
    generate_line(tmp_path / "b", **kwargs)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    info = json.loads((tmp_path / "a" / "part" / "line.json").read_text())
    assert info["generator"].endswith("v2")
    assert {k: info["parameters"][k] for k in
            ("image_size", "pixel_pitch", "camera_distance", "framing", "support_plane")} == {
        "image_size": 400, "pixel_pitch": 0.2, "camera_distance": 0.5, "framing": "mixed",
        "support_plane": False}
    assert info["camera"]["pixel_pitch_mm"] == pytest.approx(0.2)
    assert info["camera"]["field_of_view_m"] == pytest.approx(0.08)
    for sample in info["samples"]:
        assert sample["framing"] in FRAMINGS
        assert 40_000 <= sample["measured_points"] <= 100_000


def test_every_preset_names_a_valid_line():
    for name in PRESETS:
        model, _ = plan_line(num_samples=1, **preset_kwargs(name))
        assert model.camera_distance == 0.5
        assert model.support_plane == name.endswith("-raw")
    with pytest.raises(ValueError, match="preset"):
        preset_kwargs("mvtec3d-300")
    with pytest.raises(ValueError, match="size"):
        realistic_line_kwargs(500)


@pytest.mark.parametrize(
    "kwargs",
    [dict(pixel_pitch=0.04), dict(pixel_pitch=1.5), dict(camera_distance=0.1),
     dict(camera_distance=1.2), dict(framing="edge")],
)
def test_out_of_range_camera_and_framing_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        plan_line(num_samples=1, **kwargs)
