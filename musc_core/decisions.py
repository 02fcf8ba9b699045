"""Decisions without labels: which samples to flag and which pixels to mark as defective.

A production line has no labels, so the decision thresholds come from the line itself. Both
rules use robust statistics of the line's own scores:

- **Flag rule** (samples). A sample is flagged when its score after RsCon exceeds
  ``median + k · 1.4826 · MAD`` of the RsCon scores of the run, with
  ``MAD = median |x − median(x)|``.
- **Pixel rule** (predicted masks). A pixel is predicted defective when its anomaly-map value
  exceeds ``median + k · 1.4826 · MAD`` of the line's per-sample map maxima (the sample
  scores before RsCon, which are in the units of the maps). Most samples of a line are
  normal, so their maxima describe how high a normal pixel gets.

Why robust statistics: a mean and standard deviation would be pulled up by the very defects
we want to find (one strongly anomalous part can raise a 3σ threshold above every other
defect). The median and the MAD ignore up to half of the values being anomalous: adding an
extreme outlier moves them by at most one rank. The factor 1.4826 makes ``1.4826 · MAD``
equal to the standard deviation for normally distributed scores, so ``k`` reads as "k sigmas"
(``MuscConfig.flag_mad_k``, 3 by default).

Fallback when the MAD is 0 (more than half of the scores are identical): the spread is taken
as ``1.2533 · mean |x − median(x)|`` (the mean absolute deviation, scaled to σ for normal
data); when that is 0 too (a constant line) the threshold is ``+inf`` and nothing is flagged:
identical samples give no evidence that any of them is different.

Comparisons are strict (``score > threshold``), so a threshold equal to a score does not flag
it. The metrics' F1-optimal threshold (:func:`musc_core.metrics.f1_optimal_threshold`) is the
labelled counterpart; it uses ``>=`` like every curve in :mod:`musc_core.metrics`.

Everything here is NumPy/torch only and works on CPU arrays (torch tensors on any device are
moved to the CPU for the statistics; :func:`predicted_masks` stays on the maps' device).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

MAD_TO_SIGMA = 1.4826
"""1 / Φ⁻¹(3/4): scales the MAD to the standard deviation of normally distributed data."""
MEAN_AD_TO_SIGMA = 1.2533
"""√(π/2): scales the mean absolute deviation to the standard deviation of normal data."""


class Decision(NamedTuple):
    """The flag decision of one run.

    Attributes:
        threshold: flag threshold on the scores (``+inf`` for a constant line).
        flags: (N,) bool, True where ``score > threshold``.
        median: median of the scores.
        mad: median absolute deviation of the scores from their median (unscaled).
        reason: why no threshold could be set (``threshold`` is then ``+inf`` and nothing is
            flagged), or None when the batch set one.
    """

    threshold: float
    flags: np.ndarray
    median: float
    mad: float
    reason: str | None = None


def _as_scores(scores: object) -> np.ndarray:
    """Flat float64 NumPy copy of finite scores (torch tensors from any device)."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    array = np.asarray(scores, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError("a threshold needs at least one score")
    if not np.isfinite(array).all():
        raise ValueError("scores hold NaN or infinite values")
    return array


def _check_k(k: float) -> None:
    """Reject a non-positive or non-finite multiplier."""
    if not (math.isfinite(k) and k > 0):
        raise ValueError(f"k must be a positive finite number, got {k}")


def _robust_stats(scores: np.ndarray, k: float) -> tuple[float, float, float]:
    """``(threshold, median, mad)`` of validated scores (see the module docstring)."""
    median = float(np.median(scores))
    deviations = np.abs(scores - median)
    mad = float(np.median(deviations))
    spread = MAD_TO_SIGMA * mad
    if spread == 0.0:
        spread = MEAN_AD_TO_SIGMA * float(deviations.mean())
    threshold = median + k * spread if spread > 0.0 else math.inf
    return threshold, median, mad


def robust_threshold(scores: np.ndarray | torch.Tensor, k: float) -> float:
    """``median + k · 1.4826 · MAD`` of the scores, with the documented fallbacks.

    Args:
        scores: (N,) scores of one line (any shape is flattened).
        k: number of robust standard deviations above the median, > 0.

    Returns:
        The threshold; with MAD = 0 the mean-absolute-deviation spread is used, and when every
        score is the same it is ``+inf``.

    Raises:
        ValueError: for empty or non-finite scores or a non-positive ``k``.
    """
    _check_k(k)
    return _robust_stats(_as_scores(scores), k)[0]


def flag_samples(scores: np.ndarray | torch.Tensor, k: float) -> Decision:
    """Flag the samples whose score exceeds the line's robust threshold.

    Args:
        scores: (N,) sample scores of one run; the flag rule uses the scores after RsCon.
        k: number of robust standard deviations above the median, > 0
            (``MuscConfig.flag_mad_k``).

    Returns:
        The threshold, the (N,) bool flags (``score > threshold``), the median and the MAD.

    Raises:
        ValueError: for empty or non-finite scores or a non-positive ``k``.
    """
    _check_k(k)
    values = _as_scores(scores)
    threshold, median, mad = _robust_stats(values, k)
    return Decision(threshold=threshold, flags=values > threshold, median=median, mad=mad)


MIN_FLAG_SAMPLES = 5
"""Fewest scores from which :func:`flag_outliers` sets a threshold (its start is the lower
half: three scores at least)."""


def _no_threshold(values: np.ndarray, reason: str) -> Decision:
    """A decision that flags nothing and says why."""
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    return Decision(math.inf, np.zeros(values.size, dtype=bool), median, mad, reason)


def flag_outliers(scores: np.ndarray | torch.Tensor, k: float) -> Decision:
    """Flag the samples above a threshold grown from the lower half of the scores.

    :func:`flag_samples` takes the median and the MAD of every score, so a batch with many
    defects (a third of them, say) inflates the MAD until the threshold passes every score.
    This rule assumes only that fewer than half of the batch are defective and that defects
    score high:

    1. the inliers start as the lower half, the ``⌈N/2⌉`` lowest scores;
    2. ``t = median + k · 1.4826 · MAD`` of the inliers (with the fallbacks of
       :func:`robust_threshold`); the inliers become every score ``<= t``;
    3. step 2 repeats until the inliers stop changing (at most N times).

    Started from the lower half the threshold grows: the median and the MAD of a set cut at
    ``t`` are those of the normal scores below ``t``, so ``t`` climbs until it reaches the top
    of the normal scores plus k robust sigmas and stops at the first gap wider than that. On
    a clean batch it ends where :func:`flag_samples` is (the inliers are every score).

    Args:
        scores: (N,) sample scores of one run (the scores after RsCon).
        k: number of robust standard deviations above the median, > 0.

    Returns:
        The threshold, the flags (``score > threshold``), the inliers' median and MAD; for
        fewer than :data:`MIN_FLAG_SAMPLES` scores, or a batch whose scores are all equal, the
        threshold is ``+inf``, nothing is flagged and ``reason`` says why.

    Raises:
        ValueError: for empty or non-finite scores or a non-positive ``k``.
    """
    _check_k(k)
    values = _as_scores(scores)
    n = values.size
    if n < MIN_FLAG_SAMPLES:
        return _no_threshold(
            values,
            f"{n} sample(s): a threshold needs at least {MIN_FLAG_SAMPLES}; nothing flagged "
            "(score the parts against a reference bank with score-new, or a larger batch)",
        )
    if float(values.max()) == float(values.min()):
        return _no_threshold(values, "every score is the same; nothing flagged")
    inliers = values <= np.sort(values)[(n + 1) // 2 - 1]
    threshold, median, mad = _robust_stats(values[inliers], k)
    for _ in range(n):
        grown = values <= threshold
        if np.array_equal(grown, inliers):
            break
        inliers = grown
        threshold, median, mad = _robust_stats(values[inliers], k)
    return Decision(threshold=threshold, flags=values > threshold, median=median, mad=mad)


def pixel_threshold(sample_scores_before_rscon: np.ndarray | torch.Tensor, k: float) -> float:
    """Pixel threshold of a line: the robust threshold of its per-sample map maxima.

    Args:
        sample_scores_before_rscon: (N,) sample scores before RsCon (each the maximum of the
            sample's anomaly map, so in map units).
        k: number of robust standard deviations above the median, > 0.

    Returns:
        The threshold to pass to :func:`predicted_masks` (``+inf`` for a constant line).
    """
    return robust_threshold(sample_scores_before_rscon, k)


def predicted_masks(maps: np.ndarray | torch.Tensor, threshold: float) -> np.ndarray | torch.Tensor:
    """Predicted defect masks: the pixels whose map value exceeds the pixel threshold.

    Args:
        maps: (N, S, S) anomaly maps (NumPy array or torch tensor on any device).
        threshold: from :func:`pixel_threshold`.

    Returns:
        (N, S, S) bool, ``maps > threshold``: a torch tensor on the maps' device for torch
        input, else a NumPy array. A threshold of ``+inf`` marks nothing.
    """
    if isinstance(maps, torch.Tensor):
        return maps > threshold
    return np.asarray(maps) > threshold


DRIFT_K = 3.0
"""Default drift limit: tonight's median more than this many robust sigmas from the bank's."""


class Drift(NamedTuple):
    """How far tonight's scores moved from the reference scores.

    Attributes:
        shift: ``(median(tonight) − median(reference)) / (1.4826 · MAD(reference))`` (the
            mean-absolute-deviation fallback of :func:`robust_threshold` when the MAD is 0;
            ``0`` when both spreads are 0 and the medians agree, ``±inf`` when they differ).
        drifted: ``|shift| > limit``.
        limit: the limit used.
    """

    shift: float
    drifted: bool
    limit: float


def score_drift(
    tonight: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, limit: float = DRIFT_K
) -> Drift:
    """Median shift of tonight's scores from the reference scores, in robust sigmas.

    The scores compared are the sample scores before RsCon (map maxima): RsCon normalizes each
    pool to [0, 1], so its scores do not compare across nights. The reference is the bank's
    (earlier nights') scores. A shift beyond ``limit`` means the line's parts, the camera or
    the lighting changed, or many parts are defective tonight.

    Args:
        tonight: (N,) scores of tonight's samples.
        reference: (R,) scores of the reference samples.
        limit: drift limit in robust sigmas, > 0.

    Returns:
        The shift, whether it exceeds the limit, and the limit.

    Raises:
        ValueError: for empty or non-finite scores or a non-positive limit.
    """
    if not (math.isfinite(limit) and limit > 0):
        raise ValueError(f"limit must be a positive finite number, got {limit}")
    now, ref = _as_scores(tonight), _as_scores(reference)
    centre = float(np.median(ref))
    deviations = np.abs(ref - centre)
    spread = MAD_TO_SIGMA * float(np.median(deviations))
    if spread == 0.0:
        spread = MEAN_AD_TO_SIGMA * float(deviations.mean())
    difference = float(np.median(now)) - centre
    if spread > 0.0:
        shift = difference / spread
    else:
        shift = 0.0 if difference == 0.0 else math.copysign(math.inf, difference)
    return Drift(shift=shift, drifted=abs(shift) > limit, limit=limit)
