"""Keys per worker kind: a run's entries are keyed by the dtypes its workers computed in.

Two CPU kinds are simulated by patching the bf16 detection (``cpu_has_fast_bf16``): with the
thread-pool runner the tasks run in this process, so the patch is their worker's hardware; a
local Dask cluster's worker processes are patched one by one.
"""

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from prefect import flow

from flows.locations import cache_url
from flows.stages import run_dtypes
from infra.cluster import task_runner
from musc_core import hardware
from musc_core.config import MuscConfig
from musc_core.hardware import DTYPE_SETTINGS
from musc_core.pipeline import vit_autocast
from tasks.backbones import build_2d
from tasks.cache.keys import PreparedKeys, sample_keys
from tasks.cache.store import FeatureCache
from tasks.planning.bank import record_identities
from tasks.records.batch_record import read_batch_record
from tasks.runtime import Runtime
from tests.flows.conftest import (
    SMALL,
    SPEC,
    read_scores,
    run_line,
    run_rescore,
    run_score_new,
    small_config,
)

pytestmark = pytest.mark.usefixtures("prefect_server")

LAYERS = {"layers_2d": (1, 2), "layers_3d": (1, 2)}  # cheap also where bf16 is emulated
AUTO = {**SMALL, **LAYERS, **dict.fromkeys(DTYPE_SETTINGS, "auto"), "device": "cpu"}
FEATURE_STAGES = ("tokens_2d", "snamd_2d", "tokens_3d", "snamd_3d", "pairs", "reduced")


def _kind(monkeypatch, fast_bf16: bool) -> None:
    """Make this process's workers (the thread pool's) a CPU kind with or without native bf16."""
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: fast_bf16)


def _computed(summary, stage):
    return summary["counts"].get(stage, {"computed": 0})["computed"]


def _recorded_keys(store, batch):
    """The feature keys of a batch's samples, in recorded order, and the record."""
    record = read_batch_record(store, "part", batch)
    config = dataclasses.replace(record.musc_config(), **record.dtypes)
    identities = record_identities(record)
    return [
        sample_keys(PreparedKeys(**s.prepared), config, identities) for s in record.samples
    ], record


def test_each_worker_kind_writes_and_rescores_its_own_entries(line, tmp_path, monkeypatch):
    store = str(tmp_path / "store")
    _kind(monkeypatch, True)
    fast = run_line(data=str(line), storage=store, cluster="threads", batch="fast", **AUTO)
    # A new part scored on the float32 kind against the bf16 batch (a copy of the storage that
    # holds only that batch's entries): the bank's entries are found under the keys its batch
    # wrote, the part is computed in float32.
    _kind(monkeypatch, False)
    shutil.copytree(store, tmp_path / "bf16-only")
    name = sorted(read_scores(fast["outputs"]["scores"]))[0]
    defect, stem = name.split("/")
    folder = line / "part" / "test" / defect
    new = run_score_new(
        line="part", inputs=[str(folder / "rgb" / f"{stem}.png")],
        xyz=[str(folder / "xyz" / f"{stem}.tiff")], bank=["fast"], clean_bank=False,
        storage=str(tmp_path / "bf16-only"), out=str(tmp_path / "new"), cluster="threads",
        device="cpu",
    )
    assert new["scored"] == 1 and new["pool"] == 8
    assert _computed(new, "tokens_2d") == _computed(new, "tokens_3d") == 1
    assert {name: new["config"][name] for name in DTYPE_SETTINGS} == dict.fromkeys(
        DTYPE_SETTINGS, "float32"
    )

    slow = run_line(data=str(line), storage=store, cluster="threads", batch="slow", **AUTO)
    # The float32 worker found none of the bf16 entries: it computed every dtype-dependent
    # entry itself, and reused only the grouping (no dtype) and the prepared samples.
    for stage in FEATURE_STAGES:
        assert _computed(slow, stage) == _computed(fast, stage) > 0, stage
    assert _computed(slow, "grouping") == 0 and _computed(fast, "grouping") == 8

    fast_keys, fast_record = _recorded_keys(store, "fast")
    slow_keys, slow_record = _recorded_keys(store, "slow")
    assert fast_record.config == slow_record.config and fast_record.config["vit_dtype"] == "auto"
    assert fast_record.dtypes == dict.fromkeys(DTYPE_SETTINGS, "bfloat16")
    assert slow_record.dtypes == dict.fromkeys(DTYPE_SETTINGS, "float32")
    for summary, dtype in ((fast, "bfloat16"), (slow, "float32")):  # run.json's config
        assert {name: summary["config"][name] for name in DTYPE_SETTINGS} == dict.fromkeys(
            DTYPE_SETTINGS, dtype
        )
    # The float32 entries have the keys of an explicit float32 run (SMALL's, stored caches').
    explicit = small_config(**LAYERS)
    identities = record_identities(slow_record)
    assert slow_keys == [sample_keys(k.prepared, explicit, identities) for k in slow_keys]
    bf16 = dataclasses.replace(explicit, **dict.fromkeys(DTYPE_SETTINGS, "bfloat16"))
    assert fast_keys == [sample_keys(k.prepared, bf16, identities) for k in slow_keys]

    # Each entry holds what its dtype computes: the ViT tokens of the block, as the core
    # computes them in that dtype.
    cache = FeatureCache(cache_url(store))
    by_prepared = {k.prepared.image: k for k in fast_keys}
    order = [k.prepared.image for k in slow_keys]
    assert sorted(order) == sorted(by_prepared)
    images = torch.stack([torch.from_numpy(cache.read_array(key, "image")) for key in order])
    extractor = build_2d(SPEC, explicit)
    entries = {
        "bfloat16": np.stack([cache.read_array(by_prepared[k].tokens_2d, "tokens") for k in order]),
        "float32": np.stack([cache.read_array(k.tokens_2d, "tokens") for k in slow_keys]),
    }
    for dtype, stored in entries.items():
        _kind(monkeypatch, dtype == "bfloat16")
        with vit_autocast(dataclasses.replace(explicit, vit_dtype=dtype), torch.device("cpu")):
            tokens = extractor.extract(images, explicit.layers_2d)
        expected = torch.stack([t.float() for t in tokens], dim=1).numpy()
        np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(entries["bfloat16"] - entries["float32"]).max() > 1e-3

    # A re-score on either kind reads its own batch's entries: every shard and reduction is
    # found, and the scores are the batch's.
    rescored = {}
    for batch, fast_bf16 in (("fast", True), ("slow", False)):
        _kind(monkeypatch, fast_bf16)
        rescored[batch] = run_rescore(
            line="part", batch=batch, storage=store, out=str(tmp_path / f"again-{batch}"),
            cluster="threads", device="cpu",
        )
        for stage in ("pairs", "reduced"):
            assert _computed(rescored[batch], stage) == 0, (batch, stage)
    assert read_scores(rescored["fast"]["outputs"]["scores"]) == read_scores(
        fast["outputs"]["scores"]
    )
    assert read_scores(rescored["slow"]["outputs"]["scores"]) == read_scores(
        slow["outputs"]["scores"]
    )
    assert read_scores(fast["outputs"]["scores"]) != read_scores(slow["outputs"]["scores"])

    # The bf16 batch re-scored on the float32 kind still reads its own (bf16) features; its
    # float32 distances of them are new shards (the float32 batch's are of float32 features).
    _kind(monkeypatch, False)
    cross = run_rescore(
        line="part", batch="fast", storage=store, out=str(tmp_path / "cross"),
        cluster="threads", device="cpu",
    )
    assert _computed(cross, "pairs") == _computed(fast, "pairs")
    assert _computed(cross, "reduced") == 8


@flow(name="probe-dtypes")
def _probe(config: MuscConfig) -> MuscConfig:
    return run_dtypes(config, Runtime("unused", "cpu"))


def _pretend(fast_bf16: bool):
    """A function that makes the worker process it runs in a kind with or without bf16."""

    def set_kind() -> None:
        from musc_core import hardware as worker_hardware

        worker_hardware.cpu_has_fast_bf16 = lambda: fast_bf16

    return set_kind


@pytest.mark.slow
def test_a_dask_run_asks_its_workers_and_computes_in_float32_where_they_differ(monkeypatch):
    from distributed import Client, LocalCluster

    _kind(monkeypatch, False)  # the flow's own process: no bf16 (it computes nothing)
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        workers = sorted(client.scheduler_info()["workers"])
        client.run(_pretend(True))
        runner = task_runner(cluster.scheduler_address, 1)
        both = _probe.with_options(task_runner=runner)(MuscConfig())
        assert {name: getattr(both, name) for name in DTYPE_SETTINGS} == dict.fromkeys(
            DTYPE_SETTINGS, "bfloat16"
        )
        client.run(_pretend(False), workers=[workers[1]])
        runner = task_runner(cluster.scheduler_address, 1)
        mixed = _probe.with_options(task_runner=runner)(MuscConfig())
        assert {name: getattr(mixed, name) for name in DTYPE_SETTINGS} == dict.fromkeys(
            DTYPE_SETTINGS, "float32"
        )
        with pytest.raises(ValueError, match=f"worker {workers[1]} of 2: vit_dtype=bfloat16"):
            runner = task_runner(cluster.scheduler_address, 1)
            _probe.with_options(task_runner=runner)(MuscConfig(vit_dtype="bfloat16"))
