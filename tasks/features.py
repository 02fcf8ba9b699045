"""Per-sample stages as Prefect tasks: preprocess, 2D/3D features, IPG grouping, SNAMD.

Every feature task takes a group of blocks, each a list of samples as ``(input key, output
key)`` pairs; block by block (one batch each, so a worker's memory is bounded by the block
size, never by the group's), it skips the blocks whose outputs are all valid in the cache,
computes the others on its worker's device and writes one cache entry per missing sample. A
block some of whose outputs are cached (a run stopped, or its storage filled up, half-way
through it) is computed whole all the same: a sample's result depends, in its last bits, on
the batch it was computed in, so a resumed run gives the bits of an undisturbed one. Tasks
return a :class:`~tasks.stage.StageCount`, never arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from prefect import task

from musc_core.aggregation import snamd_2d, snamd_3d
from musc_core.config import MuscConfig
from musc_core.grouping import Grouping
from musc_core.pipeline import POINT_BATCH, point_dtype, prepare_points, vit_autocast
from tasks.backbones import BackboneSpec
from tasks.cache.keys import PreparedKeys
from tasks.cache.store import FeatureCache
from tasks.discover import DiscoveredSample
from tasks.formats.prepare import PreparedSample, PrepInfo, check_prepared, prepare_record
from tasks.runtime import Runtime, extractor_2d, extractor_3d, feature_cache
from tasks.stage import TASK_OPTIONS, StageCount

GROUPING_ARRAYS = ("points", "pixel_index", "centre_index", "centres", "members", "curvature")


def _missing(cache: FeatureCache, keys: Sequence[str]) -> list[int]:
    """Positions of the keys without a complete cache entry."""
    return [i for i, key in enumerate(keys) if not cache.has(key)]


def _batches(todo: Sequence[int], count: int, size: int) -> list[range]:
    """The batches of a block that hold a missing sample.

    Args:
        todo: positions of the block's missing samples.
        count: samples of the block.
        size: samples per batch (the block is cut in runs of ``size`` from its start).

    Returns:
        The positions of each such batch, whole: the batches an undisturbed run computes.
    """
    missing = set(todo)
    return [
        batch
        for batch in (range(start, min(start + size, count)) for start in range(0, count, size))
        if missing.intersection(batch)
    ]


def _count(blocks: Sequence[Sequence[object]]) -> int:
    """Samples of a group of blocks."""
    return sum(len(block) for block in blocks)


def _tensor(cache: FeatureCache, key: str, name: str, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(cache.read_array(key, name)).to(device)


def read_grouping(cache: FeatureCache, key: str, device: torch.device) -> tuple:
    """A cached grouping: ``(points (P, 3), pixel_index (P,), Grouping)`` on ``device``."""
    stored, _ = cache.read(key)
    arrays = {name: torch.from_numpy(stored[name]).to(device) for name in GROUPING_ARRAYS}
    grouping = Grouping(
        arrays["centre_index"], arrays["centres"], arrays["members"], arrays["curvature"]
    )
    return arrays["points"], arrays["pixel_index"], grouping


def _cached_info(cache: FeatureCache, keys: Sequence[str]) -> PrepInfo | None:
    """The preparation facts stored with a sample's entries, or None when one is missing.

    Where two entries hold a fact, the first one's is taken.
    """
    info = PrepInfo()
    for key in keys:
        if not cache.has(key):
            return None
        info = info.merged(PrepInfo.from_meta(cache.meta(key)))
    return info


def _write_prepared(cache: FeatureCache, keys: PreparedKeys, prepared: PreparedSample) -> None:
    """One entry per prepared part (image, XYZ map, mask) that is not cached yet."""
    meta = prepared.info.as_meta()
    parts = (
        (keys.image, "image", prepared.sample.image),
        (keys.points, "xyz", prepared.sample.xyz),
        (keys.mask, "mask", prepared.mask),
    )
    for key, name, tensor in parts:
        if key is None or tensor is None or cache.has(key):
            continue
        array = tensor.numpy()
        cache.write(key, {name: array.astype(np.uint8) if name == "mask" else array}, meta=meta)


@task(name="prepare", **TASK_OPTIONS)
def prepare_samples(
    items: list[tuple[DiscoveredSample, PreparedKeys]],
    fmt: str,
    config: MuscConfig,
    runtime: Runtime,
) -> list[tuple[str, str | None, str | None]]:
    """Load, clean and resize samples into the cache; unusable ones are reported, not raised.

    Samples are prepared on one thread per core of the worker (``torch.get_num_threads()``).
    A sample is read again only when one of its entries (image, XYZ map, mask) is missing;
    the checks that depend on the run's settings (:func:`tasks.formats.prepare.check_prepared`) run
    every time, on the facts stored with the entries.

    Args:
        items: samples and the keys of their prepared entries.
        fmt: dataset format (selects the cleaning).
        config: image size and modality.
        runtime: cache location.

    Returns:
        Per sample ``(name, problem, cleaning)``: problem None when its entries are valid,
        else naming the file and what is wrong with it (the flow sets such samples aside);
        cleaning the dataset cleaning applied (see :class:`tasks.formats.prepare.PrepInfo`).
    """
    def prepare(item: tuple[DiscoveredSample, PreparedKeys]) -> tuple[str, str | None, str | None]:
        sample, keys = item
        cache = feature_cache(runtime.cache_url)  # this thread's handle
        record = sample.record
        # Each entry's own facts first: the mask entry's mask size, the points' foreground.
        needed = [k for k in (keys.mask, keys.points, keys.image) if k is not None]
        try:
            info = _cached_info(cache, needed)
            if info is None:
                prepared = prepare_record(record, fmt, config)
                _write_prepared(cache, keys, prepared)
                info = prepared.info
            check_prepared(record, info, config)
        except (ValueError, OSError) as error:
            return record.name, str(error), None
        return record.name, None, info.cleaning

    # Reading and cleaning run mostly outside the GIL (image decoding, numpy, the KD-tree):
    # one thread per core of this worker.
    threads = max(1, min(len(items), torch.get_num_threads()))
    if threads == 1:
        return [prepare(item) for item in items]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="prepare") as pool:
        return list(pool.map(prepare, items))


@task(name="extract-2d", **TASK_OPTIONS)
def extract_2d(
    blocks: list[list[tuple[str, str]]], spec: BackboneSpec, config: MuscConfig, runtime: Runtime
) -> StageCount:
    """ViT patch tokens of the configured layers for blocks of prepared samples.

    Args:
        blocks: per block, ``(prepared image key, tokens key)`` per sample.
        spec: the 2D backbone.
        config: layers, image size, ViT dtype.
        runtime: cache and device.

    Returns:
        The work count. Each entry holds ``tokens`` (Y, M, C) float32, the raw LayerNorm
        tokens of the Y layers.
    """
    cache = feature_cache(runtime.cache_url)
    done = 0
    for items in blocks:
        todo = _missing(cache, [out for _, out in items])
        done += len(todo)
        if not todo:
            continue
        device = runtime.torch_device
        extractor = extractor_2d(spec, config, device)
        images = torch.stack([_tensor(cache, image, "image", device) for image, _ in items])
        with vit_autocast(config, device):
            tokens = extractor.extract(images, config.layers_2d)
        stacked = torch.stack([t.float() for t in tokens], dim=1).cpu().numpy()  # (n, Y, M, C)
        for i in todo:
            cache.write(items[i][1], {"tokens": stacked[i]})
    return StageCount("tokens_2d", done, _count(blocks) - done)


@task(name="aggregate-2d", **TASK_OPTIONS)
def aggregate_2d(
    blocks: list[list[tuple[str, str]]], config: MuscConfig, runtime: Runtime
) -> StageCount:
    """2D SNAMD of cached tokens (paper §III-B).

    Args:
        blocks: per block, ``(tokens key, SNAMD key)`` per sample.
        config: aggregation degrees.
        runtime: cache and device.

    Returns:
        The work count. Each entry holds ``features`` (Y, M, C) float32, L2-normalized.
    """
    cache = feature_cache(runtime.cache_url)
    done = 0
    for items in blocks:
        todo = _missing(cache, [out for _, out in items])
        done += len(todo)
        if not todo:
            continue
        device = runtime.torch_device
        tokens = torch.stack([_tensor(cache, key, "tokens", device) for key, _ in items])
        side = int(round(tokens.shape[2] ** 0.5))
        layers = [
            snamd_2d(tokens[:, y], side, config.aggregation_degrees)
            for y in range(tokens.shape[1])
        ]
        features = torch.stack(layers, dim=1).cpu().numpy()
        for i in todo:
            # One layer per chunk: the reduction reads the salient layer only.
            cache.write(items[i][1], {"features": features[i]}, chunk_rows=1)
    return StageCount("snamd_2d", done, _count(blocks) - done)


@task(name="group", **TASK_OPTIONS)
def group_samples(
    blocks: list[list[tuple[str, str]]], config: MuscConfig, runtime: Runtime
) -> StageCount:
    """Foreground points, unit-sphere normalization and IPG grouping (paper §III-A).

    Cached on their own (``points``, ``pixel_index``, ``centre_index``, ``centres``,
    ``members``, ``curvature``), so another 3D backbone reuses them.

    Args:
        blocks: per block, ``(prepared XYZ-map key, grouping key)`` per sample.
        config: G, K, K_iter, C_thr.
        runtime: cache and device.

    Returns:
        The work count.
    """
    cache = feature_cache(runtime.cache_url)
    items = [item for block in blocks for item in block]  # one sample at a time anyway
    todo = _missing(cache, [out for _, out in items])
    device = runtime.torch_device
    for i in todo:
        point_sample = prepare_points(_tensor(cache, items[i][0], "xyz", device), config)
        grouping = point_sample.grouping
        arrays = {
            "points": point_sample.points,
            "pixel_index": point_sample.pixel_index,
            "centre_index": grouping.centre_index,
            "centres": grouping.centres,
            "members": grouping.members,
            "curvature": grouping.curvature,
        }
        cache.write(items[i][1], {k: v.cpu().numpy() for k, v in arrays.items()})
    return StageCount("grouping", len(todo), len(items) - len(todo))


@task(name="extract-3d", **TASK_OPTIONS)
def extract_3d(
    blocks: list[list[tuple[str, str]]], spec: BackboneSpec, config: MuscConfig, runtime: Runtime
) -> StageCount:
    """Point-MAE group tokens of the configured layers (paper §III-A).

    Args:
        blocks: per block, ``(grouping key, tokens key)`` per sample.
        spec: the 3D backbone.
        config: layers and BatchNorm mode.
        runtime: cache and device.

    Returns:
        The work count. Each entry holds ``tokens`` (Y, G, C) float32.
    """
    cache = feature_cache(runtime.cache_url)
    done = 0
    for items in blocks:
        todo = _missing(cache, [out for _, out in items])
        done += len(todo)
        if not todo:
            continue
        device = runtime.torch_device
        extractor = extractor_3d(spec, config, device)
        missing = set(todo)
        for batch in _batches(todo, len(items), POINT_BATCH):
            grouped = [read_grouping(cache, items[i][0], device) for i in batch]
            tokens = extractor.extract_many(
                [points for points, _, _ in grouped],
                [grouping for _, _, grouping in grouped],
                config.layers_3d,
                point_dtype(config, device),
            )
            stacked = torch.stack(tokens, dim=1).cpu().numpy()  # (B, Y, G, C)
            for row, i in enumerate(batch):
                if i in missing:
                    cache.write(items[i][1], {"tokens": stacked[row]})
    return StageCount("tokens_3d", done, _count(blocks) - done)


@task(name="aggregate-3d", **TASK_OPTIONS)
def aggregate_3d(
    blocks: list[list[tuple[str, str, str]]], config: MuscConfig, runtime: Runtime
) -> StageCount:
    """3D SNAMD of cached tokens with the surface-consistent gate (paper §III-B).

    Args:
        blocks: per block, ``(tokens key, grouping key, SNAMD key)`` per sample.
        config: aggregation degrees and curvature threshold.
        runtime: cache and device.

    Returns:
        The work count. Each entry holds ``features`` (Y, G, C) float32.
    """
    cache = feature_cache(runtime.cache_url)
    done = 0
    for items in blocks:
        todo = _missing(cache, [out for _, _, out in items])
        done += len(todo)
        if not todo:
            continue
        device = runtime.torch_device
        tokens = torch.stack([_tensor(cache, key, "tokens", device) for key, _, _ in items])
        centres = torch.stack([_tensor(cache, key, "centres", device) for _, key, _ in items])
        curvature = torch.stack(
            [_tensor(cache, key, "curvature", device) for _, key, _ in items]
        )
        layers = [
            snamd_3d(
                tokens[:, y],
                centres,
                curvature,
                config.aggregation_degrees,
                config.curvature_threshold,
            )
            for y in range(tokens.shape[1])
        ]
        features = torch.stack(layers, dim=1).cpu().numpy()
        for i in todo:
            cache.write(items[i][2], {"features": features[i]}, chunk_rows=1)
    return StageCount("snamd_3d", done, _count(blocks) - done)


@task(name="check-features", **TASK_OPTIONS)
def missing_features(items: list[tuple[str, str]], runtime: Runtime) -> list[str]:
    """Names of the samples whose SNAMD features are not in the cache.

    Args:
        items: ``(sample name, SNAMD key)`` pairs (both modalities' keys may be listed).
        runtime: cache location.

    Returns:
        The names, in order, each once.
    """
    cache = feature_cache(runtime.cache_url)
    missing: list[str] = []
    for name, key in items:
        if name not in missing and not cache.has(key):
            missing.append(name)
    return missing


@task(name="drop-entry", **TASK_OPTIONS)
def drop_entry(key: str, runtime: Runtime) -> None:
    """Delete a cache entry found corrupted, so that the next attempt recomputes it."""
    feature_cache(runtime.cache_url).delete(key)
