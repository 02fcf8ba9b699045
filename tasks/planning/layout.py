"""Blocks of alike samples, for similar references under a budget (plain logic over descriptors).

With a reference budget R and ``reference_choice="similar"``, each batch of the pool is laid out
again along a nearest-neighbour tour of its samples' global descriptors
(:func:`musc_core.references.similarity_tour`) and cut into blocks of the sizes it had, and every
block ranks the pool's other blocks by the similarity of their mean descriptors
(:func:`musc_core.references.similar_blocks`). The layout of a batch depends on that batch's
samples only (they are put in content order before the tour), so a stored batch gets the same
blocks every night and the shards between two stored batches are still found in the cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from musc_core.references import similar_blocks, similarity_tour


def sample_descriptor(salient: Sequence[np.ndarray]) -> torch.Tensor:
    """A sample's global descriptor: each modality's mean salient feature, unit length, joined.

    Args:
        salient: per scored modality (2D, then 3D), the (M, C) SNAMD features of the salient
            layer.

    Returns:
        (ΣC,) float64 unit vector (each modality weighs the same).
    """
    parts = [
        torch.nn.functional.normalize(torch.as_tensor(f).double().mean(dim=0), dim=0)
        for f in salient
    ]
    return torch.cat(parts) / math.sqrt(len(parts))


def _batch_runs(batches: Sequence[str]) -> list[tuple[int, int]]:
    """``[start, stop)`` block ranges of consecutive blocks of the same batch."""
    runs: list[tuple[int, int]] = []
    for index, batch in enumerate(batches):
        if runs and batches[runs[-1][0]] == batch:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def similar_layout(
    batches: Sequence[str],
    sizes: Sequence[int],
    order_keys: Sequence[tuple[str, str]],
    descriptors: torch.Tensor,
    budget: int,
) -> tuple[list[list[int]], list[list[int]]]:
    """The pool's samples laid out in blocks of alike samples, and each block's similar blocks.

    Args:
        batches: per block (pool order), its batch; one batch's blocks are consecutive.
        sizes: per block, its number of samples (kept).
        order_keys: per pool sample (block after block), its content order key
            ``(content key, name)``; a batch is toured from its first sample in this order.
        descriptors: (N, C) per pool sample, its :func:`sample_descriptor`.
        budget: R, the references per sample.

    Returns:
        ``(layout, preferred)``: per block, the pool indices of its samples; per block, the
        other blocks to take references from first (enough to reach R when they are full).
    """
    if len(batches) != len(sizes):
        raise ValueError(f"{len(batches)} batch names for {len(sizes)} blocks")
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    if len(order_keys) != starts[-1] or descriptors.shape[0] != starts[-1]:
        raise ValueError(
            f"{len(order_keys)} order keys and {descriptors.shape[0]} descriptors for "
            f"{starts[-1]} samples"
        )
    layout: list[list[int]] = []
    for first, stop in _batch_runs(batches):
        members = sorted(range(starts[first], starts[stop]), key=lambda i: order_keys[i])
        toured = [members[i] for i in similarity_tour(descriptors[members])]
        position = 0
        for block in range(first, stop):
            layout.append(toured[position : position + sizes[block]])
            position += sizes[block]
    centroids = torch.stack([descriptors[block].mean(dim=0) for block in layout])
    smallest = min(sizes)
    return layout, similar_blocks(centroids, math.ceil(budget / smallest) + 1)
