"""The paper's evaluation protocol pieces: subsets, aggregation over seeds, published rows."""

import math

import pytest

from tasks.evaluation.paper_protocol import aggregate, split_subsets
from tasks.evaluation.published import COLUMNS, ROWS, published_mean


def test_subsets_are_a_random_equal_partition_fixed_by_the_seed():
    names = [f"s{i:02d}" for i in range(11)]
    parts = split_subsets(names, 3, seed=4)
    assert sorted(n for p in parts for n in p) == names
    assert sorted(len(p) for p in parts) == [3, 4, 4]
    assert parts == split_subsets(list(reversed(names)), 3, seed=4)
    assert parts != split_subsets(names, 3, seed=5)
    assert split_subsets(names, 1, seed=9) == [names]
    with pytest.raises(ValueError, match="at least 2"):
        split_subsets(names[:5], 3, seed=0)


def test_dataset_mean_is_averaged_over_seeds_of_category_means():
    keys = [k for k, _ in COLUMNS] + ["pro_30_exact"]
    per_seed = {
        0: {"a": dict.fromkeys(keys, 0.5), "b": dict.fromkeys(keys, 0.7)},
        1: {"a": dict.fromkeys(keys, 0.7), "b": {**dict.fromkeys(keys, 0.9), "pro_30": math.nan}},
    }
    result = aggregate(per_seed)
    assert result["categories"]["a"]["auroc_cls"] == pytest.approx(0.6)
    assert result["categories_std"]["a"]["auroc_cls"] == pytest.approx(0.1)
    assert result["mean"]["auroc_cls"] == pytest.approx(0.7)  # seeds: 0.6 and 0.8
    assert result["mean_std"]["auroc_cls"] == pytest.approx(0.1)
    assert result["categories"]["b"]["pro_30"] == pytest.approx(0.7)  # nan left out
    assert result["mean"]["pro_30"] == pytest.approx((0.6 + 0.7) / 2)


def test_published_rows_match_the_setting_or_say_how_they_differ():
    assert len({(r.dataset, r.modality, r.backbone, r.subsets) for r in ROWS}) == len(ROWS)
    assert all(len(r.values) == len(COLUMNS) for r in ROWS)
    row, note = published_mean("mvtec3d", "2d+3d", "vit_base_patch8_224.dino", 2)
    assert row.values[0] == 87.6 and "g=2" in row.source and note == ""
    row, note = published_mean("eyecandies", "3d", "vit_tiny_patch16_224", 3)
    assert row.values[0] == 69.1 and "g=1" in note
    row, note = published_mean("mvtec3d", "2d", "vit_tiny_patch16_224", 1)
    assert row.backbone == "ViT-B-8" and "not a backbone of the paper" in note
    row, _ = published_mean("visa", "2d", "vit_large_patch14_clip_336.openai", 1)
    assert "Table II" in row.source and row.values[-1] is None
    assert published_mean("mvtec", "3d", "x", 1)[0] is None
