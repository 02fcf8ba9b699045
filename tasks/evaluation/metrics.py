"""Metrics of a scored line when its samples carry labels (docs/method.md, *Metrics*)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from musc_core.metrics import image_metrics, pixel_metrics


def line_metrics(
    labels: Sequence[int | None],
    scores: np.ndarray,
    scores_rescored: np.ndarray,
    masks: Sequence[np.ndarray | None],
    maps: np.ndarray,
) -> dict[str, float] | None:
    """Image metrics (before and after RsCon) and pixel metrics of one line.

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
    if not labels or any(label is None for label in labels):
        return None
    label_array = np.asarray(labels, dtype=np.int64)
    metrics: dict[str, float] = {}
    for key, value in image_metrics(label_array, scores_rescored).items():
        metrics[f"image_{key}"] = value
    for key, value in image_metrics(label_array, scores).items():
        metrics[f"image_{key}_before_rscon"] = value
    if all(m is not None for m in masks):
        mask_array = np.stack(masks).astype(bool)
        if mask_array.any():
            for key, value in pixel_metrics(mask_array, maps).items():
                metrics[f"pixel_{key}"] = value
    return {k: float(v) for k, v in metrics.items()}
