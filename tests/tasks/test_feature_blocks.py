"""Feature tasks on a block whose outputs are cached in part (a run stopped, or its storage
filled up, half-way through it): the missing entries are the bits an undisturbed run stores."""

import numpy as np
import pytest

from tasks.backbones import BackboneSpec
from tasks.cache.keys import prepared_keys
from tasks.cache.store import FeatureCache, cache_key
from tasks.discover import discover_line
from tasks.features import (
    _batches,
    aggregate_2d,
    aggregate_3d,
    extract_2d,
    extract_3d,
    group_samples,
    prepare_samples,
)
from tasks.runtime import Runtime
from tasks.stage import StageCount
from tasks.synthetic.generator import generate_line
from tests.flows.conftest import SIZE, SPEC, small_config

SAMPLES = 6


def test_a_block_is_cut_in_batches_from_its_start_and_only_those_missing_a_sample_run():
    assert _batches([1], 6, 4) == [range(0, 4)]
    assert _batches([5], 6, 4) == [range(4, 6)]
    assert _batches([0, 5], 6, 4) == [range(0, 4), range(4, 6)]
    assert _batches([], 6, 4) == []


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """A block of 6 prepared samples, every feature stage run once; cache, runtime, keys."""
    root = tmp_path_factory.mktemp("line")
    generate_line(root, category="part", num_samples=SAMPLES, image_size=SIZE, seed=5)
    config = small_config()
    runtime = Runtime(str(tmp_path_factory.mktemp("store") / "cache"), "cpu")
    found, _ = discover_line(str(root), "mvtec3d", "part")
    prepared = [prepared_keys(s.digests, "mvtec3d", "part", config) for s in found]
    assert all(p is None for _, p, _ in prepare_samples.fn(
        list(zip(found, prepared, strict=True)), "mvtec3d", config, runtime
    ))
    keys = {
        stage: [cache_key({"stage": stage, "sample": i}) for i in range(SAMPLES)]
        for stage in ("tokens_2d", "snamd_2d", "grouping", "tokens_3d", "snamd_3d")
    }
    stages = _stages(config, runtime, SPEC, prepared, keys)
    for stage in stages:
        assert stage() == StageCount(stage.name, SAMPLES, 0)
    return FeatureCache(runtime.cache_url), stages, keys


class _Stage:
    """One feature task over the block, by the name of the stage it counts."""

    def __init__(self, name, run):
        self.name, self.run = name, run

    def __call__(self):
        return self.run()


def _stages(config, runtime, spec: BackboneSpec, prepared, keys):
    """The five feature tasks over one block of every sample, in the order a run has them."""
    k = keys
    block = range(SAMPLES)
    return [
        _Stage("tokens_2d", lambda: extract_2d.fn(
            [[(prepared[i].image, k["tokens_2d"][i]) for i in block]], spec, config, runtime)),
        _Stage("snamd_2d", lambda: aggregate_2d.fn(
            [[(k["tokens_2d"][i], k["snamd_2d"][i]) for i in block]], config, runtime)),
        _Stage("grouping", lambda: group_samples.fn(
            [[(prepared[i].points, k["grouping"][i]) for i in block]], config, runtime)),
        _Stage("tokens_3d", lambda: extract_3d.fn(
            [[(k["grouping"][i], k["tokens_3d"][i]) for i in block]], spec, config, runtime)),
        _Stage("snamd_3d", lambda: aggregate_3d.fn(
            [[(k["tokens_3d"][i], k["grouping"][i], k["snamd_3d"][i]) for i in block]],
            config, runtime)),
    ]


@pytest.mark.parametrize("stage", ["tokens_2d", "snamd_2d", "tokens_3d", "snamd_3d"])
@pytest.mark.parametrize("missing", [[1], [0, 5]])
def test_missing_entries_of_a_partly_cached_block_are_the_undisturbed_bits(
    features, stage, missing
):
    cache, stages, keys = features
    run = next(s for s in stages if s.name == stage)
    name = "tokens" if stage.startswith("tokens") else "features"
    before = {i: cache.read_array(keys[stage][i], name) for i in missing}
    for i in missing:
        cache.delete(keys[stage][i])
    assert run() == StageCount(stage, len(missing), SAMPLES - len(missing))
    for i in missing:
        assert np.array_equal(cache.read_array(keys[stage][i], name), before[i]), i
