"""The pool laid out for similar references, as a Prefect task (between features and shards).

Runs only under a reference budget with ``reference_choice="similar"``: it reads each pool
sample's salient-layer SNAMD features (one row chunk per entry), forms its global descriptor
and returns the new blocks and each block's similar blocks as pool indices
(:mod:`tasks.planning.layout`); the flow re-plans its shards and reductions from them.
"""

from __future__ import annotations

import torch
from prefect import task

from musc_core.config import MuscConfig
from tasks.planning.layout import sample_descriptor, similar_layout
from tasks.runtime import Runtime, feature_cache
from tasks.stage import TASK_OPTIONS


@task(name="lay-out-references", **TASK_OPTIONS)
def lay_out_pool(
    features: list[tuple[str | None, str | None]],
    order_keys: list[tuple[str, str]],
    batches: list[str],
    sizes: list[int],
    budget: int,
    config: MuscConfig,
    runtime: Runtime,
) -> tuple[list[list[int]], list[list[int]]]:
    """Blocks of alike samples and each block's most similar blocks.

    Args:
        features: per pool sample (block after block), its SNAMD keys (2D, 3D; None when the
            modality is not scored).
        order_keys: per pool sample, ``(content key, name)``.
        batches: per block, its batch.
        sizes: per block, its number of samples.
        budget: R, references per sample.
        config: the salient layer.
        runtime: cache location.

    Returns:
        ``(layout, preferred)`` of :func:`tasks.planning.layout.similar_layout`.
    """
    cache = feature_cache(runtime.cache_url)
    layer = config.salient_layer
    descriptors = torch.stack([
        sample_descriptor([cache.read_array(key, "features", layer) for key in keys if key])
        for keys in features
    ])
    return similar_layout(batches, sizes, order_keys, descriptors, budget)
