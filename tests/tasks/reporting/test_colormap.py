"""The hand-made inferno scale: anchors, interpolation, rising lightness, the alpha blend."""

import numpy as np

from tasks.reporting.colormap import HEAT_ALPHA, INFERNO_ANCHORS, blend_heat, inferno


def cielab_lightness(rgb):
    """CIELAB L* of sRGB colours (uint8), from the sRGB and CIE formulas (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    y = linear @ np.array([0.2126, 0.7152, 0.0722])
    f = np.where(y > (6 / 29) ** 3, np.cbrt(y), y / (3 * (6 / 29) ** 2) + 4 / 29)
    return 116 * f - 16


def test_anchors_are_hit_exactly_and_midpoints_interpolate():
    stops = np.linspace(0, 1, len(INFERNO_ANCHORS))
    np.testing.assert_array_equal(inferno(stops), INFERNO_ANCHORS.astype(np.uint8))
    middle = inferno(np.array([1 / 16]))[0]
    np.testing.assert_array_equal(middle, np.round((INFERNO_ANCHORS[0] + INFERNO_ANCHORS[1]) / 2))
    np.testing.assert_array_equal(inferno(np.array([-3.0, 7.0])), inferno(np.array([0.0, 1.0])))
    assert inferno(np.zeros((4, 5))).shape == (4, 5, 3)


def jet(values):
    """The 'jet' map the overlays used before (a reference the inferno scale must beat)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    channels = np.concatenate(
        [np.clip(1.5 - np.abs(4.0 * v - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], axis=-1
    )
    return (channels * 255.0).round().astype(np.uint8)


def test_lightness_rises_steadily_unlike_jet():
    lightness = cielab_lightness(inferno(np.linspace(0, 1, 65)))
    steps = np.diff(lightness)
    assert (steps > 0).all()
    assert steps.max() < 3 * steps.mean()  # no flat or jumpy stretch
    assert lightness[0] < 2 and lightness[-1] > 95
    jet_lightness = cielab_lightness(jet(np.linspace(0, 1, 65)[None, :])[0])
    assert not (np.diff(jet_lightness) > 0).all()  # the old scale fails the same check


def test_blend_lets_the_picture_show_at_low_values():
    base = np.full((1, 2, 3), 200, np.uint8)
    out = blend_heat(base, np.array([[0.0, 1.0]]))
    low, high = HEAT_ALPHA
    np.testing.assert_array_equal(
        out[0, 0], np.round((1 - low) * 200 + low * inferno(np.zeros(1))[0].astype(float))
    )
    np.testing.assert_array_equal(
        out[0, 1], np.round((1 - high) * 200 + high * inferno(np.ones(1))[0].astype(float))
    )
    np.testing.assert_array_equal(blend_heat(None, np.array([[0.5]]))[0, 0], inferno([0.5])[0])
