"""Detection and segmentation metrics (docs/method.md, *Metrics*).

Image AUROC/AP/F1-max (and the threshold at the F1 maximum), pixel AUROC/AP/F1-max, and
AUPRO up to an FPR limit (the exact MVTec-style one and the reference release's 200-threshold
variant). :class:`PixelMetricsAccumulator` gives the same pixel metrics from samples added a
block at a time, with memory bounded by the distinct scores and the defect pixels.

Everything here works on NumPy arrays (CPU torch tensors are accepted through ``np.asarray``);
nothing reads or writes files.

Conventions shared by the functions below:

- A sample or pixel is predicted anomalous at threshold ``t`` when its score is ``>= t`` for
  the curves built on every distinct score (AUROC, AP, F1-max, exact AUPRO), exactly as
  scikit-learn and the MVTec AD evaluation code do; the 200-threshold AUPRO variant uses
  ``score > t``, as the reference release does.
- Ground-truth regions are the connected components of each GT mask, computed per image with
  **8-connectivity** (``scipy.ndimage.label`` with a 3×3 all-ones structure). This is what the
  official MVTec AD / MVTec 3D-AD evaluation scripts use (they pass ``np.ones((3, 3))``
  explicitly), and also what the reference's 200-threshold variant gets from
  ``skimage.measure.label``'s default (full connectivity). ``connectivity=4`` is available.
- Degenerate inputs never raise: a metric that is undefined (only one class present, no
  anomalous pixel, constant maps for the 200-threshold AUPRO, ...) is returned as ``nan``
  under its usual key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

PIXEL_KEYS = ("auroc", "ap", "f1_max", "aupro", "aupro_200")
IMAGE_KEYS = ("auroc", "ap", "f1_max")


class ProCurve(NamedTuple):
    """Per-region-overlap curve over every distinct threshold, from the highest down.

    Attributes:
        fpr: (T + 2,) float64 false-positive rate over all normal pixels; starts at 0 (no
            pixel positive) and ends at 1 (every pixel positive).
        pro: (T + 2,) float64 mean over all GT regions (of all images) of the fraction of the
            region predicted anomalous; starts at 0 and ends at 1.
    """

    fpr: np.ndarray
    pro: np.ndarray


def _f1_max(precision: np.ndarray, recall: np.ndarray) -> float:
    """Maximum of 2PR/(P+R) over the curve, with 0/0 counted as 0."""
    denom = precision + recall
    f1 = np.divide(
        2.0 * precision * recall, denom, out=np.zeros_like(denom, dtype=np.float64),
        where=denom > 0,
    )
    return float(f1.max()) if f1.size else math.nan


def _as_scores(values: object, name: str) -> np.ndarray:
    """Flat float array of finite scores (float16/ints promoted to float64)."""
    array = np.asarray(values)
    if array.dtype == np.float32 or array.dtype == np.float64:
        scores = array
    else:
        scores = array.astype(np.float64)
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return scores


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Image-level AUROC, average precision and F1-max.

    Args:
        labels: (N,) ground-truth labels, 1 = anomalous, 0 = normal.
        scores: (N,) anomaly scores, higher = more anomalous.

    Returns:
        ``{"auroc", "ap", "f1_max"}`` as floats; all ``nan`` when ``labels`` holds only one
        class (the metrics are undefined).

    Raises:
        ValueError: when the shapes differ, labels are not 0/1, or scores are not finite.
    """
    y, s = _image_inputs(labels, scores)
    if y.size == 0 or y.min() == y.max():
        return {key: math.nan for key in IMAGE_KEYS}
    precision, recall, _ = precision_recall_curve(y, s)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "ap": float(average_precision_score(y, s)),
        "f1_max": _f1_max(precision, recall),
    }


def _image_inputs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated flat (N,) int64 0/1 labels and finite scores of the same length."""
    y = np.asarray(labels).ravel()
    s = _as_scores(scores, "scores").ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    return y.astype(np.int64), s


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """Score threshold at the F1-max point of the precision–recall curve.

    The labelled counterpart of the unsupervised flag rule (:mod:`musc_core.decisions`): the
    threshold an oracle would have picked for this line. Every distinct score ``t`` is a
    candidate cut with the rule ``score >= t`` (the points of scikit-learn's
    ``precision_recall_curve``); F1 = 2·TP / (2·TP + FP + FN) is computed from exact counts.

    Args:
        labels: (N,) ground-truth labels, 1 = anomalous, 0 = normal.
        scores: (N,) anomaly scores, higher = more anomalous.

    Returns:
        The score ``t`` whose cut has the maximal F1 (that F1 is ``image_metrics``'s
        ``f1_max``); among cuts with equal F1 the largest ``t`` (fewest samples predicted
        anomalous). ``nan`` when ``labels`` holds only one class.

    Raises:
        ValueError: when the shapes differ, labels are not 0/1, or scores are not finite.
    """
    y, s = _image_inputs(labels, scores)
    if y.size == 0 or y.min() == y.max():
        return math.nan
    cuts = _sort_pixels(y, s)
    positives = cuts.tps[-1]
    f1 = 2.0 * cuts.tps / (cuts.tps + cuts.fps + positives)
    best = int(np.argmax(f1))
    return float(s[cuts.order[cuts.ends[best]]])


class _SortedPixels(NamedTuple):
    """Pixels sorted by decreasing score, cut at the end of every group of equal scores.

    Attributes:
        order: (P,) int64 pixel indices by decreasing score.
        ends: (T,) int64 position in ``order`` of the last pixel of each distinct score
            (distinct scores in decreasing order).
        tps: (T,) int64 anomalous pixels with score >= each distinct score.
        fps: (T,) int64 normal pixels with score >= each distinct score.
    """

    order: np.ndarray
    ends: np.ndarray
    tps: np.ndarray
    fps: np.ndarray


def _sort_pixels(y: np.ndarray, s: np.ndarray) -> _SortedPixels:
    """One sort of all pixel scores, shared by every pixel metric."""
    order = np.argsort(s, kind="stable")[::-1]
    sorted_scores = s[order]
    ends = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    ends = np.append(ends, s.size - 1)
    del sorted_scores
    tps = np.cumsum(y[order], dtype=np.int64)[ends]
    fps = ends + 1 - tps
    return _SortedPixels(order, ends, tps, fps)


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoidal area under y(x) (x in the given order)."""
    if x.size < 2:
        return 0.0
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


def trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under a curve with non-decreasing ``x`` from its start up to ``x = x_max``.

    When ``x_max`` is not one of the ``x`` values, ``y(x_max)`` is linearly interpolated
    between the last point before and the first point after it (MVTec AD convention).

    Args:
        x: (T,) non-decreasing abscissae, ``x[0] <= x_max``.
        y: (T,) ordinates.
        x_max: upper integration limit.

    Returns:
        The area (0 when fewer than two points lie up to ``x_max`` and none after it).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    inside = x <= x_max
    area = _trapezoid(x[inside], y[inside])
    after = np.flatnonzero(~inside)
    if after.size and inside.any() and not np.any(x == x_max):
        i = after[0]
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area


def _structure(ndim_masks: int, connectivity: int) -> np.ndarray:
    """Per-image labelling structure for an (N, H, W) stack: no links across images."""
    if connectivity == 8:
        plane = np.ones((3, 3), dtype=bool)
    elif connectivity == 4:
        plane = ndimage.generate_binary_structure(2, 1)
    else:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    if ndim_masks == 2:
        return plane
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = plane
    return structure


def label_regions(masks: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected GT regions of every mask, numbered across the whole stack.

    Args:
        masks: (N, H, W) bool ground truth.
        connectivity: 8 (MVTec AD evaluation, default) or 4.

    Returns:
        ``(labels, count)``: (N, H, W) int32 region ids (0 = normal pixel, regions of
        different images never share an id) and the number of regions.
    """
    masks = np.asarray(masks, dtype=bool)
    labels, count = ndimage.label(masks, structure=_structure(masks.ndim, connectivity))
    return labels.astype(np.int32, copy=False), int(count)


def _pro_curve_from_sorted(
    labels: np.ndarray, count: int, sorted_pixels: _SortedPixels
) -> ProCurve:
    """PRO curve from region labels and the shared pixel sort."""
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=count + 1).astype(np.float64)
    weight = np.zeros(count + 1, dtype=np.float64)
    weight[1:] = 1.0 / (sizes[1:] * count)
    pro = np.cumsum(weight[flat[sorted_pixels.order]])[sorted_pixels.ends]
    return _pro_curve_from_points(pro, sorted_pixels.fps, int(sizes[0]))


def _pro_curve_from_points(pro: np.ndarray, fps: np.ndarray, num_normal: int) -> ProCurve:
    """The curve from the (T,) summed region fractions and false positives per threshold."""
    fpr = fps / num_normal
    np.clip(pro, None, 1.0, out=pro)
    return ProCurve(
        fpr=np.concatenate(([0.0], fpr, [1.0])), pro=np.concatenate(([0.0], pro, [1.0]))
    )


def _check_pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated (N, H, W) bool masks and finite float maps of the same shape."""
    m = np.asarray(masks)
    a = _as_scores(maps, "maps")
    if m.shape != a.shape:
        raise ValueError(f"masks {m.shape} and maps {a.shape} differ in shape")
    if m.ndim == 2:
        m, a = m[None], a[None]
    if m.ndim != 3:
        raise ValueError(f"expected (N, H, W) masks and maps, got {m.shape}")
    return m != 0, a


def pro_curve(masks: np.ndarray, maps: np.ndarray, connectivity: int = 8) -> ProCurve:
    """Exact per-region-overlap curve over every distinct score (MVTec AD definition).

    At each threshold t (every distinct score, decreasing) pixels with score >= t are
    predicted anomalous; PRO(t) is the mean over all GT regions of all images of the
    predicted fraction of the region, FPR(t) the predicted fraction of all normal pixels.

    Args:
        masks: (N, H, W) bool ground truth; needs both anomalous and normal pixels.
        maps: (N, H, W) float anomaly maps.
        connectivity: region connectivity, 8 (default) or 4.

    Returns:
        The curve, with the (0, 0) and (1, 1) end points added.

    Raises:
        ValueError: when the masks hold no anomalous or no normal pixel.
    """
    m, a = _check_pixels(masks, maps)
    labels, count = label_regions(m, connectivity)
    if count == 0 or m.all():
        raise ValueError("the PRO curve needs both anomalous and normal pixels")
    y = m.ravel()
    return _pro_curve_from_sorted(labels, count, _sort_pixels(y, a.ravel()))


def aupro(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, connectivity: int = 8
) -> float:
    """Exact normalized area under the PRO curve up to an FPR limit (MVTec AD evaluation).

    Args:
        masks: (N, H, W) bool ground truth.
        maps: (N, H, W) float anomaly maps.
        fpr_limit: integration limit on the FPR axis (0.3 in the papers).
        connectivity: region connectivity, 8 (default) or 4.

    Returns:
        Area under PRO(FPR) for FPR in [0, fpr_limit] (PRO interpolated linearly at the
        limit) divided by ``fpr_limit``, in [0, 1]; ``nan`` without anomalous or normal pixels.
    """
    m, a = _check_pixels(masks, maps)
    labels, count = label_regions(m, connectivity)
    if count == 0 or m.all():
        return math.nan
    curve = _pro_curve_from_sorted(labels, count, _sort_pixels(m.ravel(), a.ravel()))
    return trapezoid_to(curve.fpr, curve.pro, fpr_limit) / fpr_limit


def aupro_200(
    masks: np.ndarray,
    maps: np.ndarray,
    fpr_limit: float = 0.3,
    steps: int = 200,
    connectivity: int = 8,
) -> float:
    """The reference release's AUPRO: a fixed threshold grid and a min-max normalized FPR axis.

    Thresholds are ``np.arange(min, max, (max - min) / steps)`` over all maps, computed in the
    maps' dtype exactly as the reference does (so usually ``steps`` values, occasionally one
    more through floating-point rounding). At each threshold t pixels with score > t are
    positive; PRO = mean over all regions of their positive fraction, FPR = positive normal
    pixels / normal pixels. Points with FPR < ``fpr_limit`` are kept, their FPRs min-max
    normalized to [0, 1], and the trapezoidal area of PRO over them is returned. This is not
    divided by the limit and not interpolated at it, so it differs from :func:`aupro`.

    Vectorized: each pixel's count of thresholds below its score comes from one
    ``searchsorted``; per-region histograms of those counts give every threshold at once.

    Args:
        masks: (N, H, W) bool ground truth.
        maps: (N, H, W) float anomaly maps.
        fpr_limit: keep thresholds whose FPR is below this.
        steps: number of threshold steps between the minimum and maximum score.
        connectivity: region connectivity, 8 (default, as ``skimage.measure.label``) or 4.

    Returns:
        The area in [0, 1]; ``nan`` when it is undefined (constant maps, no anomalous or no
        normal pixel, or fewer than two distinct kept FPR values).
    """
    m, a = _check_pixels(masks, maps)
    labels, count = label_regions(m, connectivity)
    if count == 0 or m.all():
        return math.nan
    return _aupro_200_from_labels(labels, count, a, fpr_limit, steps)


def _aupro_200_from_labels(
    labels: np.ndarray, count: int, maps: np.ndarray, fpr_limit: float, steps: int
) -> float:
    """:func:`aupro_200` on already labelled regions (``count >= 1`` and normal pixels)."""
    a = maps
    thresholds = _aupro_200_thresholds(a.min(), a.max(), steps)
    if thresholds is None:
        return math.nan
    bins = thresholds.size + 1
    # below[p] = number of thresholds t with t < score[p]: p is positive for t_0 .. t_{below-1}.
    below = np.searchsorted(thresholds, a.ravel(), side="left")
    flat = labels.ravel().astype(np.int64)
    hist = np.bincount(flat * bins + below, minlength=(count + 1) * bins).reshape(count + 1, bins)
    return _aupro_200_from_hist(hist, fpr_limit)


def _aupro_200_thresholds(low: np.generic, high: np.generic, steps: int) -> np.ndarray | None:
    """The reference's threshold grid between the maps' minimum and maximum (in their dtype).

    Returns:
        (K,) thresholds (K = ``steps``, occasionally one more), or None for constant maps.
    """
    step = (high - low) / steps
    if not step > 0:
        return None
    return np.arange(low, high, step)


def _aupro_200_from_hist(hist: np.ndarray, fpr_limit: float) -> float:
    """:func:`aupro_200` from the (R + 1, K + 1) int64 histogram of thresholds below each pixel.

    ``hist[r, k]``: pixels of region r (row 0: the normal pixels) with exactly k thresholds
    below their score.
    """
    # positives[r, k] = pixels of region r (0 = normal) with below > k, i.e. score > t_k.
    positives = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
    sizes = hist.sum(axis=1).astype(np.float64)
    fpr = positives[0] / sizes[0]
    pro = (positives[1:] / sizes[1:, None]).mean(axis=0)
    keep = fpr < fpr_limit
    fpr, pro = fpr[keep], pro[keep]
    if fpr.size < 2 or not fpr.max() > fpr.min():
        return math.nan
    fpr = (fpr - fpr.min()) / (fpr.max() - fpr.min())
    # FPR decreases as the threshold rises: integrate along increasing FPR.
    return _trapezoid(fpr[::-1], pro[::-1])


def pixel_metrics(
    masks: np.ndarray, maps: np.ndarray, pro_fpr_limit: float = 0.3
) -> dict[str, float]:
    """Pixel-level metrics over all pixels of all samples.

    One sort of all pixel scores serves AUROC, AP, F1-max and the exact AUPRO; AUROC and AP
    equal scikit-learn's ``roc_auc_score`` / ``average_precision_score`` (same
    distinct-threshold curves, same formulas) without their repeated sorts.

    Args:
        masks: (N, H, W) bool ground truth (non-zero = anomalous).
        maps: (N, H, W) float anomaly maps.
        pro_fpr_limit: FPR limit of both AUPRO variants.

    Returns:
        ``{"auroc", "ap", "f1_max", "aupro", "aupro_200"}`` as floats. When the masks hold
        no anomalous pixel (or no normal pixel) every value is ``nan``: the metrics are
        undefined, and the keys stay the same so per-category tables line up.

    Raises:
        ValueError: when shapes differ or the maps are not finite.
    """
    m, a = _check_pixels(masks, maps)
    y = m.ravel()
    positives = int(np.count_nonzero(y))
    if positives == 0 or positives == y.size:
        return {key: math.nan for key in PIXEL_KEYS}
    sorted_pixels = _sort_pixels(y, a.ravel())
    ranking = _ranking_metrics(sorted_pixels.tps, sorted_pixels.fps)
    labels, count = label_regions(m)
    curve = _pro_curve_from_sorted(labels, count, sorted_pixels)
    del sorted_pixels
    return {
        **ranking,
        "aupro": trapezoid_to(curve.fpr, curve.pro, pro_fpr_limit) / pro_fpr_limit,
        "aupro_200": _aupro_200_from_labels(labels, count, a, pro_fpr_limit, 200),
    }


def _ranking_metrics(tps: np.ndarray, fps: np.ndarray) -> dict[str, float]:
    """AUROC, AP and F1-max from the (T,) int64 cumulative counts at each distinct threshold.

    Args:
        tps: (T,) anomalous pixels with score >= each distinct score (decreasing scores).
        fps: (T,) normal pixels with score >= each distinct score.

    Returns:
        ``{"auroc", "ap", "f1_max"}``.
    """
    tpr = np.concatenate(([0], tps)) / tps[-1]
    fpr = np.concatenate(([0], fps)) / fps[-1]
    auroc = _trapezoid(fpr, tpr)
    del tpr, fpr
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    ap = float(np.sum(np.diff(np.concatenate(([0.0], recall))) * precision))
    return {"auroc": auroc, "ap": ap, "f1_max": _f1_max(precision, recall)}


class PixelMetricsAccumulator:
    """:func:`pixel_metrics` over samples added a block at a time, with the same results.

    Every value equals :func:`pixel_metrics` on all blocks stacked, to the last bit: the
    curves are built from the same integer counts at every distinct score, and the PRO sums
    run over the anomalous pixels in the same order as the stacked computation's (decreasing
    score, ties by decreasing position in the stack; the normal pixels it interleaves add
    exact zeros).

    Memory: O(T + D + R·K) for T distinct map values seen, D anomalous (ground-truth) pixels,
    R ground-truth regions and K = 201 thresholds of the 200-step AUPRO, plus one block at a
    time; never the N·H·W pixels of the line. Per distinct value 12 bytes are kept (the value
    and an int64 count), per anomalous pixel 8 (its score and region), and :meth:`result`
    needs about 40 bytes per distinct value more while it runs. T is at most the number of
    pixels, and at most the float32 values in the maps' range however large N grows.

    Example::

        acc = PixelMetricsAccumulator()
        for masks, maps in blocks:  # (B, H, W) each, in sample order
            acc.add(masks, maps)
        metrics = acc.result()  # == pixel_metrics(all masks, all maps)
    """

    def __init__(self, pro_fpr_limit: float = 0.3, connectivity: int = 8) -> None:
        """Start with no pixel.

        Args:
            pro_fpr_limit: FPR limit of both AUPRO variants.
            connectivity: ground-truth region connectivity, 8 (as :func:`pixel_metrics`) or 4.
        """
        self.pro_fpr_limit = pro_fpr_limit
        self.connectivity = connectivity
        self._values: np.ndarray | None = None
        self._counts = np.zeros(0, dtype=np.int64)
        self._defect_scores: list[np.ndarray] = []
        self._defect_regions: list[np.ndarray] = []
        self._region_sizes: list[np.ndarray] = []
        self._regions = 0
        self._pixels = 0

    def add(self, masks: np.ndarray, maps: np.ndarray) -> None:
        """Add the next samples (in the order of the stack they stand for).

        Args:
            masks: (B, H, W) or (H, W) bool ground truth (non-zero = anomalous).
            maps: (B, H, W) or (H, W) float anomaly maps, the dtype of the earlier blocks.

        Raises:
            ValueError: when shapes differ, the maps are not finite or change dtype.
        """
        m, a = _check_pixels(masks, maps)
        if self._values is not None and a.dtype != self._values.dtype:
            raise ValueError(f"maps changed dtype from {self._values.dtype} to {a.dtype}")
        values, counts = np.unique(a, return_counts=True)
        self._merge(values, counts.astype(np.int64))
        labels, count = label_regions(m, self.connectivity)
        flat = labels.ravel()
        inside = np.flatnonzero(flat)
        self._defect_scores.append(a.ravel()[inside])
        self._defect_regions.append(flat[inside].astype(np.int64) + self._regions)
        self._region_sizes.append(np.bincount(flat, minlength=count + 1)[1:])
        self._regions += count
        self._pixels += a.size

    def _merge(self, values: np.ndarray, counts: np.ndarray) -> None:
        """Fold a block's sorted distinct values and their counts into the line's."""
        if self._values is None:
            self._values, self._counts = values, counts
            return
        old = self._values
        at = np.searchsorted(old, values)
        known = at < old.size
        known[known] = old[at[known]] == values[known]
        self._counts[at[known]] += counts[known]
        fresh = ~known
        self._values = np.insert(old, at[fresh], values[fresh])
        self._counts = np.insert(self._counts, at[fresh], counts[fresh])

    def result(self) -> dict[str, float]:
        """The metrics of every pixel added so far.

        Returns:
            What :func:`pixel_metrics` returns on all added blocks stacked: ``{"auroc", "ap",
            "f1_max", "aupro", "aupro_200"}``, every value ``nan`` without anomalous or
            without normal pixels.
        """
        scores = np.concatenate(self._defect_scores) if self._defect_scores else np.zeros(0)
        positives = scores.size
        if self._values is None or positives == 0 or positives == self._pixels:
            return {key: math.nan for key in PIXEL_KEYS}
        values, counts = self._values, self._counts
        regions = np.concatenate(self._defect_regions)
        # Distinct scores rise with the index; the curves run from the highest score down.
        at = np.searchsorted(values, scores)
        defects = np.bincount(at, minlength=values.size)
        del at
        aupro_200 = self._aupro_200(values, counts - defects, scores, regions)
        tps = np.cumsum(defects[::-1])
        del defects
        fps = np.cumsum(counts[::-1]) - tps
        sizes = np.concatenate(([self._pixels - positives], *self._region_sizes))
        weight = np.zeros(self._regions + 1, dtype=np.float64)
        weight[1:] = 1.0 / (sizes[1:].astype(np.float64) * self._regions)
        running = np.cumsum(weight[regions[np.argsort(scores, kind="stable")[::-1]]])
        pro = np.zeros(tps.size, dtype=np.float64)
        reached = tps > 0
        pro[reached] = running[tps[reached] - 1]
        del running, reached
        curve = _pro_curve_from_points(pro, fps, int(sizes[0]))
        limit = self.pro_fpr_limit
        return {
            **_ranking_metrics(tps, fps),
            "aupro": trapezoid_to(curve.fpr, curve.pro, limit) / limit,
            "aupro_200": aupro_200,
        }

    def _aupro_200(
        self, values: np.ndarray, normal: np.ndarray, scores: np.ndarray, regions: np.ndarray
    ) -> float:
        """The 200-step AUPRO from the distinct values, their normal counts and the defects.

        Args:
            values: (T,) sorted distinct scores of every pixel.
            normal: (T,) normal pixels at each distinct score.
            scores: (D,) scores of the anomalous pixels.
            regions: (D,) their region ids (1 .. R).
        """
        thresholds = _aupro_200_thresholds(values[0], values[-1], 200)
        if thresholds is None:
            return math.nan
        bins = thresholds.size + 1
        below = np.searchsorted(thresholds, scores, side="left")
        hist = np.bincount(
            regions * bins + below, minlength=(self._regions + 1) * bins
        ).reshape(self._regions + 1, bins)
        normal_below = np.searchsorted(thresholds, values, side="left")
        hist[0] = np.bincount(normal_below, weights=normal, minlength=bins).astype(np.int64)
        return _aupro_200_from_hist(hist, self.pro_fpr_limit)


def summarize(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per-category metrics plus their mean over categories.

    Args:
        per_category: ``{category: {metric: value}}``.

    Returns:
        A new dict with every category (same order) and a ``"mean"`` entry holding, for every
        metric key seen, the mean over the categories that report it with a non-nan value
        (``nan`` when none does).

    Raises:
        ValueError: when a category is itself called ``"mean"``.
    """
    if "mean" in per_category:
        raise ValueError("a category named 'mean' would be overwritten by the summary")
    out: dict[str, dict[str, float]] = {k: dict(v) for k, v in per_category.items()}
    keys: list[str] = []
    for metrics in per_category.values():
        keys += [key for key in metrics if key not in keys]
    mean: dict[str, float] = {}
    for key in keys:
        values = [
            float(m[key]) for m in per_category.values() if key in m and not math.isnan(m[key])
        ]
        mean[key] = float(np.mean(values)) if values else math.nan
    out["mean"] = mean
    return out
