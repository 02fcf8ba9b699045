"""The score-line and rescore flows against the in-memory core pipeline, caching and resume."""

import threading

import numpy as np
import pytest
import tifffile

from musc_core.features_2d import ViTFeatureExtractor
from musc_core.point_mae import PointFeatureExtractor
from tasks import backbones
from tasks.synthetic.generator import generate_line
from tests.flows.conftest import (
    SMALL,
    assert_matches,
    in_memory,
    pool_order,
    read_scores,
    run_line,
    run_rescore,
    small_config,
)

pytestmark = pytest.mark.usefixtures("prefect_server")


class ForwardCounter:
    """Counts the samples that go through each backbone in this process."""

    def __init__(self, monkeypatch):
        self.counts = {"2d": 0, "3d": 0}
        self._lock = threading.Lock()
        vit_extract = ViTFeatureExtractor.extract
        point_extract = PointFeatureExtractor.extract
        point_many = PointFeatureExtractor.extract_many

        def count_vit(extractor, images, *args, **kwargs):
            with self._lock:
                self.counts["2d"] += images.shape[0]
            return vit_extract(extractor, images, *args, **kwargs)

        def count_points(extractor, *args, **kwargs):
            with self._lock:
                self.counts["3d"] += 1
            return point_extract(extractor, *args, **kwargs)

        def count_many(extractor, points, *args, **kwargs):
            with self._lock:
                self.counts["3d"] += len(points)
            return point_many(extractor, points, *args, **kwargs)

        monkeypatch.setattr(ViTFeatureExtractor, "extract", count_vit)
        monkeypatch.setattr(PointFeatureExtractor, "extract", count_points)
        monkeypatch.setattr(PointFeatureExtractor, "extract_many", count_many)


def _computed(summary, stage):
    return summary["counts"].get(stage, {"computed": 0})["computed"]


@pytest.mark.slow
def test_one_shard_one_worker_equals_in_memory_pipeline(line, tmp_path):
    summary = run_line(
        data=str(line), storage=str(tmp_path / "store"), cluster="threads", workers=1,
        shard_size=100, batch="b1", **SMALL,
    )
    config = small_config()
    order = pool_order([line], config)
    reference = in_memory(order, config)
    assert summary["scored"] == 8 and summary["pool"] == 8 and summary["random_weights"]
    # one shard, one entry per modality
    assert summary["counts"]["pairs"] == {"computed": 2, "cached": 0}
    assert_matches(summary, reference, [n for _, n in order], map_atol=1e-5, score_atol=1e-5)


@pytest.mark.slow
def test_many_shards_two_dask_workers_equal_in_memory_pipeline(line, tmp_path):
    summary = run_line(
        data=str(line), storage=str(tmp_path / "store"), cluster="local", workers=2,
        shard_size=2, batch="b1", **SMALL,
    )
    config = small_config()
    order = pool_order([line], config)
    reference = in_memory(order, config)
    # 4 blocks of 2: 4 inside-block shards + 6 between blocks.
    assert summary["counts"]["pairs"] == {"computed": 20, "cached": 0}  # 10 shards × 2
    span = float(reference.maps.max() - reference.maps.min())
    # Tiles of different shapes sum in a different order (last-bit differences), which CAE's
    # rank remapping can turn into a swap of two neighbouring values: hence a tolerance.
    assert_matches(
        summary, reference, [n for _, n in order], map_atol=0.005 * span, score_atol=1e-3
    )


@pytest.mark.slow
def test_second_run_computes_nothing_and_rescore_loads_no_backbone(line, tmp_path, monkeypatch):
    store = str(tmp_path / "store")
    counter = ForwardCounter(monkeypatch)
    first = run_line(data=str(line), storage=store, cluster="threads", batch="b1", **SMALL)
    assert counter.counts == {"2d": 8, "3d": 8}
    second = run_line(data=str(line), storage=store, cluster="threads", batch="b2", **SMALL)
    assert counter.counts == {"2d": 8, "3d": 8}, "a second run must not run the backbones"
    for stage, count in second["counts"].items():
        assert count["computed"] == 0, stage
    assert read_scores(first["outputs"]["scores"]) == read_scores(second["outputs"]["scores"])

    def refuse(*args, **kwargs):
        raise AssertionError("rescore must not build a backbone")

    monkeypatch.setattr(backbones, "build_2d", refuse)
    monkeypatch.setattr(backbones, "build_3d", refuse)
    monkeypatch.setattr(ViTFeatureExtractor, "create", refuse)
    again = run_rescore(
        line="part", batch="b1", storage=store, out=str(tmp_path / "again"),
        interval_ratio=0.6, cluster="threads",
    )
    assert counter.counts == {"2d": 8, "3d": 8}
    assert _computed(again, "pairs") == 0 and _computed(again, "reduced") == 8
    assert _computed(again, "decisions") == 1, "new reduced entries, new decisions"
    monkeypatch.undo()
    fresh = run_line(
        data=str(line), storage=str(tmp_path / "fresh"), cluster="threads", batch="b1",
        interval_ratio=0.6, **SMALL,
    )
    rows = read_scores(again["outputs"]["scores"])
    fresh_rows = read_scores(fresh["outputs"]["scores"])
    assert rows == fresh_rows
    assert rows != read_scores(first["outputs"]["scores"])
    for row in rows.values():
        np.testing.assert_array_equal(
            np.load(f"{again['out']}/{row['map_file']}"),
            np.load(f"{fresh['out']}/{row['map_file']}"),
        )


@pytest.mark.slow
def test_interrupted_run_resumes_with_only_the_missing_shards(line, tmp_path, monkeypatch):
    import tasks.scoring as scoring

    store = str(tmp_path / "store")
    done = []
    real = scoring.pair_minima_tiled

    def fail_after_three(*args, **kwargs):
        if len(done) == 3:
            raise RuntimeError("worker lost (simulated)")
        result = real(*args, **kwargs)
        done.append(1)
        return result

    monkeypatch.setattr(scoring, "pair_minima_tiled", fail_after_three)
    with pytest.raises(Exception, match="simulated"):
        # one thread: the shards run one after another; the between-block ones call the patch
        run_line(data=str(line), storage=store, cluster="threads", workers=1, shard_size=2,
                   batch="b1", **SMALL)
    monkeypatch.undo()
    resumed = run_line(data=str(line), storage=store, cluster="threads", workers=1,
                         shard_size=2, batch="b1", **SMALL)
    pairs = resumed["counts"]["pairs"]
    assert pairs["computed"] + pairs["cached"] == 20  # 10 shards, one entry per modality
    assert pairs["cached"] >= 3 and pairs["computed"] == 20 - pairs["cached"]
    for stage in ("tokens_2d", "tokens_3d", "grouping", "snamd_2d", "snamd_3d"):
        assert resumed["counts"][stage] == {"computed": 0, "cached": 8}, stage
    reference = run_line(data=str(line), storage=str(tmp_path / "clean"), cluster="threads",
                           workers=1, shard_size=2, batch="b1", **SMALL)
    assert read_scores(resumed["outputs"]["scores"]) == read_scores(reference["outputs"]["scores"])


@pytest.mark.slow
def test_rolling_bank_night_two_equals_in_memory_union(line, tmp_path, monkeypatch):
    night2 = tmp_path / "night2"
    generate_line(night2, category="part", num_samples=5, image_size=64, defect_rate=0.4, seed=11)
    store = str(tmp_path / "store")
    run_line(data=str(line), storage=store, cluster="threads", batch="n1", shard_size=3, **SMALL)
    counter = ForwardCounter(monkeypatch)
    summary = run_line(
        data=str(night2), storage=store, cluster="threads", batch="n2", shard_size=3,
        reference_nights=1, clean_bank=False, **SMALL,
    )
    assert counter.counts == {"2d": 5, "3d": 5}, "only night 2's samples go through backbones"
    assert summary["bank"] == ["n1"] and summary["scored"] == 5 and summary["pool"] == 13
    config = small_config()
    order = pool_order([night2, line], config)
    reference = in_memory(order, config)
    span = float(reference.maps.max() - reference.maps.min())
    names = [name for _, name in order[:5]]
    assert_matches(summary, reference, names, map_atol=0.005 * span, score_atol=1e-3)


@pytest.mark.slow
def test_changed_input_file_recomputes_only_that_sample(line, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(line, data)
    store = str(tmp_path / "store")
    run_line(data=str(data), storage=store, cluster="threads", batch="b1", shard_size=4, **SMALL)
    image = data / "part" / "test" / "good" / "rgb" / "000.png"
    from PIL import Image

    pixels = np.asarray(Image.open(image)).copy()
    pixels[10:14, 10:14] = 255 - pixels[10:14, 10:14]
    Image.fromarray(pixels).save(image)
    again = run_line(data=str(data), storage=store, cluster="threads", batch="b2", shard_size=4,
                       **SMALL)
    for stage in ("tokens_2d", "snamd_2d"):
        assert again["counts"][stage] == {"computed": 1, "cached": 7}, stage
    # MVTec 3D-AD points are made from the XYZ map alone: a new image leaves them as they were
    for stage in ("grouping", "tokens_3d", "snamd_3d"):
        assert again["counts"][stage] == {"computed": 0, "cached": 8}, stage
    assert again["counts"]["reduced"]["computed"] == 8  # every sample has a new reference
    cloud = data / "part" / "test" / "good" / "xyz" / "000.tiff"
    xyz = tifffile.imread(cloud)
    xyz[xyz[..., 2] != 0] *= 1.01
    tifffile.imwrite(cloud, xyz, photometric="rgb")
    third = run_line(data=str(data), storage=store, cluster="threads", batch="b3", shard_size=4,
                       **SMALL)
    # the XYZ map cleans the image (MVTec 3D-AD): both modalities of that sample are new
    for stage in ("tokens_2d", "snamd_2d", "grouping", "tokens_3d", "snamd_3d"):
        assert third["counts"][stage] == {"computed": 1, "cached": 7}, stage
