"""Whether timm's pretrained weights can be had: from the local cache, or from the hub.

Without network, timm (through ``huggingface_hub``) retries the hub for minutes before it
gives up. The ``musc`` command asks here first: the hub is probed once with a short TCP
connect, and when it cannot be reached the run goes offline (``HF_HUB_OFFLINE=1``, inherited
by the Dask workers) if the weights are in the local cache, or is refused at once otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from infra.storage import tcp_reachable

#: Seconds the reachability probe waits for the hub to accept a connection.
PROBE_TIMEOUT = 1.5
DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    """The Hugging Face hub endpoint (``HF_ENDPOINT`` or huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "").strip() or DEFAULT_ENDPOINT


def offline_requested() -> bool:
    """Whether the environment already says not to use the hub (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> Path:
    """The local hub cache (``HF_HUB_CACHE``, ``HF_HOME``/hub or ~/.cache/huggingface/hub)."""
    explicit = os.environ.get("HF_HUB_CACHE", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME", "").strip()
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "huggingface"
    return base / "hub"


def cached_timm_weights(name: str, cache: Path | None = None) -> bool:
    """Whether the local hub cache holds a snapshot of timm's weights for model ``name``.

    timm keeps its pretrained weights on the hub as ``timm/<architecture>.<tag>``; a name
    without a tag matches any cached tag of the architecture.
    """
    cache = cache or hub_cache_dir()
    wanted = f"models--timm--{name}"
    for folder in cache.glob("models--timm--*") if cache.is_dir() else ():
        if folder.name == wanted or ("." not in name and folder.name.startswith(wanted + ".")):
            snapshots = folder / "snapshots"
            if snapshots.is_dir() and any(p.is_file() for p in snapshots.rglob("*")):
                return True
    return False


def pretrained_weights_problem(name: str) -> str | None:
    """Why timm's pretrained weights of ``name`` cannot be loaded here, or None when they can.

    Probes the hub once (unless ``HF_HUB_OFFLINE`` is set). When it cannot be reached but the
    weights are cached, sets ``HF_HUB_OFFLINE=1`` for this process and its workers, so that
    loading them tries no download.
    """
    if not offline_requested():
        if tcp_reachable(hub_endpoint(), PROBE_TIMEOUT):
            return None
        host = urlsplit(hub_endpoint()).hostname
        why = f"the hub ({host}) cannot be reached"
    else:
        why = "HF_HUB_OFFLINE is set"
    if cached_timm_weights(name):
        os.environ["HF_HUB_OFFLINE"] = "1"
        return None
    return (
        f"timm pretrained weights for {name!r} are not in the local cache ({hub_cache_dir()}) "
        f"and {why}"
    )
