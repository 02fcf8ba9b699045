"""Synthetic product lines in the MVTec 3D-AD layout, for the demo, the tests and benchmarks.

No real dataset can be downloaded everywhere this project runs, so this module renders a
small, fully deterministic "production line": N samples of one object type, seen from above
by a pinhole camera, each with an RGB image, an organized XYZ point cloud (metres) and a
ground-truth mask, written as::

    <root>/<category>/test/<good|colour|dent|crack>/rgb/NNN.png    8-bit RGB
    <root>/<category>/test/<good|colour|dent|crack>/xyz/NNN.tiff   float32 (H, W, 3), metres
    <root>/<category>/test/<good|colour|dent|crack>/gt/NNN.png     8-bit, 0 / 255
    <root>/<category>/line.json                                    parameters, "synthetic data"

Scene. The camera looks down from ~0.4 m (drawn in 0.38–0.45 m, or ``camera_distance``); by
default its field of view is 0.10 m wide at that distance whatever the image size, so the
geometry is resolution independent (0.45 mm between neighbouring pixels at 224 px). A
``pixel_pitch`` (mm between neighbouring pixels on the plane at the nominal distance) sets the
resolution instead, as a real scanner has: MVTec 3D-AD's XYZ maps are 400×400 to 800×800 px at
≈ 0.1–0.2 mm, the part ≈ 0.5 m away, 50k–200k points on the part (:func:`realistic_line_kwargs`
and :data:`PRESETS` name such lines). The object (diameter
~6 cm, picked from the seed: ``puck`` — a disc with a knurled raised rim and a recessed,
printed centre; ``dome`` — a spherical cap on a flange with six bolt heads; ``box`` — a
rounded box with a barcode label and a raised button; ``ribs``, only when asked for by name —
a block with parallel raised ribs, where two surfaces lie close together) stands on a
slightly tilted support plane (the background), so the MVTec 3D-AD cleaning (RANSAC plane
removal + DBSCAN) applies.
``z`` is the depth, ``x = (u - cx) z / f`` and ``y = (v - cy) z / f``. Pixels without a
measurement (a thin image border, random dropouts, grazing walls, part of a crack's floor)
are exactly ``(0, 0, 0)``; without the support plane the whole background is.

Per sample the seed draws a small pose (translation ±2 mm ≈ ±4 px at 224 px, in-plane
rotation ±10°), the lighting (direction, intensity, ambient: Lambertian shading from the
surface normals plus a weak specular lobe) and sensor noise (Gaussian, σ = 0.2 mm on z and
2 grey levels on RGB).

Framing (``framing``): by default the object lies well inside the image (``centred``). Real
scans also show parts at the frame: ``touching`` moves the part towards one border (drawn per
sample) until its outline reaches the image edge (0–2 px beyond it); ``crossing`` moves it
15–35 % of its extent across the border, so its flat top face is cut off by the frame;
``mixed`` draws each sample's framing (half centred, a quarter touching, a quarter crossing).
A part larger than the field of view (a fine ``pixel_pitch`` at a small ``image_size``) crosses
every border even when centred. With ``support_plane=False`` the scan is a pre-cleaned part
(the plane removed, as the usual MVTec 3D-AD preprocessing leaves it): the hard case is such a
part whose top face reaches the border.

Defects (each 3.5–7.5 % of the object's area, on the object's top surfaces):

- ``colour``: a stain or a painted streak. Albedo only; the geometry is untouched.
- ``dent``: a smooth dent or bump, 3–6 % of the object size deep. Only the geometry changes:
  the RGB is shaded with the undeformed normals and the unchanged albedo, so the image is
  exactly that of the same sample without the dent.
- ``crack``: a winding groove 1.5–2.5 mm deep, dark, with part of its floor unmeasured.

Determinism: every random draw comes from ``numpy.random.default_rng`` seeded by
``(seed, stream, sample)``; noise, defect placement and the sample plan use separate
streams, so rendering a sample with and without its defect (:func:`render_sample`,
``apply_defect=False``) gives the same noise. PNG (Pillow) and TIFF (tifffile) writing is
deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

from tasks.choices import (
    SYNTH_DISTANCE_RANGE_M,
    SYNTH_FRAMINGS,
    SYNTH_MIN_IMAGE_SIZE,
    SYNTH_NAMED_SHAPES,
    SYNTH_PITCH_RANGE_MM,
    SYNTH_PRESETS,
    SYNTH_SHAPES,
)

__all__ = [
    "DEFECT_TYPES",
    "FRAMINGS",
    "PRESETS",
    "SHAPES",
    "LineModel",
    "NAMED_SHAPES",
    "LineSummary",
    "RenderedSample",
    "SampleSpec",
    "generate_line",
    "plan_line",
    "preset_kwargs",
    "realistic_line_kwargs",
    "render_sample",
]

DEFECT_TYPES = ("colour", "dent", "crack")
# Shapes a line's seed picks from (unchanged, so every seed renders what it always did), and
# shapes rendered only when asked for by name (declared in tasks.choices for the CLI).
SHAPES = SYNTH_SHAPES
NAMED_SHAPES = SYNTH_NAMED_SHAPES
FRAMINGS = SYNTH_FRAMINGS
PRESETS = SYNTH_PRESETS
NOTE = "synthetic data generated by tasks.synthetic.generator (not a real dataset)"
# v2: pixel pitch, camera distance and framing (lines with their defaults render as in v1).
GENERATOR_VERSION = 2

FIELD_OF_VIEW = 0.10  # metres covered by the image width at the nominal distance (no pitch)
REALISTIC_DISTANCE = 0.5  # metres, camera to plane of the realistic lines
# Pixel pitch (mm) of the realistic lines by image size: the part (~6 cm) covers 30–45 % of
# the image; measured 68k–78k points on a centred part at 400 px, 120k–138k at 600 px,
# 188k–216k at 800 px (MVTec 3D-AD: 50k–200k).
REALISTIC_PITCH = {400: 0.2, 600: 0.15, 800: 0.12}
FRAME_FILLING_PITCH = 0.12  # mm: at 400 px the 48 mm field of view is narrower than the part
_MIXED = ("centred", "centred", "touching", "crossing")  # framings a mixed line draws from
_TOUCH_OVERSHOOT_PX = (0.0, 2.0)  # touching: the outline ends this far beyond the edge
_CROSS_CUT = (0.15, 0.35)  # crossing: fraction of the part's extent beyond the edge
DEPTH_NOISE = 0.0002  # metres (σ of the Gaussian noise on z)
RGB_NOISE = 2.0  # grey levels (σ)
DROPOUT_RATE = 0.002  # fraction of pixels without measurement, at random
GRAZING_LIMIT = 0.1  # |n_z| below this: the sensor misses the point
FOOTPRINT_HEIGHT = 0.0002  # metres above the plane counted as object
TOP_HEIGHT = 0.0065  # defects are placed where the object is at least this high
DEFECT_AREA = (0.035, 0.075)  # fraction of the object's area

# Linear RGB palettes: body, print, accent (bolts, buttons, dots).
_PALETTES = (
    ((0.20, 0.34, 0.62), (0.93, 0.93, 0.90), (0.70, 0.70, 0.72)),  # blue plastic, white print
    ((0.86, 0.46, 0.16), (0.10, 0.10, 0.12), (0.55, 0.55, 0.58)),  # orange, black print
    ((0.74, 0.74, 0.71), (0.12, 0.14, 0.35), (0.80, 0.20, 0.15)),  # light grey, navy print
    ((0.26, 0.54, 0.34), (0.95, 0.92, 0.80), (0.85, 0.75, 0.30)),  # green, cream print
    ((0.80, 0.72, 0.55), (0.35, 0.15, 0.10), (0.25, 0.25, 0.28)),  # beige, brown print
)
_MAT = (0.23, 0.23, 0.25)  # support plane (conveyor mat) albedo
_VOID = (0.05, 0.05, 0.05)  # background albedo without support plane
_STAINS = ((0.55, 0.30, 0.12), (0.12, 0.10, 0.08), (0.95, 0.95, 0.90), (0.15, 0.45, 0.75))


# ------------------------------------------------------------------------------------------
# plan


@dataclass(frozen=True)
class LineModel:
    """What all samples of a line share.

    Attributes:
        shape: object type, one of :data:`SHAPES` or :data:`NAMED_SHAPES`.
        image_size: S, images are S×S pixels.
        support_plane: whether the background is a measured support plane.
        camera_distance: nominal camera-to-plane distance (metres).
        focal: focal length (pixels); the principal point is the image centre.
        plane_slope: (dz/dx, dz/dy) of the support plane (its tilt).
        radius: object radius (metres).
        body, print_colour, accent: linear RGB albedos in [0, 1].
        code: 0/1 stripe pattern of the printed barcode / tick marks.
        specular: strength of the specular lobe.
        seed: the line seed.
        framing: the line's framing, one of :data:`FRAMINGS` (each sample's is in its spec).
    """

    shape: str
    image_size: int
    support_plane: bool
    camera_distance: float
    focal: float
    plane_slope: tuple[float, float]
    radius: float
    body: tuple[float, float, float]
    print_colour: tuple[float, float, float]
    accent: tuple[float, float, float]
    code: tuple[int, ...]
    specular: float
    seed: int
    framing: str = "centred"

    @property
    def pixel_pitch(self) -> float:
        """Distance between neighbouring pixels on a plane at ``camera_distance`` (metres)."""
        return self.camera_distance / self.focal


@dataclass(frozen=True)
class SampleSpec:
    """Per-sample draws (everything but the noise and the defect placement).

    Attributes:
        index: sample index within the line (0..N-1).
        defect_type: ``"good"`` or one of :data:`DEFECT_TYPES`.
        stem: file stem within its defect folder (``"000"``, ...).
        shift: object translation (x, y) on the plane (metres).
        angle: in-plane rotation (radians).
        light: unit vector from the surface towards the light (camera frame, z = depth).
        intensity: diffuse light intensity.
        ambient: ambient light level.
        mat_phase: phases of the mat texture.
        framing: where the part sits in the frame: ``centred``, ``touching`` or ``crossing``.
    """

    index: int
    defect_type: str
    stem: str
    shift: tuple[float, float]
    angle: float
    light: tuple[float, float, float]
    intensity: float
    ambient: float
    mat_phase: tuple[float, float, float]
    framing: str = "centred"

    @property
    def name(self) -> str:
        """Sample name as the MVTec 3D-AD reader builds it: ``<defect_type>/<stem>``."""
        return f"{self.defect_type}/{self.stem}"


@dataclass(frozen=True)
class RenderedSample:
    """One rendered sample.

    Attributes:
        rgb: (S, S, 3) uint8 image.
        xyz: (S, S, 3) float32 organized point cloud (metres); (0, 0, 0) = no measurement.
        mask: (S, S) bool ground truth (all False for good samples).
        variant: defect variant (``"stain"``, ``"streak"``, ``"dent"``, ``"bump"``,
            ``"crack"``) or ``""``.
    """

    rgb: np.ndarray
    xyz: np.ndarray
    mask: np.ndarray
    variant: str


@dataclass(frozen=True)
class LineSummary:
    """What :func:`generate_line` wrote.

    Attributes:
        root: dataset root (the line is ``root / category``).
        category: category (line) name.
        num_samples: number of samples.
        counts: samples per folder, ``{"good": .., "colour": .., "dent": .., "crack": ..}``.
        image_size: S (images are S×S).
        shape: object type.
    """

    root: Path
    category: str
    num_samples: int
    counts: dict[str, int]
    image_size: int
    shape: str


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _defect_kinds(num_samples: int, defect_rate: float, rng: np.random.Generator) -> list[str]:
    """Defect type of each sample: round(N·rate) defective ones, kinds balanced (±1)."""
    num_defective = int(np.floor(num_samples * defect_rate + 0.5))
    first = int(rng.integers(len(DEFECT_TYPES)))
    kinds = [DEFECT_TYPES[(first + k) % len(DEFECT_TYPES)] for k in range(num_defective)]
    where = rng.permutation(num_samples)[:num_defective]
    out = ["good"] * num_samples
    for position, kind in zip(where.tolist(), kinds, strict=True):
        out[position] = kind
    return out


def plan_line(
    *,
    num_samples: int = 16,
    image_size: int = 224,
    defect_rate: float = 0.4,
    seed: int = 0,
    support_plane: bool = True,
    shape: str | None = None,
    pixel_pitch: float | None = None,
    camera_distance: float | None = None,
    framing: str = "centred",
) -> tuple[LineModel, list[SampleSpec]]:
    """Draw the line model and every sample's pose, lighting, framing and defect type.

    Args:
        num_samples: N ≥ 1.
        image_size: S ≥ 32.
        defect_rate: fraction of defective samples in [0, 1] (round(N·rate) of them).
        seed: line seed.
        support_plane: whether the background is a measured plane.
        shape: object type (:data:`SHAPES` or :data:`NAMED_SHAPES`); None picks one of
            :data:`SHAPES` from the seed.
        pixel_pitch: millimetres between neighbouring pixels on the plane at the nominal
            camera distance, in [0.05, 1.0]; None: 100 mm / S (the image spans 0.10 m).
        camera_distance: nominal camera-to-plane distance (metres) in [0.2, 1.0]; None draws
            it from the seed in 0.38–0.45 m.
        framing: one of :data:`FRAMINGS` (``mixed`` draws each sample's).

    Returns:
        The line model and the N sample specs (in sample order).

    Raises:
        ValueError: for out-of-range arguments.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if image_size < SYNTH_MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {SYNTH_MIN_IMAGE_SIZE}, got {image_size}")
    if not 0.0 <= defect_rate <= 1.0:
        raise ValueError(f"defect_rate must be in [0, 1], got {defect_rate}")
    if shape is not None and shape not in SHAPES + NAMED_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES + NAMED_SHAPES}")
    low, high = SYNTH_PITCH_RANGE_MM
    if pixel_pitch is not None and not low <= pixel_pitch <= high:
        raise ValueError(f"pixel_pitch must be in [{low}, {high}] mm, got {pixel_pitch}")
    low, high = SYNTH_DISTANCE_RANGE_M
    if camera_distance is not None and not low <= camera_distance <= high:
        raise ValueError(f"camera_distance must be in [{low}, {high}] m, got {camera_distance}")
    if framing not in FRAMINGS:
        raise ValueError(f"unknown framing {framing!r}; expected one of {FRAMINGS}")
    rng = _rng(seed, 0)
    picked = SHAPES[int(rng.integers(len(SHAPES)))]
    body, print_colour, accent = _PALETTES[int(rng.integers(len(_PALETTES)))]
    drawn = float(rng.uniform(0.38, 0.45))  # drawn even when given: later draws stay the same
    distance = drawn if camera_distance is None else float(camera_distance)
    tilt = np.deg2rad(rng.uniform(1.0, 3.0))
    tilt_dir = rng.uniform(0.0, 2.0 * np.pi)
    if pixel_pitch is None:
        focal = image_size * distance / FIELD_OF_VIEW
    else:
        focal = distance / (pixel_pitch / 1000.0)
    model = LineModel(
        shape=shape or picked,
        image_size=image_size,
        support_plane=support_plane,
        camera_distance=distance,
        focal=focal,
        plane_slope=(
            float(np.tan(tilt) * np.cos(tilt_dir)),
            float(np.tan(tilt) * np.sin(tilt_dir)),
        ),
        radius=float(rng.uniform(0.029, 0.032)),
        body=body,
        print_colour=print_colour,
        accent=accent,
        code=tuple(int(b) for b in rng.integers(0, 2, 48)),
        specular=float(rng.uniform(0.05, 0.2)),
        seed=seed,
        framing=framing,
    )
    kinds = _defect_kinds(num_samples, defect_rate, rng)
    seen: dict[str, int] = {}
    specs = []
    for index, kind in enumerate(kinds):
        draw = _rng(seed, 1, index)
        elevation = draw.uniform(np.deg2rad(15.0), np.deg2rad(40.0))
        azimuth = draw.uniform(0.0, 2.0 * np.pi)
        light = (
            float(np.sin(elevation) * np.cos(azimuth)),
            float(np.sin(elevation) * np.sin(azimuth)),
            float(-np.cos(elevation)),
        )
        stem = f"{seen.get(kind, 0):03d}"
        seen[kind] = seen.get(kind, 0) + 1
        shift = (float(draw.uniform(-0.002, 0.002)), float(draw.uniform(-0.002, 0.002)))
        angle = float(np.deg2rad(draw.uniform(-10.0, 10.0)))
        placed, shift = _framed(model, shift, angle, _rng(seed, 5, index))
        specs.append(
            SampleSpec(
                index=index,
                defect_type=kind,
                stem=stem,
                shift=shift,
                angle=angle,
                light=light,
                intensity=float(draw.uniform(0.75, 1.0)),
                ambient=float(draw.uniform(0.22, 0.32)),
                mat_phase=tuple(float(p) for p in draw.uniform(0.0, 2.0 * np.pi, 3)),
                framing=placed,
            )
        )
    return model, specs


def _outline_axes(shape: str, radius: float) -> tuple[float, float, float]:
    """The superellipse |u/a|^p + |v/b|^p = 1 bounding an object's footprint: (a, b, p).

    a, b are semi-axes in metres, in the object's own frame.
    """
    if shape == "box":
        return 1.05 * radius, 0.72 * radius, 5.0
    if shape == "ribs":
        return 0.95 * radius, 0.8 * radius, 4.0
    return radius, radius, 2.0


def _outline(model: LineModel, angle: float, points: int = 720) -> np.ndarray:
    """(points, 2) outline of the object rotated by ``angle``: plane (x, y), metres.

    Relative to the object's centre.
    """
    a, b, power = _outline_axes(model.shape, model.radius)
    t = np.linspace(0.0, 2.0 * np.pi, points, endpoint=False)
    cos_t, sin_t = np.cos(t), np.sin(t)
    u = a * np.sign(cos_t) * np.abs(cos_t) ** (2.0 / power)
    v = b * np.sign(sin_t) * np.abs(sin_t) ** (2.0 / power)
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    return np.stack([cos_a * u - sin_a * v, sin_a * u + cos_a * v], axis=1)


def _framed(
    model: LineModel, shift: tuple[float, float], angle: float, rng: np.random.Generator
) -> tuple[str, tuple[float, float]]:
    """A sample's framing and the object's translation on the plane (x, y), metres.

    ``centred`` keeps the drawn ``shift``. ``touching`` and ``crossing`` move the object
    towards one image border (drawn): its outline ends 0–2 px beyond the image edge, or
    15–35 % of its extent along that axis lies beyond it; along the border the object slides
    by up to half the room left.
    """
    placed = model.framing
    if placed == "mixed":
        placed = _MIXED[int(rng.integers(len(_MIXED)))]
    if placed == "centred":
        return placed, shift
    half = model.image_size * model.pixel_pitch / 2  # image half-width on the plane (metres)
    outline = _outline(model, angle)
    side = int(rng.integers(4))  # 0: +x, 1: -x, 2: +y, 3: -y
    axis, sign = side // 2, 1.0 if side % 2 == 0 else -1.0
    reach = float((sign * outline[:, axis]).max())  # centre to outline, towards the border
    extent = float(np.ptp(outline[:, axis]))
    if placed == "touching":
        beyond = rng.uniform(*_TOUCH_OVERSHOOT_PX) * model.pixel_pitch
    else:
        beyond = rng.uniform(*_CROSS_CUT) * extent
    across = 1 - axis
    room = max(0.0, half - float(np.abs(outline[:, across]).max()))
    moved = [0.0, 0.0]
    moved[axis] = sign * (half - reach + beyond)
    moved[across] = shift[across] + rng.uniform(-0.5, 0.5) * room
    return placed, (moved[0], moved[1])


# ------------------------------------------------------------------------------------------
# geometry helpers (all arrays (S, S); lengths in metres unless named *_px)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _rounded_edge(inside: np.ndarray, fillet: float) -> np.ndarray:
    """0 outside, rising along a quarter ellipse of width ``fillet`` to 1 inside."""
    t = np.clip(inside / fillet, 0.0, 1.0)
    return np.sqrt(1.0 - (1.0 - t) ** 2)


def _disc(dx: np.ndarray, dy: np.ndarray, radius: float, soft: float) -> np.ndarray:
    """Anti-aliased disc indicator (soft edge of width ``soft``)."""
    return 1.0 - _smoothstep(radius - soft, radius + soft, np.hypot(dx, dy))


def _mix(albedo: np.ndarray, colour: tuple[float, float, float], weight: np.ndarray) -> None:
    """In place: albedo ← albedo·(1 − w) + colour·w."""
    albedo += (np.asarray(colour) - albedo) * weight[..., None]


def _fine(pattern: np.ndarray, mean: float, period: float, px: float) -> np.ndarray:
    """Fade a periodic pattern to its mean where its period spans < 4 pixels (no moiré)."""
    keep = float(np.clip(period / px / 2 - 1, 0.0, 1.0))
    return mean + (pattern - mean) * keep


def _nearest_on_ring(theta: np.ndarray, count: int, radius: float) -> tuple:
    """Centre (x, y) of the nearest of ``count`` points evenly spaced on a ring."""
    step = 2.0 * np.pi / count
    snapped = np.round(theta / step) * step
    return radius * np.cos(snapped), radius * np.sin(snapped)


def _puck(u: np.ndarray, v: np.ndarray, m: LineModel, px: float) -> tuple:
    """Disc with a raised knurled rim and a recessed centre carrying a printed star."""
    ro = m.radius
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    ri, rc, step = 0.78 * ro, 0.5 * ro, max(0.0008, px)
    rim = _smoothstep(ri - step, ri, r)
    recess = 1 - _smoothstep(rc, rc + step, r)
    top = 0.011 + 0.004 * rim - 0.002 * recess
    height = top * _rounded_edge(ro - r, 0.003)
    albedo = np.broadcast_to(np.asarray(m.body), u.shape + (3,)).copy()
    knurl = _fine(0.5 + 0.5 * np.cos(64 * theta), 0.5, 2 * np.pi * 0.9 * ro / 64, px)
    knurl *= _smoothstep(ri, ri + step, r)
    albedo *= (1.0 - 0.3 * knurl)[..., None]
    star = 0.3 * ro * (0.65 + 0.35 * np.cos(5 * theta))
    _mix(albedo, m.print_colour, 1 - _smoothstep(star - px / 2, star + px / 2, r))
    dx, dy = _nearest_on_ring(theta, 12, 0.5 * (rc + ri))
    _mix(albedo, m.accent, _disc(u - dx, v - dy, 0.0016, px / 2))
    ring = np.abs(r - (rc + 0.6 * step + 0.0012))
    _mix(albedo, m.print_colour, 1 - _smoothstep(0.0004, 0.0004 + px, ring))
    return height, albedo


def _dome(u: np.ndarray, v: np.ndarray, m: LineModel, px: float) -> tuple:
    """Spherical cap on a flange with six bolt heads; printed logo and latitude stripes."""
    ro = m.radius
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    rd, hd = 0.72 * ro, 0.014
    sphere = (rd**2 + hd**2) / (2 * hd)
    cap = np.clip(np.sqrt(np.clip(sphere**2 - r**2, 0.0, None)) - (sphere - hd), 0.0, None)
    bx, by = _nearest_on_ring(theta, 6, 0.5 * (rd + ro))
    bolt_r = np.hypot(u - bx, v - by)
    bolt = 0.0015 * np.sqrt(np.clip(1 - (bolt_r / 0.0024) ** 2, 0.0, None))
    height = (0.008 + bolt) * _rounded_edge(ro - r, 0.002) + cap
    albedo = np.broadcast_to(np.asarray(m.body), u.shape + (3,)).copy()
    _mix(albedo, m.accent, 1 - _smoothstep(0.0024 - px / 2, 0.0024 + px / 2, bolt_r))
    on_cap = 1 - _smoothstep(rd - px, rd, r)
    stripes = _fine(np.cos(2 * np.pi * r / 0.0025) > 0.3, 0.4, 0.0025, px)
    stripes *= _smoothstep(0.55 * rd, 0.6 * rd, r)
    _mix(albedo, m.print_colour, 0.6 * stripes * on_cap)
    ring = np.abs(r - 0.4 * rd)
    _mix(albedo, m.print_colour, 1 - _smoothstep(0.0012, 0.0012 + px, ring))
    cross = (np.minimum(np.abs(u), np.abs(v)) < 0.0012) & (r < 0.28 * rd)
    _mix(albedo, m.print_colour, cross.astype(float))
    return height, albedo


def _box(u: np.ndarray, v: np.ndarray, m: LineModel, px: float) -> tuple:
    """Rounded box with a barcode label, printed tick marks and a raised round button."""
    a, b, power = _outline_axes("box", m.radius)
    s = (np.abs(u / a) ** power + np.abs(v / b) ** power) ** (1 / power)
    height = 0.013 * _rounded_edge((1 - s) * b, 0.003)
    bu, bv, br = 0.58 * a, 0.0, 0.24 * b
    button_r = np.hypot(u - bu, v - bv)
    height += 0.003 * _rounded_edge(br - button_r, 0.0015)
    albedo = np.broadcast_to(np.asarray(m.body), u.shape + (3,)).copy()
    _mix(albedo, m.accent, 1 - _smoothstep(br - px / 2, br + px / 2, button_r))
    pitch, x0 = 0.0011, -0.75 * a
    column = np.clip(np.floor((u - x0) / pitch).astype(int), 0, len(m.code) - 1)
    bars = _fine(np.asarray(m.code, dtype=float)[column], float(np.mean(m.code)), 2 * pitch, px)
    label = (u > x0) & (u < 0.1 * a) & (v > -0.6 * b) & (v < 0.05 * b)
    _mix(albedo, m.print_colour, bars * label)
    ticks = _fine(np.cos(2 * np.pi * u / 0.002) > 0.0, 0.5, 0.002, px)
    ticks = ticks * ((u > x0) & (u < 0.1 * a) & (v > 0.3 * b) & (v < 0.5 * b))
    _mix(albedo, m.print_colour, ticks)
    frame = (np.abs(s - 0.88) < 0.012).astype(float)
    _mix(albedo, m.accent, frame)
    return height, albedo


def _ribs(u: np.ndarray, v: np.ndarray, m: LineModel, px: float) -> tuple:
    """Rounded block with parallel raised ribs: distinct surfaces close together.

    Rib tops and the groove floors between them are 3 mm apart in height but side by side
    in the image, so a group of nearest points near a rib's edge mixes the two surfaces (the
    case Iterative Point Grouping is for). Printed dots on the rib tops.
    """
    a, b, power = _outline_axes("ribs", m.radius)
    s = (np.abs(u / a) ** power + np.abs(v / b) ** power) ** (1 / power)
    period, rib, step = 0.006, 0.0035, max(0.0004, px / 2)
    phase = np.mod(u + 0.5 * rib, period)
    on_rib = _smoothstep(0.0, step, phase) * (1 - _smoothstep(rib - step, rib, phase))
    height = (0.008 + 0.003 * on_rib) * _rounded_edge((1 - s) * b, 0.003)
    albedo = np.broadcast_to(np.asarray(m.body), u.shape + (3,)).copy()
    dots = _disc(phase - 0.5 * rib, np.mod(v, 0.008) - 0.004, 0.0009, px / 2) * on_rib
    _mix(albedo, m.print_colour, dots)
    return height, albedo


_SHAPE_FUNCTIONS = {"puck": _puck, "dome": _dome, "box": _box, "ribs": _ribs}


def _normals(z: np.ndarray, uu: np.ndarray, vv: np.ndarray, focal: float) -> np.ndarray:
    """(S, S, 3) unit normals of the surface z(u, v) back-projected, facing the camera."""
    points = np.stack([uu * z / focal, vv * z / focal, z], axis=-1)
    normal = np.cross(np.gradient(points, axis=0), np.gradient(points, axis=1))
    return normal / (np.linalg.norm(normal, axis=-1, keepdims=True) + 1e-15)


# ------------------------------------------------------------------------------------------
# defects


@dataclass(frozen=True)
class _Defect:
    """A defect on the pixel grid (all arrays (S, S)).

    Attributes:
        mask: ground-truth pixels.
        change: height change along the view (metres, positive = towards the camera).
        weight: albedo blend weight towards ``colour`` in [0, 1].
        colour: linear RGB albedo of the defect.
        missing: pixels the sensor does not measure.
        variant: defect variant name.
    """

    mask: np.ndarray
    change: np.ndarray
    weight: np.ndarray
    colour: tuple[float, float, float]
    missing: np.ndarray
    variant: str


def _place(top: np.ndarray, margin_px: float, rng: np.random.Generator) -> np.ndarray:
    """A random pixel (row, col) of ``top`` at least ``margin_px`` from its border."""
    inside = ndimage.distance_transform_edt(top)
    candidates = np.flatnonzero(inside >= margin_px)
    if candidates.size == 0:
        candidates = np.flatnonzero(inside >= inside.max())
    flat = int(candidates[int(rng.integers(candidates.size))])
    return np.array(divmod(flat, top.shape[1]), dtype=float)


def _colour_defect(
    rows: np.ndarray,
    cols: np.ndarray,
    top: np.ndarray,
    area_px: float,
    model: LineModel,
    rng: np.random.Generator,
) -> _Defect:
    """A stain (irregular blob) or a painted streak: albedo only."""
    none = np.zeros(rows.shape)
    colours = [c for c in _STAINS if np.abs(np.subtract(c, model.body)).mean() > 0.3]
    colour = colours[int(rng.integers(len(colours)))]
    if rng.random() < 0.5:
        radius = np.sqrt(area_px / np.pi)
        cy, cx = _place(top, radius, rng)
        dist, theta = np.hypot(rows - cy, cols - cx), np.arctan2(rows - cy, cols - cx)
        phase = rng.uniform(0.0, 2 * np.pi, 2)
        wobble = 0.2 * np.sin(3 * theta + phase[0]) + 0.1 * np.sin(5 * theta + phase[1])
        mask = dist < radius * (1 + wobble)
        weight = mask * (0.75 + 0.2 * np.cos(dist / max(radius, 1.0) * 6 + phase[0]))
        return _Defect(mask, none, weight, colour, none > 0, "stain")
    dist, length = _polyline_distance(rows, cols, top, rng, curl=0.25)
    mask = dist < area_px / length / 2
    return _Defect(mask, none, mask * 0.85, colour, none > 0, "streak")


def _polyline_distance(
    rows: np.ndarray, cols: np.ndarray, top: np.ndarray, rng: np.random.Generator, curl: float
) -> tuple[np.ndarray, float]:
    """Distance (px) to a random winding 5-segment polyline placed on ``top``, and its length.

    The length is 0.54–0.72 × sqrt(area of ``top``); each segment turns by up to ±curl·180°.
    """
    length = float(0.6 * np.sqrt(top.sum()) * rng.uniform(0.9, 1.2))
    segments = 5
    heading = rng.uniform(0.0, 2 * np.pi) + np.cumsum(rng.uniform(-curl, curl, segments) * np.pi)
    steps = (length / segments) * np.stack([np.sin(heading), np.cos(heading)], axis=1)
    vertices = np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    vertices -= 0.5 * (vertices.max(axis=0) + vertices.min(axis=0))
    reach = float(np.hypot(vertices[:, 0], vertices[:, 1]).max())
    vertices += _place(top, 0.8 * reach, rng)
    best = np.full(rows.shape, np.inf)
    for start, end in zip(vertices[:-1], vertices[1:], strict=True):
        d = end - start
        t = ((rows - start[0]) * d[0] + (cols - start[1]) * d[1]) / max(float(d @ d), 1e-9)
        t = np.clip(t, 0.0, 1.0)
        gap = np.hypot(rows - start[0] - t * d[0], cols - start[1] - t * d[1])
        best = np.minimum(best, gap)
    return best, length


def _dent_defect(
    rows: np.ndarray,
    cols: np.ndarray,
    top: np.ndarray,
    area_px: float,
    model: LineModel,
    rng: np.random.Generator,
) -> _Defect:
    """A smooth elliptical dent or bump, 3–6 % of the object size deep: geometry only."""
    none = np.zeros(rows.shape)
    aspect, turn = rng.uniform(1.0, 1.6), rng.uniform(0.0, np.pi)
    mask_radius = np.sqrt(area_px / np.pi)  # geometric mean of the mask's semi-axes
    support = mask_radius / np.sqrt(1 - np.sqrt(0.05))  # profile ≥ 0.05 inside the mask
    cy, cx = _place(top, support * np.sqrt(aspect), rng)
    du, dv = cols - cx, rows - cy
    along = (du * np.cos(turn) + dv * np.sin(turn)) / np.sqrt(aspect)
    across = (-du * np.sin(turn) + dv * np.cos(turn)) * np.sqrt(aspect)
    rho2 = (along**2 + across**2) / support**2
    profile = np.clip(1 - rho2, 0.0, None) ** 2
    depth = rng.uniform(0.03, 0.06) * 2 * model.radius
    variant = "dent" if rng.random() < 0.6 else "bump"
    change = (-depth if variant == "dent" else depth) * profile
    return _Defect(profile >= 0.05, change, none, (0.0, 0.0, 0.0), none > 0, variant)


def _crack_defect(
    rows: np.ndarray,
    cols: np.ndarray,
    top: np.ndarray,
    area_px: float,
    model: LineModel,
    rng: np.random.Generator,
) -> _Defect:
    """A dark winding groove 1.5–2.5 mm deep, part of its floor unmeasured: 2D and 3D."""
    dist, length = _polyline_distance(rows, cols, top, rng, curl=0.2)
    width = max(area_px / length, 2.0)
    mask = dist < width / 2
    depth = rng.uniform(0.0015, 0.0025)
    change = -depth * (1 - _smoothstep(width / 2 - 1.0, width / 2 + 0.5, dist))
    missing = (dist < width / 4) & (rng.random(rows.shape) < 0.35)
    return _Defect(mask, change, mask * 0.85, (0.04, 0.035, 0.03), missing, "crack")


_DEFECT_FUNCTIONS = {"colour": _colour_defect, "dent": _dent_defect, "crack": _crack_defect}


# ------------------------------------------------------------------------------------------
# rendering


def render_sample(
    model: LineModel,
    spec: SampleSpec,
    *,
    apply_defect: bool = True,
    defect_seed: int | None = None,
) -> RenderedSample:
    """Render one sample (what :func:`generate_line` writes for it).

    Args:
        model: the line model (from :func:`plan_line`).
        spec: the sample spec (from :func:`plan_line`).
        apply_defect: False renders the same sample without its defect (same pose, lighting
            and noise): a debugging / testing hook.
        defect_seed: draw the defect's size and placement from this index instead of the
            sample's: samples of one kind rendered with the same ``defect_seed`` carry the same
            defect (a recurring defect, e.g. a worn tool), each in its own pose and noise.

    Returns:
        The RGB image, XYZ map and ground-truth mask (all False when no defect is applied).
    """
    size, focal = model.image_size, model.focal
    centre = (np.arange(size) + 0.5 - size / 2).astype(np.float64)
    vv, uu = np.meshgrid(centre, centre, indexing="ij")  # pixel offsets from the centre
    index = np.arange(size, dtype=np.float64)
    rows, cols = np.meshgrid(index, index, indexing="ij")
    pixel = model.camera_distance / focal  # metres per pixel on the plane
    gx, gy = uu * pixel, vv * pixel
    plane = model.camera_distance + model.plane_slope[0] * gx + model.plane_slope[1] * gy
    cos_a, sin_a = np.cos(spec.angle), np.sin(spec.angle)
    lx, ly = gx - spec.shift[0], gy - spec.shift[1]
    local_u, local_v = cos_a * lx + sin_a * ly, -sin_a * lx + cos_a * ly
    height, albedo = _SHAPE_FUNCTIONS[model.shape](local_u, local_v, model, pixel)
    footprint = height > FOOTPRINT_HEIGHT

    background = _MAT if model.support_plane else _VOID
    waves = sum(
        np.cos(2 * np.pi * (gx * np.cos(k) + gy * np.sin(k)) / period + phase)
        for k, period, phase in zip(
            (0.3, 1.7, 2.9), (0.011, 0.007, 0.017), spec.mat_phase, strict=True
        )
    )
    mat = np.asarray(background) * (1 + 0.04 * waves)[..., None]
    cover = _smoothstep(0.0, 0.0015, height)[..., None]
    albedo = mat * (1 - cover) + albedo * cover

    border = max(1, round(size / 112))  # the sensor measures nothing this close to the edge
    frame = np.zeros((size, size), dtype=bool)
    frame[border:-border, border:-border] = True
    mask = np.zeros((size, size), dtype=bool)
    change = np.zeros((size, size))
    missing = np.zeros((size, size), dtype=bool)
    variant = ""
    if apply_defect and spec.defect_type != "good":
        top = (height > TOP_HEIGHT) & frame  # a part cut off by the frame: its top ends there
        where = spec.index if defect_seed is None else defect_seed
        area_px = float(_rng(model.seed, 2, where).uniform(*DEFECT_AREA)) * footprint.sum()
        defect = _DEFECT_FUNCTIONS[spec.defect_type](
            rows, cols, top, area_px, model, _rng(model.seed, 3, where)
        )
        _mix(albedo, defect.colour, defect.weight * footprint)
        mask = defect.mask & footprint
        change = defect.change * footprint
        missing = defect.missing & footprint
        variant = defect.variant

    depth_plain = plane - height
    depth = plane - (height + change)
    # Dents are invisible in 2D: shade with the surface without them; cracks are shaded as is.
    plain_normal = _normals(depth_plain, uu, vv, focal)
    normal = _normals(depth, uu, vv, focal) if spec.defect_type == "crack" else plain_normal
    light = np.asarray(spec.light)
    half = light + np.array([0.0, 0.0, -1.0])
    half /= np.linalg.norm(half)
    diffuse = np.clip(normal @ light, 0.0, None)
    glint = model.specular * np.clip(normal @ half, 0.0, None) ** 40
    radiance = albedo * (spec.ambient + spec.intensity * diffuse)[..., None] + glint[..., None]

    noise = _rng(model.seed, 4, spec.index)
    rgb_noise = noise.normal(0.0, RGB_NOISE, (size, size, 3))
    z_noise = noise.normal(0.0, DEPTH_NOISE, (size, size))
    dropout = noise.random((size, size)) < DROPOUT_RATE
    encoded = np.sqrt(np.clip(radiance, 0.0, 1.0)) * 255.0 + rgb_noise  # gamma ~2
    rgb = np.clip(np.rint(encoded), 0, 255).astype(np.uint8)

    z = depth + z_noise
    xyz = np.stack([uu * z / focal, vv * z / focal, z], axis=-1).astype(np.float32)
    measured = footprint | model.support_plane
    measured &= ~dropout & ~missing
    measured &= np.abs(plain_normal[..., 2]) >= GRAZING_LIMIT
    measured &= frame
    xyz[~measured] = 0.0
    return RenderedSample(rgb=rgb, xyz=xyz, mask=mask, variant=variant)


# ------------------------------------------------------------------------------------------
# writing


def _prepare_directory(line_dir: Path) -> None:
    """Empty ``line_dir`` if it holds a previous synthetic line; refuse any other content."""
    if not line_dir.exists():
        return
    if not line_dir.is_dir():
        raise FileExistsError(f"{line_dir}: exists and is not a directory")
    if not any(line_dir.iterdir()):
        return
    marker = line_dir / "line.json"
    try:
        ours = json.loads(marker.read_text(encoding="utf-8")).get("note") == NOTE
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise FileExistsError(
            f"{line_dir}: exists and is not a synthetic line written by tasks.synthetic.generator; "
            "refusing to overwrite it"
        )
    shutil.rmtree(line_dir)


def generate_line(
    root: str | Path,
    *,
    category: str = "part",
    num_samples: int = 16,
    image_size: int = 224,
    defect_rate: float = 0.4,
    seed: int = 0,
    support_plane: bool = True,
    shape: str | None = None,
    pixel_pitch: float | None = None,
    camera_distance: float | None = None,
    framing: str = "centred",
) -> LineSummary:
    """Write a synthetic product line in the MVTec 3D-AD layout.

    Args:
        root: dataset root; the line goes to ``root / category`` (a previous synthetic line
            there is replaced; any other non-empty folder is an error).
        category: category (line) name.
        num_samples: N ≥ 1 samples.
        image_size: S ≥ 32 (images, XYZ maps and masks are S×S).
        defect_rate: fraction of defective samples, round(N·rate) of them; the kinds
            (colour, dent, crack) are balanced, so each appears once N·rate ≥ 3.
        seed: everything random derives from it; same arguments → byte-identical files.
        support_plane: the background is a measured, slightly tilted plane (False: no
            measurement there, all zeros).
        shape: object type (:data:`SHAPES` or :data:`NAMED_SHAPES`); None picks one of
            :data:`SHAPES` from the seed.
        pixel_pitch: millimetres between neighbouring pixels on the plane at the nominal
            camera distance, in [0.05, 1.0]; None: 100 mm / S (the image spans 0.10 m).
        camera_distance: nominal camera-to-plane distance (metres) in [0.2, 1.0]; None draws
            it from the seed in 0.38–0.45 m.
        framing: ``centred``, ``touching``, ``crossing`` or ``mixed`` (drawn per sample), see
            the module docstring.

    Returns:
        What was written.

    Raises:
        ValueError: out-of-range arguments.
        FileExistsError: ``root / category`` holds something else.
    """
    model, specs = plan_line(
        num_samples=num_samples,
        image_size=image_size,
        defect_rate=defect_rate,
        seed=seed,
        support_plane=support_plane,
        shape=shape,
        pixel_pitch=pixel_pitch,
        camera_distance=camera_distance,
        framing=framing,
    )
    line_dir = Path(root) / category
    _prepare_directory(line_dir)
    samples = []
    for spec in specs:
        rendered = render_sample(model, spec)
        folder = line_dir / "test" / spec.defect_type
        for sub in ("rgb", "xyz", "gt"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rendered.rgb, mode="RGB").save(folder / "rgb" / f"{spec.stem}.png")
        gt = rendered.mask.astype(np.uint8) * 255
        Image.fromarray(gt, mode="L").save(folder / "gt" / f"{spec.stem}.png")
        tifffile.imwrite(folder / "xyz" / f"{spec.stem}.tiff", rendered.xyz, photometric="rgb")
        samples.append(
            {
                "name": spec.name,
                "index": spec.index,
                "defect_type": spec.defect_type,
                "variant": rendered.variant,
                "mask_pixels": int(rendered.mask.sum()),
                "framing": spec.framing,
                "measured_points": int(rendered.xyz.any(axis=-1).sum()),
            }
        )
    counts = {kind: 0 for kind in ("good",) + DEFECT_TYPES}
    for spec in specs:
        counts[spec.defect_type] += 1
    info = {
        "note": NOTE,
        "generator": f"tasks.synthetic.generator v{GENERATOR_VERSION}",
        "layout": "mvtec3d",
        "parameters": {
            "category": category,
            "num_samples": num_samples,
            "image_size": image_size,
            "defect_rate": defect_rate,
            "seed": seed,
            "support_plane": support_plane,
            "shape": model.shape,
            "pixel_pitch": pixel_pitch,
            "camera_distance": camera_distance,
            "framing": framing,
        },
        "camera": {
            "pixel_pitch_mm": model.pixel_pitch * 1000.0,
            "camera_distance_m": model.camera_distance,
            "field_of_view_m": model.image_size * model.pixel_pitch,
        },
        "model": asdict(model),
        "units": {"xyz": "metres, (0, 0, 0) = no measurement", "gt": "0 normal, 255 defect"},
        "counts": counts,
        "samples": samples,
    }
    (line_dir / "line.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return LineSummary(
        root=Path(root),
        category=category,
        num_samples=num_samples,
        counts=counts,
        image_size=image_size,
        shape=model.shape,
    )


# ------------------------------------------------------------------------------------------
# named lines


def realistic_line_kwargs(
    size: int = 400, *, support_plane: bool = False, framing: str = "mixed"
) -> dict[str, object]:
    """``generate_line`` / ``plan_line`` arguments of a line like MVTec 3D-AD scans.

    The camera is 0.5 m above the plane; the pitch (:data:`REALISTIC_PITCH`: 0.2 mm at
    400 px, 0.15 mm at 600 px, 0.12 mm at 800 px) puts about 68k–78k points on a centred part
    at 400 px and 188k–216k at 800 px. By default the scans are pre-cleaned (support plane removed,
    background zeros) and the framing is mixed: half the parts centred, the others touching
    or crossing an image border.

    Args:
        size: image side S (px), one of :data:`REALISTIC_PITCH`.
        support_plane: True keeps the measured support plane (a raw scan).
        framing: one of :data:`FRAMINGS`.

    Returns:
        ``{"image_size", "pixel_pitch", "camera_distance", "framing", "support_plane"}``.

    Raises:
        ValueError: a size without a realistic pitch.
    """
    if size not in REALISTIC_PITCH:
        raise ValueError(f"no realistic pitch for size {size}; expected one of "
                         f"{sorted(REALISTIC_PITCH)}")
    return {
        "image_size": size,
        "pixel_pitch": REALISTIC_PITCH[size],
        "camera_distance": REALISTIC_DISTANCE,
        "framing": framing,
        "support_plane": support_plane,
    }


def preset_kwargs(name: str) -> dict[str, object]:
    """The arguments a named line (:data:`PRESETS`) sets.

    ``mvtec3d-400`` / ``mvtec3d-800``: :func:`realistic_line_kwargs` at 400 / 800 px
    (pre-cleaned, mixed framing); ``-raw``: the same with the support plane;
    ``mvtec3d-400-filling``: 400 px at 0.12 mm, pre-cleaned, centred — the 48 mm field of
    view is narrower than the part (~6 cm): a round part's top face crosses every border, a
    box's its two short sides.

    Raises:
        ValueError: an unknown name.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")
    if name == "mvtec3d-400-filling":
        return {**realistic_line_kwargs(400, framing="centred"),
                "pixel_pitch": FRAME_FILLING_PITCH}
    size = int(name.split("-")[1])
    return realistic_line_kwargs(size, support_plane=name.endswith("-raw"))
