"""A perceptually ordered colour map for heat maps, computed by hand (no plotting library).

``inferno`` interpolates linearly, in sRGB, between nine anchors that follow matplotlib's
"inferno" (black → purple → red → orange → pale yellow). Its lightness (CIELAB L*) rises
steadily from 0 to 1, so a brighter pixel always means a higher map value and the scale
reads the same in greyscale; 'jet' instead peaks in lightness in the middle (yellow/cyan),
which makes mid values look like the hottest ones.
"""

from __future__ import annotations

import numpy as np

INFERNO_ANCHORS = np.array(
    [
        (0, 0, 4),
        (31, 12, 72),
        (85, 15, 109),
        (136, 34, 106),
        (186, 54, 85),
        (227, 89, 51),
        (249, 140, 10),
        (249, 201, 50),
        (252, 255, 164),
    ],
    dtype=np.float64,
)
"""sRGB anchors at 0, 1/8, …, 1."""


def inferno(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped) to inferno colours.

    Args:
        values: array of any shape.

    Returns:
        ``values.shape + (3,)`` uint8 sRGB.
    """
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    position = v * (len(INFERNO_ANCHORS) - 1)
    low = np.minimum(np.floor(position).astype(np.int64), len(INFERNO_ANCHORS) - 2)
    weight = (position - low)[..., None]
    colours = INFERNO_ANCHORS[low] * (1.0 - weight) + INFERNO_ANCHORS[low + 1] * weight
    return colours.round().astype(np.uint8)


HEAT_ALPHA = (0.15, 0.8)
"""Opacity of the heat map over the picture at the bottom and at the top of the scale."""


def blend_heat(base: np.ndarray | None, heat: np.ndarray) -> np.ndarray:
    """The heat map alpha-blended over a picture: low values let the picture show through.

    Args:
        base: (H, W, 3) uint8 picture, or None for the bare heat map.
        heat: (H, W) values in [0, 1] (clipped).

    Returns:
        (H, W, 3) uint8; the opacity grows linearly from ``HEAT_ALPHA[0]`` at 0 to
        ``HEAT_ALPHA[1]`` at 1.
    """
    heat = np.clip(np.asarray(heat, dtype=np.float64), 0.0, 1.0)
    colours = inferno(heat).astype(np.float64)
    if base is None:
        return colours.astype(np.uint8)
    alpha = (HEAT_ALPHA[0] + (HEAT_ALPHA[1] - HEAT_ALPHA[0]) * heat)[..., None]
    mixed = (1.0 - alpha) * np.asarray(base, dtype=np.float64) + alpha * colours
    return np.clip(mixed, 0, 255).round().astype(np.uint8)
