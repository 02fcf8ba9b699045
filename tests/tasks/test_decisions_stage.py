"""The RsCon + decisions stage: its entry, its cache hit and its thresholds, by hand."""

import dataclasses

import numpy as np
import pytest
import torch

from musc_core.config import MuscConfig
from musc_core.decisions import flag_outliers
from musc_core.rescoring import rscon
from tasks.cache.keys import decisions_key
from tasks.cache.store import FeatureCache
from tasks.decisions import decide, read_decided
from tasks.runtime import Runtime
from tasks.stage import StageCount

CONFIG = MuscConfig(modality="2d")


def _pool(tmp_path, scores, seed=0):
    """Reduced entries with the given scores and random salient features; their keys."""
    rng = np.random.default_rng(seed)
    cache = FeatureCache(str(tmp_path / "cache"))
    keys = []
    for i, score in enumerate(scores):
        key = f"reduced-{seed}-{i}"
        salient = rng.normal(size=6).astype(np.float32)
        cache.write(key, {"salient": salient}, meta={"score": float(score)})
        keys.append(key)
    return cache, keys


def _by_hand_threshold(values, k):
    median = np.median(values)
    return median + k * 1.4826 * np.median(np.abs(values - median))


def test_decisions_entry_holds_rscon_and_flags_and_is_found_again(tmp_path):
    scores = [0.31, 0.30, 0.33, 0.29, 0.95, 0.32, 0.30, 0.28, 0.34]
    cache, keys = _pool(tmp_path, scores)
    runtime = Runtime(str(tmp_path / "cache"), "cpu")
    key = decisions_key(keys, 9, CONFIG, False)
    assert decide.fn(keys, 9, key, CONFIG, runtime) == StageCount("decisions", 1, 0)
    decided = read_decided(cache, key)
    salient = torch.stack([torch.from_numpy(cache.read_array(k, "salient")) for k in keys])
    expected = rscon(torch.tensor(scores, dtype=torch.float32), salient, CONFIG.rescoring_windows)
    np.testing.assert_array_equal(decided.before, np.float32(scores))
    np.testing.assert_array_equal(decided.after, expected.numpy())
    truth = flag_outliers(expected.numpy(), CONFIG.flag_mad_k)
    np.testing.assert_array_equal(decided.flags, truth.flags)
    assert decided.flag_threshold == truth.threshold and decided.drift is None
    assert decided.pixel_threshold == pytest.approx(
        _by_hand_threshold(np.float32(scores), CONFIG.flag_mad_k), rel=1e-6
    )
    assert decide.fn(keys, 9, key, CONFIG, runtime) == StageCount("decisions", 0, 1)


def test_against_a_bank_the_bank_sets_the_thresholds_and_the_drift(tmp_path):
    batch = [0.9, 0.35, 0.88, 0.92]  # mostly high: its own rule would flag little
    bank = [0.30, 0.32, 0.31, 0.29, 0.33, 0.30, 0.34, 0.28]
    cache, keys = _pool(tmp_path, batch + bank, seed=1)
    runtime = Runtime(str(tmp_path / "cache"), "cpu")
    config = dataclasses.replace(CONFIG, flag_mad_k=2.0)
    key = decisions_key(keys, len(batch), config, True)
    decide.fn(keys, len(batch), key, config, runtime, True)
    decided = read_decided(cache, key)
    after = decided.after
    cut = _by_hand_threshold(after[len(batch):], 2.0)
    assert decided.flag_threshold == pytest.approx(cut, rel=1e-6)
    np.testing.assert_array_equal(decided.flags, after[: len(batch)] > decided.flag_threshold)
    bank_before = np.float32(bank)
    assert decided.pixel_threshold == pytest.approx(_by_hand_threshold(bank_before, 2.0), 1e-6)
    spread = 1.4826 * np.median(np.abs(bank_before - np.median(bank_before)))
    shift = (np.median(np.float32(batch)) - np.median(bank_before)) / spread
    assert decided.drift["shift"] == pytest.approx(shift, rel=1e-5)
    assert decided.drift["drifted"] is bool(abs(shift) > decided.drift["limit"])
