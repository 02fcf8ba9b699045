"""What a task needs from the process it runs in: its device, the feature cache, the backbones.

A worker process (a Dask worker, or the flow process with the thread-pool runner) keeps one
model of each backbone and one cache handle per thread, so a chunk of samples does not reload
weights. Each task uses its worker's GPU when there is one (``"auto"``), else the CPU; with
dask-cuda every worker sees exactly one GPU, so ``cuda`` is that worker's GPU.
"""

from __future__ import annotations

import atexit
import threading
from dataclasses import dataclass

import torch
from prefect import task

from musc_core.config import MuscConfig
from musc_core.features_2d import ViTFeatureExtractor
from tasks.backbones import (
    BackboneSpec,
    PointExtractor,
    backbone_identities,
    build_2d,
    build_3d,
    resolve_device,
)
from tasks.cache.keys import Identities
from tasks.cache.memory import MemoryCache, is_memory_url, memory_cache
from tasks.cache.store import FeatureCache
from tasks.stage import TASK_OPTIONS

_LOCK = threading.Lock()
_MODELS: dict[tuple, object] = {}
_LOCAL = threading.local()
_OPEN_CACHES: list[FeatureCache] = []


@dataclass(frozen=True)
class Runtime:
    """Where a task runs and what it writes to.

    Attributes:
        cache_url: feature-cache root (local path or ``s3://``), or an in-process cache
            (:func:`tasks.cache.memory.memory_cache_url`, the inspection station's scratch).
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda:N"``.
    """

    cache_url: str
    device: str = "auto"

    @property
    def torch_device(self) -> torch.device:
        """The resolved device of this process."""
        return resolve_device(self.device)


def feature_cache(url: str) -> FeatureCache | MemoryCache:
    """This thread's handle on the cache at ``url`` (S3 sessions are not shared by threads).

    An in-process cache's URL gives that cache itself (one per process, for every thread).
    """
    if is_memory_url(url):
        return memory_cache(url)
    caches = getattr(_LOCAL, "caches", None)
    if caches is None:
        caches = _LOCAL.caches = {}
    cache = caches.get(url)
    if cache is None:
        cache = caches[url] = FeatureCache(url)
        with _LOCK:
            _OPEN_CACHES.append(cache)
    return cache


@atexit.register
def _close_caches() -> None:
    """Close the S3 sessions of every cache handle when the process ends."""
    for cache in _OPEN_CACHES:
        cache.close()


def _model(key: tuple, build) -> object:
    with _LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = _MODELS[key] = build()
        return model


def extractor_2d(
    spec: BackboneSpec, config: MuscConfig, device: torch.device
) -> ViTFeatureExtractor:
    """This process's 2D backbone for a spec, built once and kept."""
    key = ("2d", spec.name_2d, spec.weights_2d, spec.patch_size_2d, config.image_size, str(device))
    return _model(key, lambda: build_2d(spec, config).to(device))


def extractor_3d(spec: BackboneSpec, config: MuscConfig, device: torch.device) -> PointExtractor:
    """This process's 3D backbone for a spec, built once and kept."""
    key = ("3d", spec.name_3d, spec.weights_3d, config.point_batchnorm, str(device))
    return _model(key, lambda: build_3d(spec, config).to(device))


@task(name="identify-backbones", **TASK_OPTIONS)
def identify_backbones(spec: BackboneSpec, config: MuscConfig, runtime: Runtime) -> Identities:
    """Backbone identities for cache keys; a pretrained 2D model is kept for extraction."""
    return backbone_identities(
        spec, config, load_2d=lambda: extractor_2d(spec, config, runtime.torch_device)
    )
