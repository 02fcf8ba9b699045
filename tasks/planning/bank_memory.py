"""A line's reference bank held in memory, for a long-lived process that scores parts one by one.

``musc serve`` scores each new part against the same bank. What a part needs from the bank is
read from the feature cache once, at start-up, and kept:

- each bank block's SNAMD features per modality, stacked as the ``score-pairs`` task stacks
  them: (B, Y, L, C) on the process's device;
- each bank sample's reduced score (the maximum of its map, as its batch run stored it) and
  its anomaly-salient feature (C2 + C3,), the inputs of RsCon and of the bank's thresholds.

A part's pair distances to a bank block are then :func:`tasks.scoring.score_pairs_against`
on these tensors: the same computation as the shard ``score_new`` writes, on the same values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from musc_core.config import MuscConfig
from tasks.cache.store import FeatureCache
from tasks.planning.blocks import PoolSample

#: Modality slots of :attr:`tasks.cache.keys.SampleKeys.features` (2D, 3D).
SLOTS = (0, 1)


@dataclass(frozen=True)
class BankMemory:
    """The bank's features, scores and salient features, read once.

    Attributes:
        blocks: per modality slot, ``{block's SNAMD keys: (B, Y, L, C) features}``; an empty
            dict for a modality the line does not score.
        rows: per modality slot, ``{SNAMD key: (block's SNAMD keys, row)}``.
        scores: ``{reduced key: score}`` of every bank sample.
        salient: ``{reduced key: (C,) salient feature}`` of every bank sample.
    """

    blocks: tuple[dict[tuple[str, ...], torch.Tensor], ...]
    rows: tuple[dict[str, tuple[tuple[str, ...], int]], ...]
    scores: dict[str, float]
    salient: dict[str, torch.Tensor]

    @property
    def bytes(self) -> int:
        """Memory held by the features and salient features, in bytes."""
        held = [t for blocks in self.blocks for t in blocks.values()] + list(self.salient.values())
        return sum(t.element_size() * t.nelement() for t in held)

    def block_features(self, block: Sequence[PoolSample], slot: int) -> torch.Tensor | None:
        """The SNAMD features of a block of bank samples for one modality: (B, Y, L, C).

        Args:
            block: bank samples of one stored block, in order, possibly without some of them
                (a bank sample equal to the part is left out).
            slot: 0 for 2D, 1 for 3D.

        Returns:
            The stored block's tensor when the block is whole, else its rows stacked in the
            block's order; None for a modality the line does not score.

        Raises:
            KeyError: a sample that was not loaded.
        """
        if not self.blocks[slot]:
            return None
        keys = tuple(s.keys.features[slot] for s in block)
        whole = self.blocks[slot].get(keys)
        if whole is not None:
            return whole
        places = [self.rows[slot][key] for key in keys]
        return torch.stack([self.blocks[slot][owner][row] for owner, row in places])

    def pool(self, reduced: Sequence[str]) -> tuple[list[float], list[torch.Tensor]]:
        """Scores and salient features of bank samples, by reduced key, in order."""
        return [self.scores[k] for k in reduced], [self.salient[k] for k in reduced]


def load_bank_memory(
    cache: FeatureCache,
    blocks: Sequence[Sequence[PoolSample]],
    reduced: Sequence[str],
    config: MuscConfig,
    device: torch.device,
) -> BankMemory:
    """Read what scoring a part against the bank needs from the cache.

    Args:
        cache: the feature cache holding the bank's entries.
        blocks: the bank's blocks (:func:`tasks.planning.bank.bank_blocks`, nothing excluded).
        reduced: the reduced-entry key of each bank sample, in bank order.
        config: which modalities are scored.
        device: where the features are kept (that of the backbones and the scoring).

    Returns:
        The bank in memory.
    """
    used = (config.uses_2d, config.uses_3d)
    stacked: list[dict[tuple[str, ...], torch.Tensor]] = [{}, {}]
    rows: list[dict[str, tuple[tuple[str, ...], int]]] = [{}, {}]
    for slot in SLOTS:
        if not used[slot]:
            continue
        for block in blocks:
            keys = tuple(s.keys.features[slot] for s in block)
            stacked[slot][keys] = torch.stack(
                [torch.from_numpy(cache.read_array(k, "features")).to(device) for k in keys]
            )
            rows[slot].update({key: (keys, row) for row, key in enumerate(keys)})
    scores = {k: cache.meta(k)["score"] for k in reduced}
    salient = {k: torch.from_numpy(cache.read_array(k, "salient")) for k in reduced}
    return BankMemory(tuple(stacked), tuple(rows), scores, salient)
