"""Metrics against scikit-learn, hand-computed PRO curves and literal loop implementations."""

import math
from collections import deque

import numpy as np
import pytest
from sklearn.metrics import auc, average_precision_score, roc_auc_score

from musc_core.metrics import (
    MemoryTerms,
    PixelMetricsStream,
    aupro,
    aupro_200,
    image_metrics,
    pairwise_sum,
    pixel_metrics,
    pixel_metrics_of_blocks,
    pro_curve,
    summarize,
    trapezoid_to,
)

# ------------------------------------------------------------------------------------------
# brute-force twins


def brute_f1_max(labels, scores):
    """Sweep every distinct score as a threshold (>=), compute P, R, F1 literally."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores).ravel()
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & labels)
        fp = np.sum(pred & ~labels)
        fn = np.sum(~pred & labels)
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        best = max(best, f1)
    return best


def flood_fill_regions(mask):
    """Connected components of one 2D mask by breadth-first search (8 neighbours)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for y in range(h):
        for x in range(w):
            if not mask[y, x] or seen[y, x]:
                continue
            region = np.zeros_like(mask, dtype=bool)
            queue = deque([(y, x)])
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                region[cy, cx] = True
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
            regions.append(region)
    return regions


def all_regions(masks):
    return [(i, r) for i, m in enumerate(masks) for r in flood_fill_regions(m)]


def pro_and_fpr(masks, pred, regions):
    normal = ~masks
    pro = np.mean([pred[i][r].sum() / r.sum() for i, r in regions])
    fpr = (pred & normal).sum() / normal.sum()
    return fpr, pro


def brute_aupro(masks, maps, limit=0.3):
    """Every distinct threshold (>=), PRO/FPR literally, trapezoid cut at the limit."""
    regions = all_regions(masks)
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        points.append(pro_and_fpr(masks, maps >= t, regions))
    points.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < limit:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_limit) / 2
            break
        else:
            break
    return area / limit


def brute_aupro_200(masks, maps, limit=0.3, steps=200):
    """The reference's loop: arange thresholds, score > t, keep FPR < limit, min-max FPR."""
    regions = all_regions(masks)
    low, high = maps.min(), maps.max()
    fprs, pros = [], []
    for t in np.arange(low, high, (high - low) / steps):
        fpr, pro = pro_and_fpr(masks, maps > t, regions)
        fprs.append(fpr)
        pros.append(pro)
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < limit
    fprs, pros = fprs[keep], pros[keep]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return auc(fprs, pros)


def random_pixels(seed, n=5, h=9, w=11, levels=None):
    rng = np.random.default_rng(seed)
    masks = rng.random((n, h, w)) < 0.15
    masks[0] = False  # one image without any defect
    maps = rng.random((n, h, w)) + 0.6 * masks
    if levels:
        maps = np.round(maps * levels) / levels  # ties between normal and anomalous pixels
    return masks, maps.astype(np.float32)


# ------------------------------------------------------------------------------------------
# image metrics


@pytest.mark.parametrize("seed", range(4))
def test_image_metrics_match_sklearn_and_brute_force_f1(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.4
    scores = rng.random(60) + 0.5 * labels
    if seed % 2:
        scores = np.round(scores * 5) / 5  # ties
    got = image_metrics(labels.astype(int), scores)
    assert got["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert got["f1_max"] == pytest.approx(brute_f1_max(labels, scores), abs=1e-12)


def test_image_metrics_one_class_is_nan_without_crashing():
    got = image_metrics(np.zeros(5, dtype=int), np.arange(5.0))
    assert set(got) == {"auroc", "ap", "f1_max"}
    assert all(math.isnan(v) for v in got.values())


def test_image_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="labels"):
        image_metrics(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="NaN"):
        image_metrics(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="length"):
        image_metrics(np.array([0, 1, 1]), np.array([0.1, 0.2]))


# ------------------------------------------------------------------------------------------
# pixel AUROC / AP / F1


@pytest.mark.parametrize("levels", [None, 7])
def test_pixel_auroc_ap_f1_match_sklearn_and_brute_force(levels):
    masks, maps = random_pixels(1, levels=levels)
    got = pixel_metrics(masks, maps)
    y, s = masks.ravel(), maps.ravel()
    assert got["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-10)
    assert got["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-10)
    assert got["f1_max"] == pytest.approx(brute_f1_max(y, s), abs=1e-10)


# ------------------------------------------------------------------------------------------
# exact AUPRO


def test_exact_aupro_on_a_hand_computed_curve():
    # One 4x4 image, one 2x2 defect region (top-left), 12 normal pixels.
    # Region scores: 0.9, 0.8, 0.6, 0.1.  Normal scores: 0.95, 0.7, 0.65, 0.6, 0.55, ... 0.05.
    # Thresholds from the top (pixels with score >= t are positive):
    #   t=0.95: FP=1 -> (FPR, PRO) = (1/12, 0)
    #   t=0.90: region 1/4      -> (1/12, 0.25)
    #   t=0.80: region 2/4      -> (1/12, 0.50)
    #   t=0.70: FP=2            -> (2/12, 0.50)
    #   t=0.65: FP=3            -> (3/12, 0.50)
    #   t=0.60: FP=4, region 3/4 (tie) -> (4/12, 0.75)   [crosses FPR 0.3 = 3.6/12]
    # Area to 0.3: 0 on [0, 1/12]; 0.5 * 2/12 on [1/12, 3/12]; on [3/12, 3.6/12] PRO goes
    # 0.5 -> 0.5 + 0.25 * 0.6 = 0.65, trapezoid 0.6/12 * 0.575 = 0.345/12.
    # Total (1 + 0.345)/12, normalized by 0.3: 1.345 / 3.6.
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True
    scores = np.zeros((4, 4))
    scores[mask] = [0.9, 0.8, 0.6, 0.1]
    scores[~mask] = [0.95, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.2, 0.15, 0.05]
    expected = 1.345 / 3.6
    assert aupro(mask[None], scores[None]) == pytest.approx(expected, abs=1e-12)
    assert pixel_metrics(mask[None], scores[None])["aupro"] == pytest.approx(expected, abs=1e-12)
    assert brute_aupro(mask[None], scores[None]) == pytest.approx(expected, abs=1e-12)
    curve = pro_curve(mask[None], scores[None])
    np.testing.assert_allclose(curve.fpr[:7], [0, 1 / 12, 1 / 12, 1 / 12, 2 / 12, 3 / 12, 4 / 12])
    np.testing.assert_allclose(curve.pro[:7], [0, 0, 0.25, 0.5, 0.5, 0.5, 0.75])
    assert curve.fpr[-1] == 1.0 and curve.pro[-1] == 1.0


@pytest.mark.parametrize("seed,levels", [(0, None), (1, 5), (2, 9), (3, None)])
def test_exact_aupro_matches_brute_force(seed, levels):
    masks, maps = random_pixels(seed, levels=levels)
    expected = brute_aupro(masks, maps.astype(np.float64))
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-9)
    assert pixel_metrics(masks, maps)["aupro"] == pytest.approx(expected, abs=1e-9)
    for limit in (0.05, 0.5):
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(
            brute_aupro(masks, maps.astype(np.float64), limit), abs=1e-9
        )


def test_regions_use_8_connectivity_like_the_mvtec_evaluation():
    # (0,0)-(0,1) horizontal pair and (1,2) touching (0,1) only diagonally.
    mask = np.zeros((1, 4, 4), dtype=bool)
    mask[0, 0, 0] = mask[0, 0, 1] = mask[0, 1, 2] = True
    scores = np.zeros((1, 4, 4))
    scores[0, 1, 2] = 1.0  # only the diagonal pixel is found at the top threshold
    # 8-connectivity: one region of 3 pixels -> PRO 1/3; 4-connectivity: mean(0, 1) = 0.5.
    assert pro_curve(mask, scores).pro[1] == pytest.approx(1 / 3)
    assert pro_curve(mask, scores, connectivity=4).pro[1] == pytest.approx(0.5)


def test_trapezoid_to_interpolates_only_when_the_limit_is_not_a_point():
    x = np.array([0.0, 0.2, 0.4])
    y = np.array([0.0, 1.0, 1.0])
    assert trapezoid_to(x, y, 0.3) == pytest.approx(0.1 + 0.1)
    assert trapezoid_to(x, y, 0.2) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------
# 200-threshold AUPRO


@pytest.mark.parametrize("seed,levels", [(0, None), (1, 5), (4, None), (5, 13)])
def test_aupro_200_matches_the_literal_loop(seed, levels):
    masks, maps = random_pixels(seed, levels=levels)
    expected = brute_aupro_200(masks, maps)
    assert aupro_200(masks, maps) == pytest.approx(expected, abs=1e-9)
    assert pixel_metrics(masks, maps)["aupro_200"] == pytest.approx(expected, abs=1e-9)
    assert aupro_200(masks, maps, steps=37) == pytest.approx(
        brute_aupro_200(masks, maps, steps=37), abs=1e-9
    )


@pytest.mark.parametrize("steps", [8, 4, 3, 16])
def test_aupro_200_on_a_coarse_grid_with_scores_equal_to_thresholds(steps):
    # Integer scores 0..8: with steps=8 the thresholds are exactly 0, 1, ..., 7, so every
    # pixel ties with a threshold and "score > t" (not ">=") decides; few points, so every
    # point of the curve moves the area.
    rng = np.random.default_rng(7)
    masks = rng.random((4, 8, 8)) < 0.3
    maps = np.clip(rng.integers(0, 7, size=masks.shape) + 2 * masks, 0, 8).astype(np.float64)
    maps.flat[0], maps.flat[1] = 0.0, 8.0
    expected = brute_aupro_200(masks, maps, limit=0.6, steps=steps)
    assert aupro_200(masks, maps, fpr_limit=0.6, steps=steps) == pytest.approx(expected, abs=1e-12)
    # A limit equal to an FPR that occurs on the grid: that point is left out (FPR < limit).
    hit = ((maps > 1.0) & ~masks).sum() / (~masks).sum()
    expected = brute_aupro_200(masks, maps, limit=hit, steps=8)
    assert aupro_200(masks, maps, fpr_limit=hit, steps=8) == pytest.approx(expected, abs=1e-12)


def test_perfect_maps_score_one():
    masks, _ = random_pixels(2)
    maps = masks.astype(np.float32) + 0.01
    got = pixel_metrics(masks, maps)
    assert got["auroc"] == pytest.approx(1.0)
    assert got["ap"] == pytest.approx(1.0)
    assert got["f1_max"] == pytest.approx(1.0)
    assert got["aupro"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------
# NumPy's sum piece by piece, and pixel metrics a block at a time


@pytest.mark.parametrize("leaf", [128, 300, 4096])
def test_pairwise_sum_is_numpys_sum(leaf):
    rng = np.random.default_rng(3)
    for size in [*range(0, 300, 7), 1000, 4097, 65_537, 300_001]:
        values = rng.random(size) * np.exp(rng.standard_normal(size) * 6)
        terms = MemoryTerms()
        for part in np.array_split(values, 5):
            terms.append(part)
        assert len(terms) == size
        assert pairwise_sum(terms, leaf=leaf) == float(np.sum(values)), size


def streamed(masks, maps, sizes, max_values):
    """pixel_metrics_of_blocks over consecutive blocks of the given sizes."""
    edges = np.cumsum([0, *sizes])
    assert edges[-1] == len(maps)

    def blocks():
        return ((masks[a:b], maps[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True))

    return pixel_metrics_of_blocks(blocks, max_values=max_values)


@pytest.mark.parametrize(
    "seed,levels,sizes",
    [(0, None, [1, 1, 1, 1, 1]), (1, 5, [2, 3]), (2, 9, [4, 1]), (5, 3, [1, 3, 1]), (6, 2, [5])],
)
@pytest.mark.parametrize("max_values", [1, 40, 1 << 23])
def test_streamed_pixel_metrics_equal_the_stacked_ones_to_the_last_bit(
    seed, levels, sizes, max_values
):
    # Coarse levels make many ties between normal and anomalous pixels and across blocks;
    # max_values=1 gives one value pass per occupied bucket of scores.
    masks, maps = random_pixels(seed, levels=levels)
    got = streamed(masks, maps, sizes, max_values)
    expected = pixel_metrics(masks, maps)
    assert got == expected  # exact equality, every key (no nan: both classes are present)
    y, s = masks.ravel(), maps.ravel()
    assert got["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-10)
    assert got["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-10)
    assert got["f1_max"] == pytest.approx(brute_f1_max(y, s), abs=1e-10)
    assert got["aupro"] == pytest.approx(brute_aupro(masks, maps.astype(np.float64)), abs=1e-9)
    assert got["aupro_200"] == pytest.approx(brute_aupro_200(masks, maps), abs=1e-9)


def test_streamed_pixel_metrics_make_several_value_passes_and_read_every_block_each_time(
    monkeypatch,
):
    monkeypatch.setattr(PixelMetricsStream, "_SLICE", 4)  # curve points 4 scores at a time
    masks, maps = random_pixels(4)
    stream = PixelMetricsStream(max_values=30)
    for i in range(len(maps)):
        stream.add(masks[i], maps[i])
    passes = stream.passes_left
    assert passes >= 5
    with pytest.raises(ValueError, match="pass 1 is over"):
        stream.add(masks[0], maps[0])
    with pytest.raises(ValueError, match="value passes are left"):
        stream.result()
    for _ in range(passes):
        for i in reversed(range(len(maps))):  # any order within a pass
            stream.add_values(maps[i])
        stream.end_pass()
    assert stream.result() == pixel_metrics(masks, maps)
    with pytest.raises(ValueError, match="no value pass"):
        stream.add_values(maps[0])


def test_streamed_pixel_metrics_on_regions_at_sample_borders_signed_zeros_and_float64():
    # Defects touching the first and last rows of consecutive samples: regions must not join
    # across samples, whether the samples share a block or not; -0.0 and 0.0 are one score.
    rng = np.random.default_rng(11)
    masks = np.zeros((12, 8, 8), dtype=bool)
    masks[1:, -2:, 2:5] = True
    masks[1:, :2, 3:6] = True
    masks[3, 4, 4] = True
    maps = np.round(rng.standard_normal(masks.shape) * 3) / 6 + 0.3 * masks
    maps[maps == 0] = -0.0
    maps[0, 0, :4] = 0.0
    expected = pixel_metrics(masks, maps)
    for sizes in ([12], [1] * 12, [5, 7], [3, 3, 3, 3]):
        for max_values in (1, 1 << 23):
            assert streamed(masks, maps, sizes, max_values) == expected
    assert expected["aupro"] == pytest.approx(brute_aupro(masks, maps), abs=1e-9)


def test_streamed_pixel_metrics_degenerate_cases_match_the_stacked_ones():
    masks, maps = random_pixels(3)
    none = np.zeros_like(masks)
    assert all(math.isnan(v) for v in streamed(none, maps, [2, 3], 5).values())
    assert all(math.isnan(v) for v in streamed(~none, maps, [2, 3], 5).values())
    assert all(math.isnan(v) for v in PixelMetricsStream().result().values())
    constant = np.ones(masks.shape, dtype=np.float32)
    got, expected = streamed(masks, constant, [1, 4], 5), pixel_metrics(masks, constant)
    assert math.isnan(got.pop("aupro_200")) and math.isnan(expected.pop("aupro_200"))
    assert got == expected and got["auroc"] == 0.5


def test_streamed_pixel_metrics_refuse_blocks_of_another_dtype_or_shape():
    masks, maps = random_pixels(0)
    stream = PixelMetricsStream()
    stream.add(masks[:2], maps[:2])
    with pytest.raises(ValueError, match="dtype"):
        stream.add(masks[2:], maps[2:].astype(np.float64))
    with pytest.raises(ValueError, match="shape"):
        stream.add(masks[2:], maps[2:, :, :5])
    with pytest.raises(ValueError, match="max_values"):
        PixelMetricsStream(max_values=0)


# ------------------------------------------------------------------------------------------
# degenerate cases and summary


def test_pixel_metrics_without_anomalous_pixels_are_nan():
    masks = np.zeros((2, 4, 4), dtype=bool)
    got = pixel_metrics(masks, np.random.default_rng(0).random((2, 4, 4)))
    assert set(got) == {"auroc", "ap", "f1_max", "aupro", "aupro_200"}
    assert all(math.isnan(v) for v in got.values())
    assert math.isnan(aupro(masks, np.zeros((2, 4, 4))))
    assert math.isnan(aupro_200(masks, np.zeros((2, 4, 4))))


def test_constant_maps_do_not_crash():
    masks, _ = random_pixels(0)
    got = pixel_metrics(masks, np.ones(masks.shape, dtype=np.float32))
    assert got["auroc"] == pytest.approx(0.5)
    assert math.isnan(got["aupro_200"])
    assert 0.0 <= got["aupro"] <= 1.0


def test_pixel_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        pixel_metrics(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5)))


def test_summarize_adds_a_nan_aware_mean():
    per = {
        "a": {"auroc": 0.8, "aupro": math.nan},
        "b": {"auroc": 0.6, "aupro": 0.5},
        "c": {"auroc": math.nan},
    }
    out = summarize(per)
    assert list(out) == ["a", "b", "c", "mean"]
    assert out["mean"]["auroc"] == pytest.approx(0.7)
    assert out["mean"]["aupro"] == pytest.approx(0.5)
    assert out["a"] == per["a"] and out["a"] is not per["a"]
    assert math.isnan(summarize({"x": {"ap": math.nan}})["mean"]["ap"])
    with pytest.raises(ValueError, match="mean"):
        summarize({"mean": {"ap": 1.0}})
