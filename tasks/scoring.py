"""Mutual scoring as Prefect tasks: pair-distance shards and per-sample reduction (§III-C).

A *shard* is the pair distances between two blocks of samples (or inside one block), for every
layer, in one cache entry per modality (a 2D+3D run shares its 2D entries with a 2D run of the
same blocks, and its 3D ones with a 3D run). It reads only the SNAMD features of its blocks, so a
worker's memory is bounded by the block size, never by N. The *reduction* of a sample gathers
its distances to its references from the shards and hands them to the core's per-sample
reduction (:func:`musc_core.reduction.reduce_sample`: CAE, Interval Average and the layer mean,
its anomaly maps and its anomaly-salient feature for RsCon), the same function the in-memory
pipeline calls.

Shard arrays (Y layers, L patches of the modality, ``m`` = 2 or 3):

- inside block a (B samples): ``d{m}`` (B, Y, L, B), ``+inf`` on the diagonal;
- between blocks a and b: ``d{m}_ab`` (Ba, Y, L, Bb) = distances of a's patches to b's samples,
  ``d{m}_ba`` (Bb, Y, L, Ba) the other way (one GEMM gives both).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from prefect import task

from musc_core.config import MuscConfig
from musc_core.grouping import PointSample
from musc_core.mutual_scoring import pair_distances, pair_minima_tiled, resolve_distance_dtype
from musc_core.reduction import grid_patch_size, reduce_sample
from tasks.cache.keys import PairKeys, SampleKeys
from tasks.cache.store import EntryReader, FeatureCache
from tasks.features import read_grouping
from tasks.planning.blocks import PairSource, ReduceItem
from tasks.planning.groups import ShardWork
from tasks.runtime import Runtime, feature_cache
from tasks.stage import TASK_OPTIONS, StageCount

#: Modality digit in shard array names, and its slot in ``SampleKeys.features``.
MODALITIES = (("2", 0), ("3", 1))
_SLOTS = dict(MODALITIES)


def _features(cache: FeatureCache, keys: Sequence[str], device: torch.device) -> torch.Tensor:
    """SNAMD features of samples: (B, Y, L, C)."""
    return torch.stack(
        [torch.from_numpy(cache.read_array(key, "features")).to(device) for key in keys]
    )


def _layer_pairs(
    a: torch.Tensor, b: torch.Tensor | None, config: MuscConfig, dtype: torch.dtype
) -> dict[str, np.ndarray]:
    """Shard arrays of one modality (names without the modality digit: ``d``, ``d_ab``...)."""
    if b is None:
        inside = [pair_distances(a[:, y], config.pair_block, dtype) for y in range(a.shape[1])]
        return {"d": torch.stack(inside, dim=1).cpu().numpy()}
    ab, ba = [], []
    for y in range(a.shape[1]):
        minima = pair_minima_tiled(a[:, y], b[:, y], config.pair_block, dtype)
        ab.append(minima.a_to_b)
        ba.append(minima.b_to_a)
    return {
        "d_ab": torch.stack(ab, dim=1).cpu().numpy(),
        "d_ba": torch.stack(ba, dim=1).cpu().numpy(),
    }


class BlockFeatures:
    """SNAMD features of a scoring task's blocks, the last first block kept for the next shard.

    A task's shards are consecutive in plan order, so most share their first block: it is read
    once, and a worker holds at most two blocks' features per modality at a time (never the
    whole group's).
    """

    def __init__(self, cache: FeatureCache, blocks: Sequence[Sequence[SampleKeys]],
                 device: torch.device) -> None:
        self.cache = cache
        self.blocks = blocks
        self.device = device
        self._kept: dict[int, tuple[int, torch.Tensor]] = {}

    def get(self, block: int, slot: int, keep: bool) -> torch.Tensor:
        """Features of the task's block ``block``, modality ``slot``: (B, Y, L, C).

        Args:
            block: position in the task's block list.
            slot: 0 for 2D, 1 for 3D.
            keep: hold them for the next shard (dropping the block of that modality held
                before).
        """
        kept = self._kept.get(slot)
        if kept is not None and kept[0] == block:
            return kept[1]
        features = _features(self.cache, [k.features[slot] for k in self.blocks[block]],
                             self.device)
        if keep:
            self._kept[slot] = (block, features)
        return features


@task(name="score-pairs", **TASK_OPTIONS)
def score_pairs(
    blocks: list[list[SampleKeys]],
    shards: list[ShardWork],
    config: MuscConfig,
    runtime: Runtime,
) -> StageCount:
    """Pair distances of a group of shards, every layer, one entry per scored modality (Eq. 7).

    Args:
        blocks: keys of the samples of each block the shards read.
        shards: the shards, their blocks given as positions in ``blocks``, with their cache
            keys per modality (2D, 3D; None for one not scored).
        config: GEMM tile and dtype.
        runtime: cache and device.

    Returns:
        The work count: one entry per shard and scored modality, computed or found cached.
    """
    cache = feature_cache(runtime.cache_url)
    device = runtime.torch_device
    dtype = resolve_distance_dtype(config.distance_dtype, device)
    features = BlockFeatures(cache, blocks, device)
    computed = cached = 0
    for shard in shards:
        for digit, slot in MODALITIES:
            key = shard.key[slot]
            if key is None:
                continue
            if cache.has(key):
                cached += 1
                continue
            a = features.get(shard.a, slot, keep=True)
            b = None if shard.b is None else features.get(shard.b, slot, keep=False)
            _write_pairs(cache, key, digit, a, b, config, dtype)
            computed += 1
    return StageCount("pairs", computed, cached)


def _write_pairs(
    cache: FeatureCache,
    key: str,
    digit: str,
    a: torch.Tensor,
    b: torch.Tensor | None,
    config: MuscConfig,
    dtype: torch.dtype,
) -> None:
    """Compute one modality's shard arrays of blocks a and b (None: inside a) into ``key``."""
    arrays = {
        name.replace("d", f"d{digit}", 1): array
        for name, array in _layer_pairs(a, b, config, dtype).items()
    }
    # One sample's row per chunk: a reduction reads only its own rows.
    meta = {"dtype": str(dtype).removeprefix("torch.")}
    cache.write(key, arrays, meta=meta, chunk_rows=1)


def score_pairs_against(
    block_a: list[SampleKeys],
    features_b: Sequence[torch.Tensor | None],
    key: PairKeys,
    config: MuscConfig,
    runtime: Runtime,
) -> StageCount:
    """As :func:`score_pairs` for one shard between two blocks, with block b's features given.

    For a long-lived process that holds a bank's features in memory (``musc serve``): the
    shard is the same computation on the same features, written to ``runtime``'s cache.

    Args:
        block_a: keys of the first block's samples (their features are read from the cache).
        features_b: block b's SNAMD features per modality slot (2D, 3D): (Bb, Y, L, C) on
            ``runtime``'s device, None for a modality not scored.
        key: the shard's cache keys, per modality.
        config: GEMM tile and dtype.
        runtime: cache and device.

    Returns:
        The work count.
    """
    cache = feature_cache(runtime.cache_url)
    device = runtime.torch_device
    dtype = resolve_distance_dtype(config.distance_dtype, device)
    scored = [(digit, slot) for digit, slot in MODALITIES if key[slot] is not None]
    todo = [(digit, slot) for digit, slot in scored if not cache.has(key[slot])]
    for digit, slot in todo:
        a = _features(cache, [k.features[slot] for k in block_a], device)
        _write_pairs(cache, key[slot], digit, a, features_b[slot], config, dtype)
    return StageCount("pairs", len(todo), len(scored) - len(todo))


class ShardReader:
    """Reads samples' rows from pair shards, opening each shard once.

    The samples of one reduction chunk share their shards: opening a shard's record and arrays
    once per chunk instead of once per sample and modality saves two storage round trips per
    read.
    """

    def __init__(self, cache: FeatureCache) -> None:
        self.cache = cache
        self._entries: dict[str, EntryReader] = {}

    def rows(self, source: PairSource, digit: str) -> np.ndarray:
        """The sample's row of one shard array, restricted to its columns: (Y, L, len(columns))."""
        key = source.key[_SLOTS[digit]]
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self.cache.open_entry(key)
        name = source.array.replace("d", f"d{digit}", 1)
        row = entry.read_array(name, source.row)  # (Y, L, B)
        return row[:, :, list(source.columns)]


def gather_distances(
    shards: ShardReader, sources: Sequence[PairSource], digit: str
) -> torch.Tensor:
    """A sample's distances to its references from the shards: (Y, L, R) float32."""
    return torch.cat([torch.from_numpy(shards.rows(source, digit)) for source in sources], dim=2)


def _salient_layer(cache: FeatureCache, key: str, layer: int) -> torch.Tensor:
    """The SNAMD features of the salient layer of one sample: (L, C)."""
    return torch.from_numpy(cache.read_array(key, "features", layer))


@task(name="reduce", **TASK_OPTIONS)
def reduce_samples(items: list[ReduceItem], config: MuscConfig, runtime: Runtime) -> StageCount:
    """Patch scores, anomaly maps and salient features of a chunk of samples (§III-C, §III-D).

    The CAE patch size is that of the 2D feature grid: the image side over the grid side.

    Args:
        items: the samples, their output keys and where their reference distances are.
        config: Interval Average ratio, image size, map blur, salient layer.
        runtime: cache and device.

    Returns:
        The work count. Each entry holds ``map`` (S, S) float32 (the sum of the modalities'
        maps), ``map_2d``/``map_3d`` and ``patch_2d`` (M,)/``patch_3d`` (G,) when scored, and
        ``salient`` (C2 + C3,); its meta holds ``score``, the maximum of the map.
    """
    cache = feature_cache(runtime.cache_url)
    todo = [item for item in items if not cache.has(item.key)]
    shards = ShardReader(cache)
    for item in todo:
        d2 = gather_distances(shards, item.sources, "2") if config.uses_2d else None
        d3 = gather_distances(shards, item.sources, "3") if config.uses_3d else None
        points = None
        if config.uses_3d:
            points = PointSample(*read_grouping(cache, item.sample.grouping, torch.device("cpu")))
        layer = config.salient_layer
        reduced = reduce_sample(
            d2,
            d3,
            points,
            None if d2 is None else _salient_layer(cache, item.sample.snamd_2d, layer),
            None if d3 is None else _salient_layer(cache, item.sample.snamd_3d, layer),
            0 if d2 is None else grid_patch_size(d2.shape[1], config.image_size),
            config,
        )
        arrays = {"map": reduced.map.numpy(), "salient": reduced.salient.numpy()}
        if reduced.patch_2d is not None:
            arrays["patch_2d"], arrays["map_2d"] = reduced.patch_2d.numpy(), reduced.map_2d.numpy()
        if reduced.patch_3d is not None:
            arrays["patch_3d"], arrays["map_3d"] = reduced.patch_3d.numpy(), reduced.map_3d.numpy()
        cache.write(item.key, arrays, meta={"score": float(reduced.map.max())})
    return StageCount("reduced", len(todo), len(items) - len(todo))
