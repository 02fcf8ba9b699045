"""Lines as users hold them: pre-cleaned MVTec 3D-AD, modalities sharing cache entries,
relabelled samples keeping their features."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tasks.formats.prepare import PLANE_ALREADY_REMOVED, PLANE_REMOVED
from tasks.synthetic.generator import generate_line
from tests.flows.conftest import (
    SMALL,
    assert_matches,
    in_memory,
    pool_order,
    read_scores,
    run_line,
    small_config,
)
from tests.flows.test_score_line import ForwardCounter
from tests.tasks.formats.test_prepare_datasets import pre_clean

pytestmark = pytest.mark.usefixtures("prefect_server")
FEATURE_STAGES = ("tokens_2d", "snamd_2d", "grouping", "tokens_3d", "snamd_3d")


def _run(data, store, batch, **changes):
    return run_line(
        data=str(data), storage=str(store), cluster="threads", batch=batch,
        **{**SMALL, **changes},
    )


def _counts(summary, stage):
    return summary["counts"].get(stage, {"computed": 0, "cached": 0})


@pytest.mark.slow
def test_pre_cleaned_mvtec3d_line_is_scored_and_says_so(tmp_path):
    raw, cleaned = tmp_path / "raw", tmp_path / "cleaned"
    for root in (raw, cleaned):
        generate_line(root, category="part", num_samples=6, image_size=64, defect_rate=0.5,
                      seed=8)
    pre_clean(cleaned)
    first = _run(raw, tmp_path / "store-raw", "b1", shard_size=100)
    second = _run(cleaned, tmp_path / "store-cleaned", "b1", shard_size=100)
    assert second["set_aside"] == [] and second["scored"] == 6
    run = json.loads(open(second["outputs"]["run"]).read())
    names = sorted(read_scores(second["outputs"]["scores"]))
    assert run["preparation"] == {"cleaning": {PLANE_ALREADY_REMOVED: 6}, "pre_cleaned": names}
    assert first["preparation"] == {"cleaning": {PLANE_REMOVED: 6}, "pre_cleaned": []}
    # Independent truth: the in-memory core on the pre-cleaned files, in the flow's order.
    # (The raw line prepares to the same tensors, tests/tasks/formats/test_prepare_datasets.py; its
    # files hash otherwise, so its pool comes in another order.)
    config = small_config()
    order = pool_order([cleaned], config)
    reference = in_memory(order, config)
    assert_matches(second, reference, [n for _, n in order], map_atol=1e-5, score_atol=1e-5)


@pytest.mark.slow
def test_2d_3d_run_after_a_2d_and_a_3d_run_reuses_every_feature(line, tmp_path, monkeypatch):
    store = tmp_path / "store"
    only_2d = _run(line, store, "b2d", modality="2d")
    only_3d = _run(line, store, "b3d", modality="3d")
    assert _counts(only_2d, "tokens_2d")["computed"] == 8
    assert _counts(only_3d, "grouping")["computed"] == 8  # 2D entries are not 3D ones
    assert _counts(only_3d, "tokens_3d")["computed"] == 8
    counter = ForwardCounter(monkeypatch)
    both = _run(line, store, "b2d3d", modality="2d+3d")
    assert counter.counts == {"2d": 0, "3d": 0}
    for stage in FEATURE_STAGES:
        assert _counts(both, stage) == {"computed": 0, "cached": 8}, stage
    # one pair entry per modality, blocks laid out alike: every pair distance is cached too
    assert _counts(both, "pairs") == {"computed": 0, "cached": 2}  # one shard, 2 modalities
    # the cross-modal reduction itself is new work
    assert _counts(both, "reduced")["computed"] == 8
    assert both["scored"] == 8 and both["set_aside"] == []


@pytest.mark.slow
def test_relabelling_a_sample_keeps_its_features_and_scores(line, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(line, data)
    store = tmp_path / "store"
    first = _run(data, store, "b1")
    mask_file = sorted((data / "part" / "test" / "good" / "gt").glob("*.png"))[0]
    mask = np.zeros(np.asarray(Image.open(mask_file)).shape[:2], np.uint8)
    mask[10:20, 10:20] = 255  # a relabelled sample: the mask gains a defect region
    Image.fromarray(mask).save(mask_file)
    counter = ForwardCounter(monkeypatch)
    second = _run(data, store, "b2")
    assert counter.counts == {"2d": 0, "3d": 0}
    for stage in (*FEATURE_STAGES, "pairs", "reduced"):
        assert _counts(second, stage)["computed"] == 0, stage
    assert read_scores(second["outputs"]["scores"]).keys() == read_scores(
        first["outputs"]["scores"]
    ).keys()
    assert second["metrics"]["pixel_auroc"] != first["metrics"]["pixel_auroc"]
