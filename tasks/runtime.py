"""What a task needs from the process it runs in: its device, the feature cache, the backbones.

A worker process (a Dask worker, or the flow process with the thread-pool runner) keeps one
model of each backbone and one cache handle per thread, so a chunk of samples does not reload
weights. Each task uses its worker's GPU when there is one (``"auto"``), else the CPU; with
dask-cuda every worker sees exactly one GPU, so ``cuda`` is that worker's GPU.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from prefect import task

from musc_core.config import MuscConfig
from musc_core.features_2d import ViTFeatureExtractor
from musc_core.hardware import DTYPE_SETTINGS, resolved_dtypes
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


def worker_dtypes(
    config: MuscConfig, device: str, settings: tuple[str, ...] = DTYPE_SETTINGS
) -> dict[str, str] | str:
    """What this worker process computes each dtype setting in, on its tasks' device.

    Run on every worker of a cluster (see :func:`agreed_dtypes`) before a run derives its keys.

    Args:
        config: the settings as given.
        device: the tasks' device option (``auto``, ``cpu``, ``cuda:N``).
        settings: which dtype settings to resolve.

    Returns:
        ``{"vit_dtype": "bfloat16", ...}``, or the refusal's message where an explicit
        ``bfloat16`` has no native bf16 on this worker.
    """
    try:
        return resolved_dtypes(config, resolve_device(device), settings)
    except ValueError as error:
        return str(error)


def agreed_dtypes(
    config: MuscConfig,
    answers: Mapping[str, dict[str, str] | str],
    settings: tuple[str, ...] = DTYPE_SETTINGS,
) -> tuple[MuscConfig, list[str]]:
    """The settings a run computes in on a cluster, from every worker's :func:`worker_dtypes`.

    Cache keys name these dtypes, so every worker must compute in them: a setting all workers
    resolve alike takes that dtype; an ``auto`` that workers of different kinds resolve
    differently (bf16 on some, float32 on others) takes ``float32``, which every worker
    computes natively.

    Args:
        config: the settings as given.
        answers: each worker's answer, by worker.
        settings: the dtype settings to resolve (the others keep their value).

    Returns:
        ``config`` with each of ``settings`` as ``"float32"`` or ``"bfloat16"``, and one
        warning per setting that fell back to float32.

    Raises:
        ValueError: a worker refused an explicit ``bfloat16`` (naming it), or no answer.
    """
    if not answers:
        raise ValueError("no worker answered: the cluster has no worker")
    refused = {worker: answer for worker, answer in answers.items() if isinstance(answer, str)}
    if refused:
        worker, message = sorted(refused.items())[0]
        raise ValueError(f"worker {worker} of {len(answers)}: {message}")
    resolved: dict[str, str] = {}
    warnings: list[str] = []
    for name in settings:
        kinds: dict[str, list[str]] = {}
        for worker, answer in sorted(answers.items()):
            kinds.setdefault(answer[name], []).append(worker)
        if len(kinds) == 1:
            resolved[name] = next(iter(kinds))
            continue
        resolved[name] = "float32"
        counts = ", ".join(f"{dtype} on {len(kinds[dtype])}" for dtype in sorted(kinds))
        warnings.append(
            f"{name}={getattr(config, name)} resolves differently on the workers ({counts}, "
            f"e.g. {kinds['bfloat16'][0]} against {kinds['float32'][0]}): the run computes "
            "it in float32 on every worker; for bfloat16, use a cluster whose workers all "
            "have native bf16"
        )
    return replace(config, **resolved), warnings


@task(name="identify-backbones", **TASK_OPTIONS)
def identify_backbones(spec: BackboneSpec, config: MuscConfig, runtime: Runtime) -> Identities:
    """Backbone identities for cache keys; a pretrained 2D model is kept for extraction."""
    return backbone_identities(
        spec, config, load_2d=lambda: extractor_2d(spec, config, runtime.torch_device)
    )
