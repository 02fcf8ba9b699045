"""Metrics of a scored line when its samples carry labels (SPEC §6)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from musc_core.metrics import image_metrics, pixel_metrics
from musc_core.pipeline import ScoreResult
from tasks.prepare import PreparedSample


def line_metrics(
    prepared: Sequence[PreparedSample], result: ScoreResult
) -> dict[str, float] | None:
    """Image metrics (before and after RsCon) and pixel metrics of one line.

    Args:
        prepared: the scored samples, in the result's order.
        result: their scores and maps.

    Returns:
        Flat metric dictionary (``image_*``, ``image_*_before_rscon``, ``pixel_*``), or None
        when any sample has no label.
    """
    labels = [p.record.label for p in prepared]
    if any(label is None for label in labels):
        return None
    label_array = np.asarray(labels, dtype=np.int64)
    metrics: dict[str, float] = {}
    for key, value in image_metrics(label_array, result.scores_rescored.numpy()).items():
        metrics[f"image_{key}"] = value
    for key, value in image_metrics(label_array, result.scores.numpy()).items():
        metrics[f"image_{key}_before_rscon"] = value
    masks = [p.mask for p in prepared]
    if all(m is not None for m in masks):
        mask_array = torch.stack(masks).numpy()
        if mask_array.any():
            for key, value in pixel_metrics(mask_array, result.maps.numpy()).items():
                metrics[f"pixel_{key}"] = value
    return {k: float(v) for k, v in metrics.items()}
