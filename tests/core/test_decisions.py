"""Decisions without labels (robust thresholds, flags, masks) and the F1-optimal threshold."""

import math
import statistics
from fractions import Fraction

import numpy as np
import pytest
import torch

from musc_core.config import MuscConfig
from musc_core.decisions import (
    MAD_TO_SIGMA,
    MEAN_AD_TO_SIGMA,
    Decision,
    flag_outliers,
    flag_samples,
    pixel_threshold,
    predicted_masks,
    robust_threshold,
    score_drift,
)
from musc_core.metrics import f1_optimal_threshold, image_metrics

# ------------------------------------------------------------------------------------------
# brute-force twins


def brute_threshold(scores, k):
    """Literal median/MAD with the standard library, then the documented fallbacks."""
    values = [float(x) for x in scores]
    med = statistics.median(values)
    deviations = [abs(x - med) for x in values]
    spread = 1.4826 * statistics.median(deviations)
    if spread == 0:
        spread = 1.2533 * sum(deviations) / len(deviations)
    return med + k * spread if spread > 0 else math.inf


def brute_f1_threshold(labels, scores):
    """Every distinct score as a cut (>=), exact F1 with fractions, largest cut among ties."""
    best_f1, best_t = Fraction(-1), None
    for t in sorted(set(float(s) for s in scores), reverse=True):
        tp = sum(1 for y, s in zip(labels, scores, strict=True) if s >= t and y == 1)
        fp = sum(1 for y, s in zip(labels, scores, strict=True) if s >= t and y == 0)
        fn = sum(1 for y, s in zip(labels, scores, strict=True) if s < t and y == 1)
        f1 = Fraction(2 * tp, 2 * tp + fp + fn)
        if f1 > best_f1:
            best_f1, best_t = f1, t
    return best_t, best_f1


# ------------------------------------------------------------------------------------------
# robust threshold and flags


def test_hand_computed_odd_count():
    # median 3, |x - 3| = [2, 1, 0, 1, 97] -> MAD 1
    decision = flag_samples([1.0, 2.0, 3.0, 4.0, 100.0], k=3.0)
    assert decision.median == 3.0
    assert decision.mad == 1.0
    assert decision.threshold == pytest.approx(3.0 + 3.0 * 1.4826)
    assert decision.flags.tolist() == [False, False, False, False, True]
    assert decision.flags.dtype == bool


def test_hand_computed_even_count_uses_the_mean_of_the_middle_values():
    # median 2.5, |x - 2.5| = [1.5, .5, .5, 1.5] -> MAD 1
    assert robust_threshold([4.0, 1.0, 3.0, 2.0], k=2.0) == pytest.approx(2.5 + 2 * 1.4826)


def test_zero_mad_falls_back_to_the_mean_absolute_deviation():
    # median 0, MAD 0, mean |x| = 2
    decision = flag_samples([0.0, 0.0, 0.0, 0.0, 10.0], k=3.0)
    assert decision.mad == 0.0
    assert decision.threshold == pytest.approx(3.0 * MEAN_AD_TO_SIGMA * 2.0)
    assert decision.flags.tolist() == [False, False, False, False, True]


def test_constant_line_flags_nothing():
    decision = flag_samples(np.full(6, 0.7), k=3.0)
    assert decision.threshold == math.inf
    assert not decision.flags.any()


def test_matches_the_literal_definition_on_random_inputs():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(1, 40))
        scores = rng.normal(size=n) if trial % 3 else rng.integers(0, 3, size=n).astype(float)
        k = float(rng.uniform(0.5, 4.0))
        assert robust_threshold(scores, k) == pytest.approx(brute_threshold(scores, k))


def test_flags_exactly_the_scores_above_the_threshold():
    rng = np.random.default_rng(1)
    scores = rng.gamma(2.0, size=200)
    decision = flag_samples(scores, k=2.0)
    assert isinstance(decision, Decision)
    np.testing.assert_array_equal(decision.flags, scores > decision.threshold)
    assert 0 < decision.flags.sum() < 200


def test_one_huge_outlier_moves_the_threshold_little():
    rng = np.random.default_rng(2)
    scores = rng.normal(0.0, 1.0, size=101)
    before = robust_threshold(scores, 3.0)
    after = robust_threshold(np.append(scores, 1e6), 3.0)
    assert abs(after - before) < 0.2  # one rank of the median and of the MAD
    naive_before = scores.mean() + 3 * scores.std()
    naive_after = np.append(scores, 1e6).mean() + 3 * np.append(scores, 1e6).std()
    assert naive_after - naive_before > 1e5  # what the robust rule avoids


def test_a_fifth_of_defective_samples_still_leaves_them_flagged():
    rng = np.random.default_rng(3)
    normal = rng.normal(1.0, 0.05, size=80)
    defective = rng.uniform(1.5, 3.0, size=20)
    decision = flag_samples(np.concatenate([normal, defective]), k=3.0)
    assert decision.flags[80:].all()
    assert decision.flags[:80].sum() <= 2


def test_torch_and_numpy_inputs_agree():
    scores = np.array([0.2, 0.5, 0.1, 0.9, 0.3], dtype=np.float32)
    assert robust_threshold(torch.from_numpy(scores), 2.0) == robust_threshold(scores, 2.0)
    np.testing.assert_array_equal(
        flag_samples(torch.from_numpy(scores), 2.0).flags, flag_samples(scores, 2.0).flags
    )


@pytest.mark.parametrize("k", [0.0, -1.0, math.nan, math.inf])
def test_rejects_a_non_positive_k(k):
    with pytest.raises(ValueError, match="k must be"):
        robust_threshold([1.0, 2.0], k)


@pytest.mark.parametrize("scores", [[], [1.0, math.nan], [math.inf, 1.0]])
def test_rejects_empty_or_non_finite_scores(scores):
    with pytest.raises(ValueError):
        flag_samples(scores, 3.0)


def test_mad_to_sigma_makes_the_threshold_k_sigmas_for_normal_data():
    scores = np.random.default_rng(4).normal(5.0, 2.0, size=200_000)
    assert robust_threshold(scores, 1.0) == pytest.approx(7.0, abs=0.03)
    assert MAD_TO_SIGMA == pytest.approx(1.4826)


# ------------------------------------------------------------------------------------------
# pixel rule


def test_pixel_threshold_uses_the_map_maxima():
    maps = np.zeros((5, 4, 4), dtype=np.float32)
    maps[:, 0, 0] = [1.0, 2.0, 3.0, 4.0, 100.0]
    maxima = maps.reshape(5, -1).max(axis=1)
    assert pixel_threshold(maxima, 3.0) == pytest.approx(3.0 + 3.0 * 1.4826)


def test_predicted_masks_hand_case():
    maps = np.array([[[0.1, 0.9], [0.5, 0.6]], [[0.6, 0.2], [0.0, 1.0]]], dtype=np.float32)
    masks = predicted_masks(maps, 0.6)
    assert masks.dtype == bool and masks.shape == (2, 2, 2)
    assert masks.tolist() == [[[False, True], [False, False]], [[False, False], [False, True]]]


def test_predicted_masks_keeps_torch_on_its_device_and_inf_marks_nothing():
    maps = torch.rand(3, 8, 8)
    masks = predicted_masks(maps, 0.5)
    assert isinstance(masks, torch.Tensor) and masks.dtype == torch.bool
    assert masks.device == maps.device
    torch.testing.assert_close(masks, maps > 0.5)
    assert not predicted_masks(maps.numpy(), math.inf).any()


# ------------------------------------------------------------------------------------------
# F1-optimal threshold


def test_f1_optimal_threshold_hand_case():
    # cuts: 0.8 -> F1 2/3, 0.4 -> 1/2, 0.35 -> 4/5, 0.1 -> 2/3
    assert f1_optimal_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.35)


def test_f1_optimal_threshold_picks_the_largest_cut_among_ties():
    # cuts: 4 -> 2/3, 3 -> 1/2, 2 -> 2/5, 1 -> 2/3
    assert f1_optimal_threshold([1, 0, 0, 1], [4.0, 3.0, 2.0, 1.0]) == 4.0


def test_f1_optimal_threshold_equals_brute_force_over_all_cut_points():
    rng = np.random.default_rng(5)
    for trial in range(40):
        n = int(rng.integers(2, 30))
        labels = rng.integers(0, 2, size=n)
        labels[0], labels[1] = 0, 1
        if trial % 2:
            scores = rng.integers(0, 5, size=n).astype(np.float64)  # many tied scores
        else:
            scores = rng.normal(size=n) + labels
        expected_t, expected_f1 = brute_f1_threshold(labels.tolist(), scores.tolist())
        threshold = f1_optimal_threshold(labels, scores)
        assert threshold == expected_t
        assert image_metrics(labels, scores)["f1_max"] == pytest.approx(float(expected_f1))


def test_f1_optimal_threshold_is_nan_with_one_class():
    assert math.isnan(f1_optimal_threshold([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(f1_optimal_threshold([1, 1], [0.1, 0.2]))


def test_f1_optimal_threshold_validates_like_image_metrics():
    with pytest.raises(ValueError, match="differ"):
        f1_optimal_threshold([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="labels must be"):
        f1_optimal_threshold([0, 2], [0.1, 0.2])


# ------------------------------------------------------------------------------------------
# configuration


def test_config_default_and_validation():
    assert MuscConfig().flag_mad_k == 3.0
    assert MuscConfig(flag_mad_k=2.5).as_dict()["flag_mad_k"] == 2.5
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="flag_mad_k"):
            MuscConfig(flag_mad_k=bad)


# ------------------------------------------------------------------------------------------
# flag_outliers: the threshold grown from the lower half


def brute_outliers(scores, k):
    """Literal loop of the documented steps, with the standard library."""
    values = [float(x) for x in scores]
    if len(values) < 5 or len(set(values)) == 1:
        return math.inf
    cut = sorted(values)[(len(values) + 1) // 2 - 1]
    inliers = [x for x in values if x <= cut]
    threshold = brute_threshold(inliers, k)
    for _ in range(len(values)):
        grown = [x for x in values if x <= threshold]
        if sorted(grown) == sorted(inliers):
            break
        inliers = grown
        threshold = brute_threshold(inliers, k)
    return threshold


def test_outliers_match_the_literal_steps_on_random_inputs():
    rng = np.random.default_rng(6)
    for trial in range(60):
        n = int(rng.integers(5, 60))
        if trial % 3 == 0:
            scores = rng.integers(0, 4, size=n).astype(float)  # ties
        else:
            bad = int(rng.integers(0, n // 2))
            scores = np.concatenate([rng.normal(size=n - bad), rng.uniform(2, 8, size=bad)])
        k = float(rng.uniform(1.0, 4.0))
        decision = flag_outliers(scores, k)
        assert decision.threshold == pytest.approx(brute_outliers(scores, k))
        np.testing.assert_array_equal(decision.flags, scores > decision.threshold)


def test_outliers_hold_where_the_mad_rule_flags_nothing():
    # the case: 12 parts, 5 clearly defective -> MAD of all scores is inflated
    normal = [0.10, 0.14, 0.18, 0.20, 0.22, 0.25, 0.28]
    defective = [0.60, 0.64, 0.68, 0.70, 0.72]
    scores = np.array(normal + defective)
    assert flag_samples(scores, 3.0).threshold > 0.9  # above the top score: nothing flagged
    decision = flag_outliers(scores, 3.0)
    assert decision.flags.tolist() == [False] * 7 + [True] * 5
    assert decision.reason is None
    # the threshold is the robust threshold of the normal scores alone
    assert decision.threshold == pytest.approx(brute_threshold(normal, 3.0))


def test_outliers_on_a_clean_batch_equal_the_mad_rule():
    scores = np.random.default_rng(7).normal(size=300)
    assert flag_outliers(scores, 3.0).threshold == pytest.approx(robust_threshold(scores, 3.0))


def test_outliers_decline_small_or_constant_batches_and_say_why():
    small = flag_outliers([0.1, 0.2, 0.9, 0.3], 3.0)
    assert small.threshold == math.inf and not small.flags.any()
    assert "at least 5" in small.reason
    constant = flag_outliers(np.full(8, 0.4), 3.0)
    assert constant.threshold == math.inf and "same" in constant.reason
    assert flag_samples([0.1, 0.2, 0.9, 0.3], 3.0).reason is None


# ------------------------------------------------------------------------------------------
# drift


def test_drift_is_the_median_shift_in_robust_sigmas():
    reference = [1.0, 2.0, 3.0, 4.0, 100.0]  # median 3, MAD 1
    drift = score_drift([9.0, 10.0, 11.0], reference)
    assert drift.shift == pytest.approx((10.0 - 3.0) / 1.4826)
    assert drift.drifted and drift.limit == 3.0
    assert not score_drift([2.5, 3.0, 3.5], reference).drifted
    assert score_drift([0.0], reference, limit=2.0).shift == pytest.approx(-3.0 / 1.4826)


def test_drift_matches_a_literal_computation():
    rng = np.random.default_rng(8)
    for _ in range(20):
        ref = rng.normal(size=int(rng.integers(3, 40)))
        now = rng.normal(rng.uniform(-3, 3), size=int(rng.integers(1, 20)))
        spread = 1.4826 * statistics.median([abs(x - statistics.median(ref)) for x in ref])
        expected = (statistics.median(now) - statistics.median(ref)) / spread
        assert score_drift(now, ref).shift == pytest.approx(expected)


def test_drift_with_a_constant_reference():
    assert score_drift([1.0, 1.0], [1.0, 1.0, 1.0]).shift == 0.0
    assert score_drift([2.0], [1.0, 1.0, 1.0]).shift == math.inf
    with pytest.raises(ValueError, match="limit"):
        score_drift([1.0], [1.0, 2.0], limit=0.0)
