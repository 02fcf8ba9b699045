"""Detection and segmentation metrics (docs/method.md, *Metrics*).

Image AUROC/AP/F1-max (and the threshold at the F1 maximum), pixel AUROC/AP/F1-max, and
AUPRO up to an FPR limit (the exact MVTec-style one and the reference release's 200-threshold
variant). :class:`PixelMetricsStream` gives the same pixel metrics from a line read a block of
samples at a time, in memory that does not grow with the number of samples.

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
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple, Protocol

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


class Terms(Protocol):
    """Where a streamed metric keeps the terms of a sum until it knows how many there are.

    :class:`MemoryTerms` keeps them in memory; a caller with a disk can pass a store that
    writes them to a file, so that memory stays bounded (:class:`PixelMetricsStream`).
    """

    def append(self, terms: np.ndarray) -> None:
        """Add (K,) float64 terms after the ones already kept."""

    def __len__(self) -> int:
        """How many terms are kept."""

    def read(self, start: int, stop: int) -> np.ndarray:
        """(stop - start,) float64 terms ``start`` to ``stop`` (a fresh contiguous array)."""


class MemoryTerms:
    """Terms of a sum kept in memory (8 bytes each)."""

    def __init__(self) -> None:
        """Start empty."""
        self._parts: list[np.ndarray] = []
        self._size = 0

    def append(self, terms: np.ndarray) -> None:
        """Add (K,) float64 terms after the ones already kept."""
        self._parts.append(np.array(terms, dtype=np.float64).ravel())
        self._size += self._parts[-1].size

    def __len__(self) -> int:
        """How many terms are kept."""
        return self._size

    def read(self, start: int, stop: int) -> np.ndarray:
        """(stop - start,) float64 terms ``start`` to ``stop``."""
        if len(self._parts) > 1:
            self._parts = [np.concatenate(self._parts)]
        whole = self._parts[0] if self._parts else np.zeros(0)
        return np.array(whole[start:stop])


#: NumPy's pairwise summation sums blocks of at most this many terms without splitting them.
_PAIRWISE_BLOCK = 128


def pairwise_sum(terms: Terms, leaf: int = 1 << 20) -> float:
    """``np.sum`` of every kept term, bit for bit, reading at most ``leaf`` terms at a time.

    NumPy sums a contiguous float64 array by splitting it in two halves (the first half's
    length rounded down to a multiple of 8) until at most 128 terms remain. Following those
    splits down to pieces of at most ``leaf`` terms and letting NumPy sum each piece gives its
    result for the whole array without holding it (``test_pairwise_sum_is_numpys_sum``
    checks this against the installed NumPy).

    Args:
        terms: the terms, in order.
        leaf: the most terms read at once (at least 128).

    Returns:
        The sum as a float (0.0 without terms).
    """
    leaf = max(leaf, _PAIRWISE_BLOCK)

    def part(start: int, stop: int) -> np.float64:
        size = stop - start
        if size <= leaf:
            return np.add.reduce(terms.read(start, stop))
        half = size // 2
        half -= half % 8
        return part(start, start + half) + part(start + half, stop)

    return float(part(0, len(terms))) if len(terms) else 0.0


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoidal area under y(x) (x in the given order)."""
    if x.size < 2:
        return 0.0
    return float(np.sum(_trapezoid_terms(x, y)))


def _trapezoid_terms(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(T - 1,) trapezoid areas between consecutive points of (T,) x and y."""
    return 0.5 * (y[1:] + y[:-1]) * np.diff(x)


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


class PixelMetricsStream:
    """:func:`pixel_metrics` of a line read a block of samples at a time, with equal results.

    The line's pixels are never held at once. Pass 1 (:meth:`add`, every block in sample
    order) keeps the anomalous pixels (score and region), the region sizes, the extremes and a
    histogram of the scores over 65,536 buckets of their bit patterns. The distinct scores are
    then visited from the highest down in :attr:`passes_left` value passes (:meth:`add_values`
    on every block's maps, any order, then :meth:`end_pass`), each covering consecutive
    buckets that hold at most ``max_values`` distinct scores (one bucket of float32 scores
    holds at most 65,536). A pass builds the exact count of pixels at each distinct score in
    its range and extends the curves of every metric from there.

    The values equal :func:`pixel_metrics` on the stacked blocks to the last bit: the curves
    are built from the same integer counts at each distinct score, the PRO sums run over the
    anomalous pixels in the same order (decreasing score, ties by decreasing position in the
    stack: the stacked computation's normal pixels only add exact zeros), and every area is
    NumPy's sum of the same trapezoids (:func:`pairwise_sum` over the terms, kept in
    ``terms`` stores until their number is known).

    Memory, independent of the number of samples N for a given defect area: 20 bytes per
    anomalous pixel, 201 int64 per ground-truth region, the 512 KiB histogram, the block being
    read, and per pass up to about 100 bytes per distinct score gathered while the pending
    ones are merged (at most 2 · ``max_values`` + one block's, so O(``max_values``) for
    float32 maps; float64 maps can put more distinct scores in one bucket); the curve points
    are computed 262,144 scores at a time. The sums' terms, 8 bytes per distinct score for
    the ROC and the precision-recall curves each and per distinct score up to the FPR limit
    for the PRO curve, are in the ``terms`` stores: in memory with the default
    :class:`MemoryTerms` (O(distinct scores)), on disk with a file-backed store.

    Example::

        stream = PixelMetricsStream()
        for masks, maps in blocks():  # (B, H, W) each, in sample order
            stream.add(masks, maps)
        while stream.passes_left:
            for _, maps in blocks():
                stream.add_values(maps)
            stream.end_pass()
        metrics = stream.result()  # == pixel_metrics(all masks, all maps)
    """

    _BUCKET_BITS = 16
    _SLICE = 1 << 18  # distinct scores whose curve points are computed together

    def __init__(
        self,
        pro_fpr_limit: float = 0.3,
        connectivity: int = 8,
        max_values: int = 1 << 20,
        terms: Callable[[], Terms] = MemoryTerms,
    ) -> None:
        """Start with no pixel.

        Args:
            pro_fpr_limit: FPR limit of both AUPRO variants.
            connectivity: ground-truth region connectivity, 8 (as :func:`pixel_metrics`) or 4.
            max_values: distinct scores one value pass may gather (the pass's memory).
            terms: makes an empty store for the terms of one sum (called three times).

        Raises:
            ValueError: when ``max_values`` is below 1.
        """
        if max_values < 1:
            raise ValueError(f"max_values must be >= 1, got {max_values}")
        self.pro_fpr_limit = pro_fpr_limit
        self.connectivity = connectivity
        self.max_values = max_values
        self._terms = terms
        self._dtype: np.dtype | None = None
        self._low: np.generic | None = None
        self._high: np.generic | None = None
        self._buckets = np.zeros(1 << self._BUCKET_BITS, dtype=np.int64)
        self._scores: list[np.ndarray] = []
        self._regions: list[np.ndarray] = []
        self._sizes: list[np.ndarray] = []
        self._region_count = 0
        self._pixels = 0
        self._passes: list[tuple[int, int]] | None = None
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    # -- pass 1 ------------------------------------------------------------------------------

    def add(self, masks: np.ndarray, maps: np.ndarray) -> None:
        """Pass 1: add the next samples, in the order of the stack they stand for.

        Args:
            masks: (B, H, W) or (H, W) bool ground truth (non-zero = anomalous).
            maps: (B, H, W) or (H, W) float anomaly maps, the dtype of the earlier blocks.

        Raises:
            ValueError: when shapes differ, the maps are not finite or change dtype, or the
                value passes have begun.
        """
        if self._passes is not None:
            raise ValueError("pass 1 is over: the value passes have begun")
        m, a = self._check(masks, maps)
        low, high = a.min(), a.max()
        self._low = low if self._low is None else min(self._low, low)
        self._high = high if self._high is None else max(self._high, high)
        self._buckets += np.bincount(self._bucket(a).ravel(), minlength=self._buckets.size)
        labels, count = label_regions(m, self.connectivity)
        flat = labels.ravel()
        inside = np.flatnonzero(flat)
        self._scores.append(a.ravel()[inside])
        self._regions.append((flat[inside] + self._region_count).astype(np.int32))
        self._sizes.append(np.bincount(flat, minlength=count + 1)[1:])
        self._region_count += count
        self._pixels += a.size

    def _check(self, masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Validated masks and maps of this stream's dtype."""
        m, a = _check_pixels(masks, maps)
        if self._dtype is None:
            self._dtype = a.dtype
        elif a.dtype != self._dtype:
            raise ValueError(f"maps changed dtype from {self._dtype} to {a.dtype}")
        return m, a

    def _bucket(self, maps: np.ndarray) -> np.ndarray:
        """Bucket of each score: the top bits of an order-preserving unsigned key."""
        canonical = maps + maps.dtype.type(0)  # -0.0 becomes 0.0: one key for equal scores
        unsigned = np.uint32 if maps.dtype.itemsize == 4 else np.uint64
        bits = canonical.view(unsigned)
        sign = unsigned(1) << unsigned(8 * maps.dtype.itemsize - 1)
        key = np.where(bits & sign, ~bits, bits | sign)
        return (key >> unsigned(8 * maps.dtype.itemsize - self._BUCKET_BITS)).astype(np.int64)

    # -- value passes ------------------------------------------------------------------------

    @property
    def passes_left(self) -> int:
        """Value passes still to make (pass 1 ends at the first call)."""
        if self._passes is None:
            self._begin_passes()
        assert self._passes is not None
        return len(self._passes)

    def _degenerate(self) -> bool:
        """No anomalous or no normal pixel: every metric is nan."""
        positives = sum(s.size for s in self._scores)
        return positives == 0 or positives == self._pixels

    def _begin_passes(self) -> None:
        """End pass 1: the PRO sums, the regions' 200-step histogram and the passes' ranges."""
        self._passes = []
        if self._degenerate():
            return
        scores = np.concatenate(self._scores)
        regions = np.concatenate(self._regions)
        self._scores, self._regions = [scores], [regions]
        sizes = np.concatenate(self._sizes).astype(np.float64)
        weight = np.zeros(self._region_count + 1, dtype=np.float64)
        weight[1:] = 1.0 / (sizes * self._region_count)
        self._running = np.cumsum(weight[regions[np.argsort(scores, kind="stable")[::-1]]])
        self._defect_buckets = self._bucket(scores).astype(np.uint16)
        self._normal = self._pixels - scores.size
        self._thresholds = _aupro_200_thresholds(self._low, self._high, 200)
        if self._thresholds is not None:
            bins = self._thresholds.size + 1
            below = np.searchsorted(self._thresholds, scores, side="left")
            self._hist = np.bincount(
                regions.astype(np.int64) * bins + below, minlength=(self._region_count + 1) * bins
            ).reshape(self._region_count + 1, bins)
        per_value = 1 << (8 * self._dtype.itemsize - self._BUCKET_BITS)
        bound = np.minimum(self._buckets, per_value)
        top = self._buckets.size - 1
        while top >= 0:
            if bound[top] == 0:
                top -= 1
                continue
            bottom, gathered = top, 0
            while bottom >= 0 and gathered + bound[bottom] <= self.max_values or bottom == top:
                gathered += bound[bottom]
                bottom -= 1
            self._passes.append((bottom + 1, top))
            top = bottom
        self._curve = _StreamedCurves(
            scores.size, self._normal, self.pro_fpr_limit, self._terms
        )

    def add_values(self, maps: np.ndarray) -> None:
        """Add one block's maps to the current value pass (blocks in any order, each once).

        Args:
            maps: float map values of any shape: (B, H, W) maps, or their pixels flattened
                (only the values count here, not where they are).

        Raises:
            ValueError: when no value pass is left, or the maps are not finite or of
                another dtype than pass 1's.
        """
        if not self.passes_left:
            raise ValueError("no value pass is left")
        assert self._passes is not None
        a = _as_scores(maps, "maps")
        if a.dtype != self._dtype:
            raise ValueError(f"maps changed dtype from {self._dtype} to {a.dtype}")
        bottom, top = self._passes[0]
        bucket = self._bucket(a)
        values, counts = np.unique(a[(bucket >= bottom) & (bucket <= top)], return_counts=True)
        self._pending.append((values, counts.astype(np.int64)))
        self._pending_size += values.size
        if self._pending_size > 2 * self.max_values:
            self._compact()

    def _compact(self) -> None:
        """Merge the pending distinct scores of the pass into one sorted, counted list."""
        if not self._pending:
            self._pending = [(np.zeros(0, dtype=self._dtype), np.zeros(0, dtype=np.int64))]
            return
        values = np.concatenate([v for v, _ in self._pending])
        counts = np.concatenate([c for _, c in self._pending])
        order = np.argsort(values, kind="stable")
        values, counts = values[order], counts[order]
        del order
        starts = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))
        self._pending = [(values[starts], np.add.reduceat(counts, starts))]
        self._pending_size = starts.size

    def end_pass(self) -> None:
        """Close the current value pass: its distinct scores extend every curve.

        Raises:
            ValueError: when no value pass is left.
        """
        if not self.passes_left:
            raise ValueError("no value pass is left")
        assert self._passes is not None
        bottom, top = self._passes.pop(0)
        self._compact()
        values, counts = self._pending[0]
        self._pending, self._pending_size = [], 0
        scores = self._scores[0]
        mine = (self._defect_buckets >= bottom) & (self._defect_buckets <= top)
        defects = np.bincount(np.searchsorted(values, scores[mine]), minlength=values.size)
        normal = counts
        normal -= defects
        del counts, mine
        for stop in range(values.size, 0, -self._SLICE):  # highest scores first
            part = slice(max(stop - self._SLICE, 0), stop)
            if self._thresholds is not None:
                below = np.searchsorted(self._thresholds, values[part], side="left")
                bins = self._thresholds.size + 1
                hist = np.bincount(below, weights=normal[part], minlength=bins)
                self._hist[0] += hist.astype(np.int64)
            self._curve.extend(defects[part][::-1], normal[part][::-1], self._running)

    def result(self) -> dict[str, float]:
        """The metrics of every pixel added.

        Returns:
            What :func:`pixel_metrics` returns on all blocks stacked: ``{"auroc", "ap",
            "f1_max", "aupro", "aupro_200"}``, every value ``nan`` without anomalous or
            without normal pixels.

        Raises:
            ValueError: while value passes are left.
        """
        if self.passes_left:
            raise ValueError(f"{self.passes_left} value passes are left")
        if self._dtype is None or self._degenerate():
            return {key: math.nan for key in PIXEL_KEYS}
        aupro_200 = math.nan
        if self._thresholds is not None:
            aupro_200 = _aupro_200_from_hist(self._hist, self.pro_fpr_limit)
        return {**self._curve.result(), "aupro_200": aupro_200}


class _StreamedCurves:
    """ROC, precision-recall and PRO curves extended a run of distinct scores at a time.

    The points and trapezoids are those of :func:`pixel_metrics` (same float operations on
    the same counts); the areas are their terms' :func:`pairwise_sum`.
    """

    def __init__(
        self, positives: int, normal: int, pro_fpr_limit: float, terms: Callable[[], Terms]
    ) -> None:
        self.positives = positives
        self.normal = normal
        self.limit = pro_fpr_limit
        self.tps = 0
        self.fps = 0
        self.roc_last = (0.0, 0.0)
        self.roc = terms()
        self.recall_last = 0.0
        self.ap = terms()
        self.f1 = -math.inf
        self.pro_last = (0.0, 0.0)
        self.pro = terms()
        self.pro_points = 1
        self.pro_hits_limit = 0.0 == pro_fpr_limit
        self.pro_after: tuple[float, float, float, float] | None = None
        self.pro_inside = 0.0 <= pro_fpr_limit

    def extend(self, defects: np.ndarray, normal: np.ndarray, running: np.ndarray) -> None:
        """The next distinct scores, from the highest down.

        Args:
            defects: (T,) anomalous pixels at each distinct score.
            normal: (T,) normal pixels at each.
            running: (D,) PRO sum after each anomalous pixel, in the curve's order.
        """
        tps = self.tps + np.cumsum(defects)
        fps = self.fps + np.cumsum(normal)
        if tps.size == 0:
            return
        self.tps, self.fps = int(tps[-1]), int(fps[-1])
        tpr, fpr = tps / self.positives, fps / self.normal
        x = np.concatenate(([self.roc_last[0]], fpr))
        y = np.concatenate(([self.roc_last[1]], tpr))
        self.roc.append(_trapezoid_terms(x, y))
        self.roc_last = (float(fpr[-1]), float(tpr[-1]))
        del x, y, tpr
        precision = tps / (tps + fps)
        recall = tps / self.positives
        self.ap.append(np.diff(np.concatenate(([self.recall_last], recall))) * precision)
        self.recall_last = float(recall[-1])
        self.f1 = max(self.f1, _f1_max(precision, recall))
        del precision, recall
        pro = np.zeros(tps.size, dtype=np.float64)
        reached = tps > 0
        pro[reached] = running[tps[reached] - 1]
        np.clip(pro, None, 1.0, out=pro)
        self._extend_pro(fps / self.normal, pro)

    def _extend_pro(self, fpr: np.ndarray, pro: np.ndarray) -> None:
        """PRO points up to the FPR limit, and the first one past it (interpolated there)."""
        if self.pro_after is not None or not self.pro_inside:
            return
        inside = int(np.searchsorted(fpr, self.limit, side="right"))
        x = np.concatenate(([self.pro_last[0]], fpr[:inside]))
        y = np.concatenate(([self.pro_last[1]], pro[:inside]))
        self.pro.append(_trapezoid_terms(x, y))
        self.pro_points += inside
        self.pro_hits_limit = self.pro_hits_limit or bool(np.any(fpr[:inside] == self.limit))
        self.pro_last = (float(x[-1]), float(y[-1]))
        if inside < fpr.size:
            self.pro_after = (*self.pro_last, float(fpr[inside]), float(pro[inside]))

    def result(self) -> dict[str, float]:
        """AUROC, AP, F1-max and the exact AUPRO (the curve's end point added)."""
        self._extend_pro(np.array([1.0]), np.array([1.0]))
        area = pairwise_sum(self.pro) if self.pro_points >= 2 else 0.0
        if self.pro_after is not None and not self.pro_hits_limit:
            x0, y0, x1, y1 = self.pro_after
            y_at = y0 + (y1 - y0) * (self.limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_at) * (self.limit - x0)
        return {
            "auroc": pairwise_sum(self.roc),
            "ap": pairwise_sum(self.ap),
            "f1_max": self.f1,
            "aupro": area / self.limit,
        }


def pixel_metrics_of_blocks(
    blocks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    pro_fpr_limit: float = 0.3,
    max_values: int = 1 << 20,
    terms: Callable[[], Terms] = MemoryTerms,
) -> dict[str, float]:
    """:func:`pixel_metrics` of a line given as blocks of samples, read once per pass.

    Args:
        blocks: gives a fresh iterator over the line's ``(masks, maps)`` blocks, (B, H, W)
            each, in sample order, on every call (once for pass 1, once per value pass).
        pro_fpr_limit: FPR limit of both AUPRO variants.
        max_values: distinct scores per value pass (see :class:`PixelMetricsStream`).
        terms: makes an empty store for the terms of one sum.

    Returns:
        The values of :func:`pixel_metrics` on the stacked blocks, bit for bit.
    """
    stream = PixelMetricsStream(pro_fpr_limit, max_values=max_values, terms=terms)
    for masks, maps in blocks():
        stream.add(masks, maps)
    while stream.passes_left:
        for _, maps in blocks():
            stream.add_values(maps)
        stream.end_pass()
    return stream.result()


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
