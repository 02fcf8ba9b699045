"""Flow tests: one local Prefect server for the session, small synthetic lines, helpers."""

import csv
import os

import numpy as np
import pytest
import torch

from musc_core.config import MuscConfig
from musc_core.pipeline import score
from tasks.backbones import BackboneSpec, backbone_identities, build_backbones
from tasks.cache.keys import prepared_keys
from tasks.discover import discover_line
from tasks.formats.prepare import prepare_records
from tasks.synthetic.generator import generate_line

SIZE = 64
#: score_line parameters of the small test configuration (random tiny backbones).
SMALL = dict(
    data_format="mvtec3d",
    modality="2d+3d",
    backbone_2d="vit_tiny_patch16_224",
    weights_2d="random",
    weights_3d="random",
    patch_size_2d=8,
    image_size=SIZE,
    num_groups=32,
    group_size=16,
    ipg_step=8,
    distance_dtype="float32",
    vit_dtype="float32",
    point_dtype="float32",
)
SPEC = BackboneSpec("vit_tiny_patch16_224", "random", "random", 8)


def small_config(**changes) -> MuscConfig:
    values = dict(
        modality="2d+3d", image_size=SIZE, num_groups=32, group_size=16, ipg_step=8,
        distance_dtype="float32", vit_dtype="float32", point_dtype="float32",
    )
    values.update(changes)
    return MuscConfig(**values)


@pytest.fixture(scope="session")
def line(tmp_path_factory):
    """A line of 8 samples (64 px) in MVTec 3D-AD layout."""
    root = tmp_path_factory.mktemp("line")
    generate_line(root, category="part", num_samples=8, image_size=SIZE, defect_rate=0.5, seed=3)
    return root


def read_scores(path) -> dict[str, dict[str, str]]:
    """scores.csv rows by sample name."""
    with open(path, encoding="utf-8") as handle:
        rows = [r for r in csv.reader(handle) if r and not r[0].startswith("#")]
    return {r[1]: dict(zip(rows[0], r, strict=True)) for r in rows[1:]}


def pool_order(roots_and_batches, config) -> list[tuple[str, str]]:
    """(root, name) of the pool's samples in the order the flow lays them out: each batch in
    the order given, its samples sorted by the hash of their input files."""
    order = []
    for root in roots_and_batches:
        found, _ = discover_line(str(root), "mvtec3d", "part")
        keyed = sorted(
            (prepared_keys(s.digests, "mvtec3d", "part", config).content, s.record.name)
            for s in found
        )
        order += [(str(root), name) for _, name in keyed]
    return order


def pool_samples(order, config):
    """The core samples of the given (root, name) samples, prepared as the flow prepares them."""
    from tasks.formats.datasets import read_dataset

    samples = []
    for root, name in order:
        records = [r for r in read_dataset(root, "mvtec3d", "part") if r.name == name]
        prepared, aside = prepare_records(records, "mvtec3d", config)
        assert not aside
        samples.append(prepared[0].sample)
    return samples


def in_memory(order, config):
    """The in-memory core pipeline over the given (root, name) samples, in that order."""
    samples = pool_samples(order, config)
    built = build_backbones(SPEC, config, torch.device("cpu"))
    return score(samples, config, built.extractor_2d, built.extractor_3d)


def assert_matches(summary, reference, names, map_atol, score_atol):
    """The flow's written maps and scores against an in-memory result for ``names``."""
    rows = read_scores(summary["outputs"]["scores"])
    for index, name in enumerate(names):
        row = rows[name]
        written = np.load(f"{summary['out']}/{row['map_file']}")
        np.testing.assert_allclose(written, reference.maps[index].numpy(), atol=map_atol)
        assert abs(float(row["score"]) - float(reference.scores[index])) <= score_atol
        assert abs(float(row["score_rescored"]) - float(reference.scores_rescored[index])) <= (
            score_atol
        )


def identities():
    return backbone_identities(SPEC, small_config())


def upload_tree(local_root, url):
    """Every file below ``local_root`` as an object below ``url`` (same relative keys)."""
    from infra.storage import open_filesystem

    fs, root = open_filesystem(url)
    for folder, _, names in os.walk(local_root):
        for name in names:
            path = os.path.join(folder, name)
            key = os.path.relpath(path, local_root).replace(os.sep, "/")
            with open(path, "rb") as handle:
                fs.pipe_file(f"{root}/{key}", handle.read())
    return url


def run_line(**values):
    """The score-line flow with its settings given flat (each goes to the model declaring it)."""
    from flows.score_line import score_line
    from flows.settings import SCORE_LINE, split_settings

    return score_line(**split_settings(SCORE_LINE, values, loose=("batch",)))


def run_rescore(**values):
    """The rescore flow with its settings given flat."""
    from flows.rescore import rescore
    from flows.settings import RESCORE, split_settings

    return rescore(**split_settings(RESCORE, values))


def run_score_new(**values):
    """The score-new flow with its settings given flat."""
    from flows.score_new import score_new
    from flows.settings import SCORE_NEW, split_settings

    return score_new(**split_settings(SCORE_NEW, values))
