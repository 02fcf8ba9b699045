"""Metrics of a scored line when its samples carry labels (docs/method.md, *Metrics*)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from musc_core.metrics import image_metrics, pixel_metrics


def line_metrics(
    labels: Sequence[int | None],
    scores: np.ndarray,
    scores_rescored: np.ndarray,
    masks: Sequence[np.ndarray | None],
    maps: np.ndarray,
) -> dict[str, float] | None:
    """Image metrics (before and after RsCon) and pixel metrics of one line, all in memory.

    The report stage computes the same values without holding the maps
    (:func:`image_line_metrics`, :class:`musc_core.metrics.PixelMetricsStream`,
    :func:`with_pixel_metrics`).

    Args:
        labels: 0/1 per sample, None when unknown.
        scores: (N,) sample scores before RsCon.
        scores_rescored: (N,) sample scores after RsCon.
        masks: (S, S) bool ground truth per sample, None when the dataset has none.
        maps: (N, S, S) anomaly maps.

    Returns:
        Flat metric dictionary (``image_*``, ``image_*_before_rscon``, ``pixel_*``), or None
        when any sample has no label. Pixel metrics need every mask and one defect pixel.
    """
    image = image_line_metrics(labels, scores, scores_rescored)
    if image is None:
        return None
    pixel = None
    if all(m is not None for m in masks):
        mask_array = np.stack(masks).astype(bool)
        if mask_array.any():
            pixel = pixel_metrics(mask_array, maps)
    return with_pixel_metrics(image, pixel)


def image_line_metrics(
    labels: Sequence[int | None], scores: np.ndarray, scores_rescored: np.ndarray
) -> dict[str, float] | None:
    """The image metrics of one line (after, then before RsCon).

    Args:
        labels: 0/1 per sample, None when unknown.
        scores: (N,) sample scores before RsCon.
        scores_rescored: (N,) sample scores after RsCon.

    Returns:
        ``image_*`` and ``image_*_before_rscon`` values, or None when any sample has no label.
    """
    if not labels or any(label is None for label in labels):
        return None
    label_array = np.asarray(labels, dtype=np.int64)
    metrics: dict[str, float] = {}
    for key, value in image_metrics(label_array, scores_rescored).items():
        metrics[f"image_{key}"] = float(value)
    for key, value in image_metrics(label_array, scores).items():
        metrics[f"image_{key}_before_rscon"] = float(value)
    return metrics


def with_pixel_metrics(
    image: Mapping[str, float], pixel: Mapping[str, float] | None
) -> dict[str, float]:
    """The line's metric dictionary: image metrics, then the pixel ones as ``pixel_*``.

    Args:
        image: from :func:`image_line_metrics`.
        pixel: from :func:`musc_core.metrics.pixel_metrics` or its stream, or None when the
            line has no pixel metrics (a mask missing, or no defect pixel).
    """
    metrics = dict(image)
    for key, value in (pixel or {}).items():
        metrics[f"pixel_{key}"] = float(value)
    return metrics
