"""The dtypes a run computes in: each worker's answer, and what a cluster's workers agree on."""

import dataclasses

import pytest

from infra.cluster import THIS_PROCESS, on_every_worker
from musc_core import hardware
from musc_core.config import MuscConfig
from tasks.runtime import agreed_dtypes, worker_dtypes

AUTO = MuscConfig()
FAST = {"vit_dtype": "bfloat16", "point_dtype": "bfloat16", "distance_dtype": "bfloat16"}
SLOW = {"vit_dtype": "float32", "point_dtype": "float32", "distance_dtype": "float32"}


def test_a_worker_answers_with_its_own_detection(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert worker_dtypes(AUTO, "cpu") == FAST
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert worker_dtypes(AUTO, "cpu") == SLOW
    refused = worker_dtypes(dataclasses.replace(AUTO, vit_dtype="bfloat16"), "cpu")
    assert isinstance(refused, str) and "vit_dtype=bfloat16 needs native bfloat16" in refused
    assert worker_dtypes(dataclasses.replace(AUTO, vit_dtype="bfloat16"), "cpu",
                         ("distance_dtype",)) == {"distance_dtype": "float32"}


def test_workers_of_one_kind_keep_their_dtype():
    for answer in (FAST, SLOW):
        resolved, warnings = agreed_dtypes(AUTO, {"tcp://a:1": answer, "tcp://b:1": answer})
        assert {name: getattr(resolved, name) for name in answer} == answer
        assert warnings == []
        assert dataclasses.replace(resolved, **dict.fromkeys(answer, "auto")) == AUTO


def test_workers_of_two_kinds_compute_in_float32():
    mixed = {**FAST, "point_dtype": "float32"}  # e.g. a GPU worker with a point setting pinned
    resolved, warnings = agreed_dtypes(
        AUTO, {"tcp://gpu:1": mixed, "tcp://avx2:1": SLOW, "tcp://avx2:2": SLOW}
    )
    assert (resolved.vit_dtype, resolved.point_dtype, resolved.distance_dtype) == (
        "float32", "float32", "float32"
    )
    assert len(warnings) == 2  # vit and distance: the point setting agreed
    assert warnings[0].startswith("vit_dtype=auto resolves differently")
    assert "bfloat16 on 1, float32 on 2" in warnings[0] and "tcp://gpu:1" in warnings[0]
    assert warnings[1].startswith("distance_dtype=auto")


def test_a_worker_without_native_bf16_refuses_an_explicit_bfloat16():
    with pytest.raises(ValueError, match=r"worker tcp://avx2:1 of 2: vit_dtype=bfloat16 needs"):
        agreed_dtypes(AUTO, {"tcp://fast:1": FAST,
                             "tcp://avx2:1": "vit_dtype=bfloat16 needs native bfloat16"})
    with pytest.raises(ValueError, match="no worker answered"):
        agreed_dtypes(AUTO, {})


def test_outside_a_dask_cluster_the_flow_process_answers(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert on_every_worker(worker_dtypes, AUTO, "cpu") == {THIS_PROCESS: SLOW}
