"""Similar references under a budget: the flow against the core reduced over the same references.

The references are derived here from their definition (the global descriptors of the in-memory
SNAMD features, a brute-force nearest-neighbour tour, blocks ranked by brute force), the maps
and scores from the core's own per-sample reduction over every pair's distances.
"""

import numpy as np
import pytest
import torch

from musc_core.anomaly_maps import sample_scores
from musc_core.pipeline import features_2d, features_3d, layer_distances, prepare_points
from musc_core.reduction import reduce_sample
from musc_core.rescoring import rscon
from tasks.backbones import build_backbones
from tasks.synthetic.generator import generate_line
from tests.core.test_references import _brute_tour
from tests.flows.conftest import (
    SMALL,
    SPEC,
    pool_order,
    pool_samples,
    read_scores,
    run_line,
    run_rescore,
    small_config,
)

pytestmark = pytest.mark.usefixtures("prefect_server")

BUDGET = 4
BLOCK = 3


def _unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm()


def _expected_references(feats_2d, feats_3d, config) -> list[list[int]]:
    """Per pool sample (content order), its references by the definition of "similar"."""
    layer = config.salient_layer
    n = feats_2d.layers[0].shape[0]
    desc = torch.stack([
        torch.cat([_unit(feats_2d.layers[layer][i].double().mean(0)),
                   _unit(feats_3d.layers[layer][i].double().mean(0))]) / 2**0.5
        for i in range(n)
    ])
    tour = _brute_tour(desc)
    blocks = [tour[i : i + BLOCK] for i in range(0, n, BLOCK)]
    centroids = [_unit(desc[b].mean(0)) for b in blocks]
    references = [[] for _ in range(n)]
    for b, members in enumerate(blocks):
        others = sorted((o for o in range(len(blocks)) if o != b),
                        key=lambda o: (-float(centroids[b] @ centroids[o]), o))
        for sample in members:
            chosen = [m for m in members if m != sample]
            for other in others:
                chosen += blocks[other]
            references[sample] = chosen[:BUDGET]
    return references


@pytest.mark.slow
def test_similar_references_equal_the_core_over_the_same_references(tmp_path):
    root = tmp_path / "line"
    generate_line(root, category="part", num_samples=10, image_size=64, defect_rate=0.4, seed=11)
    settings = dict(data=str(root), storage=str(tmp_path / "store"), cluster="threads",
                    workers=1, shard_size=BLOCK, reference_budget=BUDGET, **SMALL)
    summary = run_line(batch="b1", **settings)
    config = small_config()
    assert config.reference_choice == "similar"  # the default under a budget
    order = pool_order([root], config)
    samples = pool_samples(order, config)
    built = build_backbones(SPEC, config, torch.device("cpu"))
    images = torch.stack([s.image for s in samples])
    points = [prepare_points(s.xyz, config) for s in samples]
    feats_2d = features_2d(images, built.extractor_2d, config)
    feats_3d = features_3d(points, built.extractor_3d, config)
    d2 = torch.stack(layer_distances(feats_2d, config), dim=1)  # (N, Y, M, N)
    d3 = torch.stack(layer_distances(feats_3d, config), dim=1)
    references = _expected_references(feats_2d, feats_3d, config)
    layer = config.salient_layer
    reduced = [
        reduce_sample(d2[i][:, :, refs], d3[i][:, :, refs], points[i],
                      feats_2d.layers[layer][i], feats_3d.layers[layer][i],
                      built.extractor_2d.patch_size, config)
        for i, refs in enumerate(references)
    ]
    maps = torch.stack([r.map for r in reduced])
    scores = sample_scores(maps)
    rescored = rscon(scores, torch.stack([r.salient for r in reduced]), config.rescoring_windows)

    rows = read_scores(summary["outputs"]["scores"])
    assert summary["scored"] == 10
    for i, (_, name) in enumerate(order):
        written = np.load(f"{summary['out']}/{rows[name]['map_file']}")
        np.testing.assert_allclose(written, maps[i].numpy(), atol=1e-5)
        assert abs(float(rows[name]["score"]) - float(scores[i])) <= 1e-5
        assert abs(float(rows[name]["score_rescored"]) - float(rescored[i])) <= 1e-5

    # The batch record holds the blocks it was scored in: a re-score finds every entry.
    again = run_rescore(line="part", batch="b1", storage=settings["storage"],
                        cluster="threads", workers=1)
    assert again["counts"]["pairs"]["computed"] == 0
    assert again["counts"]["reduced"]["computed"] == 0
    rescored_rows = read_scores(again["outputs"]["scores"])
    for name, row in rows.items():
        assert rescored_rows[name]["score_rescored"] == row["score_rescored"]

    # The cycle choice is another plan over the same cached features.
    cycle = run_line(batch="b2", reference_choice="cycle", **settings)
    assert cycle["counts"]["snamd_2d"]["computed"] == 0
    cycle_rows = read_scores(cycle["outputs"]["scores"])
    assert any(cycle_rows[n]["score"] != rows[n]["score"] for n in rows)
