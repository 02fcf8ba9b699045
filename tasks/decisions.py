"""RsCon over the pool and the batch's decisions, as one cached stage of the DAG (§III-D).

Between the reduction and the result files: it reads every pool sample's score and salient
feature, re-scores them with RsCon, and decides which of the batch's samples are flagged, the
pixel threshold of its predicted masks and whether its scores drifted from the bank's. The
entry is keyed by the reduced entries it read and the decision settings, so a re-run with the
same pool finds it, and a re-score with other windows or another ``k`` makes a new one.

Entry arrays (P pool samples, the first N of them the batch's):

- ``score`` (P,) float32: sample scores before RsCon (maxima of the maps);
- ``score_rescored`` (P,) float32: after RsCon (normalized over the pool);
- ``flags`` (N,) bool: the batch's flagged samples.

Its meta holds ``flag_threshold``, ``flag_note`` (why no threshold could be set, or None),
``pixel_threshold`` and ``drift`` (None without a bank).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from prefect import task

from musc_core.config import MuscConfig
from musc_core.decisions import flag_outliers, flag_samples, pixel_threshold, score_drift
from musc_core.rescoring import rscon
from tasks.cache.store import FeatureCache
from tasks.runtime import Runtime, feature_cache
from tasks.stage import TASK_OPTIONS, StageCount


@dataclass(frozen=True)
class Decided:
    """The decided entry of a pool, read back (small: scores and flags only).

    Attributes:
        before: (P,) scores before RsCon.
        after: (P,) scores after RsCon.
        flags: (N,) flags of the batch's samples.
        flag_threshold: threshold on the RsCon scores (``+inf`` when none could be set).
        flag_note: why no threshold could be set, or None.
        pixel_threshold: threshold on map values for the predicted masks.
        drift: ``{"shift", "drifted", "limit"}`` against the bank, or None without a bank.
    """

    before: np.ndarray
    after: np.ndarray
    flags: np.ndarray
    flag_threshold: float
    flag_note: str | None
    pixel_threshold: float
    drift: dict[str, float | bool] | None


def decide_pool(
    scores: torch.Tensor,
    salient: torch.Tensor,
    current: int,
    config: MuscConfig,
    against_bank: bool,
) -> Decided:
    """RsCon and the decisions of one pool, in memory.

    Args:
        scores: (P,) sample scores before RsCon; the first ``current`` are the batch's.
        salient: (P, C) anomaly-salient features.
        current: how many pool samples are the batch's (the rest is the bank).
        config: RsCon windows and the flag rule's ``k``.
        against_bank: the flag and pixel thresholds come from the bank's part of the pool
            (new parts scored against a reference bank) instead of the batch's.

    Returns:
        Scores, flags and thresholds.
    """
    after_pool = rscon(scores, salient, config.rescoring_windows).numpy()
    before_pool = scores.numpy()
    before, after = before_pool[:current], after_pool[:current]
    if against_bank:
        bank = flag_samples(after_pool[current:], config.flag_mad_k)
        decision = bank._replace(flags=after > bank.threshold)
        pixel_cut = pixel_threshold(before_pool[current:], config.flag_mad_k)
    else:
        decision = flag_outliers(after, config.flag_mad_k)
        pixel_cut = pixel_threshold(before, config.flag_mad_k)
    drift = None
    if len(before_pool) > current:
        shift, drifted, limit = score_drift(before, before_pool[current:])
        drift = {"shift": float(shift), "drifted": bool(drifted), "limit": float(limit)}
    return Decided(
        before=before_pool,
        after=after_pool,
        flags=np.asarray(decision.flags, dtype=bool),
        flag_threshold=float(decision.threshold),
        flag_note=decision.reason,
        pixel_threshold=float(pixel_cut),
        drift=drift,
    )


def read_decided(cache: FeatureCache, key: str) -> Decided:
    """The decided entry ``key`` of the cache."""
    arrays, meta = cache.read(key)
    return Decided(
        before=arrays["score"],
        after=arrays["score_rescored"],
        flags=arrays["flags"].astype(bool),
        flag_threshold=float(meta["flag_threshold"]),
        flag_note=meta["flag_note"],
        pixel_threshold=float(meta["pixel_threshold"]),
        drift=meta["drift"],
    )


@task(name="rscon-decisions", **TASK_OPTIONS)
def decide(
    reduced: list[str],
    current: int,
    key: str,
    config: MuscConfig,
    runtime: Runtime,
    against_bank: bool = False,
) -> StageCount:
    """RsCon over the pool and the batch's decisions, written as the cache entry ``key``.

    Args:
        reduced: the reduced-entry key of each pool sample, the batch's first.
        current: how many of them are the batch's.
        key: the entry's key (:func:`tasks.cache.keys.decisions_key`).
        config: RsCon windows and the flag rule.
        runtime: cache location.
        against_bank: take the thresholds from the bank's part of the pool.

    Returns:
        The work count (``decisions``: one entry computed or found).
    """
    cache = feature_cache(runtime.cache_url)
    if cache.has(key):
        return StageCount("decisions", 0, 1)
    scores = torch.tensor([cache.meta(k)["score"] for k in reduced], dtype=torch.float32)
    salient = torch.stack([torch.from_numpy(cache.read_array(k, "salient")) for k in reduced])
    write_decided(cache, key, decide_pool(scores, salient, current, config, against_bank))
    return StageCount("decisions", 1, 0)


def write_decided(cache: FeatureCache, key: str, decided: Decided) -> None:
    """Write a pool's decisions as the cache entry ``key`` (read back by :func:`read_decided`)."""
    arrays = {
        "score": decided.before.astype(np.float32),
        "score_rescored": decided.after.astype(np.float32),
        "flags": decided.flags,
    }
    meta = {
        "flag_threshold": decided.flag_threshold,
        "flag_note": decided.flag_note,
        "pixel_threshold": decided.pixel_threshold,
        "drift": decided.drift,
    }
    cache.write(key, arrays, meta=meta)
