"""Lay a line's samples out in blocks and plan the shards and reductions (plain, fast logic).

The *pool* is every sample scored together: tonight's usable samples, then the samples of the
rolling reference bank (earlier batches of the line, block by block as they were stored). Each
batch's samples are ordered by their content key, a hash, so a block is an unbiased draw of the
line and a batch's blocks are the same whenever it is part of a pool: shards between two stored
batches are found in the cache night after night.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from musc_core.config import MuscConfig
from musc_core.references import reference_plan
from tasks.cache.keys import PairKeys, SampleKeys, pairs_key, reduced_key


@dataclass(frozen=True)
class PairSource:
    """Where some of a sample's reference distances are stored.

    Attributes:
        key: the shard's cache keys, per modality (2D, 3D).
        array: ``"d"`` (inside the sample's own block), ``"d_ab"`` or ``"d_ba"``.
        row: the sample's row in that array.
        columns: the columns (reference samples of the other block) to take, in order.
    """

    key: PairKeys
    array: str
    row: int
    columns: tuple[int, ...]


@dataclass(frozen=True)
class ReduceItem:
    """One sample to reduce.

    Attributes:
        sample: the sample's cache keys.
        key: the key of its reduced entry.
        sources: where its distances to its references are, in reference order.
    """

    sample: SampleKeys
    key: str
    sources: tuple[PairSource, ...]


@dataclass(frozen=True)
class PoolSample:
    """A sample of the pool.

    Attributes:
        name: the sample's name in its batch.
        batch: the batch (night) it belongs to.
        keys: its cache keys under this run's settings.
        label: 0/1 when known, else None.
        defect_type: defect folder or label, when known.
    """

    name: str
    batch: str
    keys: SampleKeys
    label: int | None = None
    defect_type: str | None = None


@dataclass(frozen=True)
class Shard:
    """One pair-scoring shard: blocks ``a`` and ``b`` (``b is None``: the pairs inside ``a``)."""

    a: int
    b: int | None
    key: PairKeys


@dataclass(frozen=True)
class ScoringPlan:
    """Everything the scoring stages do for a pool.

    Attributes:
        blocks: the pool's samples, block by block.
        shards: the shards the references need.
        reduce: per block, the reduction of each of its samples.
        references: per pool sample (block after block), the pool indices of its references.
    """

    blocks: list[list[PoolSample]]
    shards: list[Shard]
    reduce: list[list[ReduceItem]]
    references: list[list[int]]

    @property
    def samples(self) -> list[PoolSample]:
        """The pool's samples in order."""
        return [s for block in self.blocks for s in block]


def batch_blocks(samples: Sequence[PoolSample], shard_size: int) -> list[list[PoolSample]]:
    """A batch's samples in blocks of ``shard_size``, ordered by content.

    The order is that of their input files' hash (:attr:`tasks.cache.keys.PreparedKeys.content`,
    the same whatever the modality), then their names.
    """
    if shard_size <= 0:
        raise ValueError(f"shard size must be positive, got {shard_size}")
    ordered = sorted(samples, key=lambda s: (s.keys.prepared.content, s.name))
    return [ordered[i : i + shard_size] for i in range(0, len(ordered), shard_size)]


def plan_scoring(
    blocks: list[list[PoolSample]],
    config: MuscConfig,
    budget: int | None,
    preferred: list[list[int]] | None = None,
) -> ScoringPlan:
    """The shards and reductions of a pool laid out in blocks.

    Args:
        blocks: the pool, block by block (tonight's blocks first, then the bank's).
        config: settings that enter the shard and reduction keys.
        budget: reference budget R per sample, or None for all the other samples.
        preferred: per block, the blocks to take references from first (similar references,
            :mod:`tasks.planning.layout`); None for the cycle order.

    Returns:
        The plan: only the shards some sample's references need.
    """
    plan = reference_plan([len(b) for b in blocks], budget, preferred)
    flat = [s for block in blocks for s in block]
    position = [(b, row) for b, block in enumerate(blocks) for row in range(len(block))]
    shard_keys: dict[tuple[int, int], PairKeys] = {}
    for a, b in plan.block_pairs:
        shard_keys[(a, b)] = pairs_key(
            [s.keys for s in blocks[a]], [s.keys for s in blocks[b]], config
        )
    shards = [Shard(a, None if a == b else b, shard_keys[(a, b)]) for a, b in plan.block_pairs]
    reduce: list[list[ReduceItem]] = [[] for _ in blocks]
    for index, references in enumerate(plan.references):
        block, row = position[index]
        sources: list[PairSource] = []
        for ref in references:
            other, column = position[ref]
            lo, hi = min(block, other), max(block, other)
            array = "d" if block == other else ("d_ab" if block == lo else "d_ba")
            key = shard_keys[(lo, hi)]
            last = sources[-1] if sources else None
            if last is not None and last.key == key and last.array == array:
                sources[-1] = PairSource(key, array, row, (*last.columns, column))
            else:
                sources.append(PairSource(key, array, row, (column,)))
        sample = flat[index]
        item_key = reduced_key(sample.keys, [flat[r].keys for r in references], config)
        reduce[block].append(ReduceItem(sample.keys, item_key, tuple(sources)))
    return ScoringPlan(blocks, shards, reduce, plan.references)
