"""Which references a sample is scored against under a budget R: strategies on one line.

Run from the repository root::

    python -m benchmarks.bench_references --samples 1000 --budget 150 --draws 5 \
        --out benchmarks/out/references.json

With a reference budget R every sample is scored against R of the other N − 1 samples
(Interval Average over those R). Which R matters: this benchmark scores one generated 2D line
(``--image-size`` px, 30 % defective, a ViT-S/8 with **random weights**; the line the
``budget`` section of ``bench_pipeline`` scores, written to ``--work`` and prepared exactly as
the pipeline prepares it) with the in-memory core, computes every sample's distances to every
other sample once (R = all), and then reduces each sample over the references a strategy
picks, so every strategy sees exactly the same distances. A content-hash order is an arbitrary
draw, so every strategy but ``all`` and ``nearest`` is run on ``--draws`` seeded permutations
standing for it (mean, min and max reported):

- ``all``: the N − 1 others (the reference result);
- ``cycle``: what the pipeline does today: samples in a content-hash order (here a seeded
  random permutation, which is what a hash order is), blocks of ``--block``, references from
  the sample's own block and then the blocks nearest on a cycle
  (:func:`musc_core.references.reference_plan`);
- ``random``: R others drawn uniformly per sample;
- ``nearest``: per sample, the R others nearest by a global descriptor (the mean of the
  salient layer's SNAMD features, cosine). Needs pairs between arbitrary samples, so shards
  would no longer be blocks: a bound on what descriptor-based choice can give;
- ``tour-cycle``: block-compatible: the samples laid out along a nearest-neighbour tour of the
  descriptors, then ``cycle`` on that order (neighbouring blocks are similar samples);
- ``tour-centroid``: the same blocks, each sample taking its own block and then the blocks
  whose mean descriptor is nearest to its block's: what the pipeline's
  ``reference_choice="similar"`` does (written here on its own, in float32, as a check; the
  pipeline's version is :mod:`musc_core.references` and ``tests/flows/test_similar_references.py``
  checks it against its definition).

Figures per strategy: image AUROC (RsCon scores) and pixel AP, the points against ``all``, and
the block pairs (shards) a strategy needs when it is block-compatible. Random weights: the
strategies are compared with each other only.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import machine_info, machine_line
from musc_core.anomaly_maps import sample_scores
from musc_core.config import MuscConfig
from musc_core.metrics import image_metrics, pixel_metrics
from musc_core.pipeline import features_2d, layer_distances
from musc_core.reduction import reduce_sample
from musc_core.references import reference_plan
from musc_core.rescoring import rscon
from tasks.backbones import BackboneSpec, build_backbones
from tasks.formats.datasets import read_dataset
from tasks.formats.prepare import prepare_records
from tasks.synthetic.generator import generate_line

RANDOM_NOTE = "random weights: the strategies are compared with each other only"
BACKBONE = "vit_small_patch8_224.dino"


def load_line(
    work: Path, n: int, size: int, seed: int, config: MuscConfig
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(N, 3, S, S) images, (N, S, S) masks and (N,) labels of a generated line, as prepared."""
    root = work / f"line{n}-{size}px-seed{seed}"
    if not (root / "part").exists():
        generate_line(root, category="part", num_samples=n, image_size=size, defect_rate=0.3,
                      seed=seed)
    prepared, aside = prepare_records(read_dataset(root, "mvtec3d", "part"), "mvtec3d", config)
    if aside:
        raise RuntimeError(f"{len(aside)} samples set aside, e.g. {aside[0]}")
    images = torch.stack([p.sample.image for p in prepared])
    masks = np.stack([p.mask.numpy() for p in prepared])
    labels = np.asarray([p.record.label for p in prepared])
    return images, masks, labels


def descriptors(salient: torch.Tensor) -> torch.Tensor:
    """(N, C) unit global descriptors: the mean of each sample's (M, C) salient features."""
    return torch.nn.functional.normalize(salient.mean(dim=1), dim=1)


def nearest_tour(desc: torch.Tensor) -> list[int]:
    """Samples in nearest-neighbour tour order, from sample 0 (cosine similarity)."""
    similarity = desc @ desc.T
    left = torch.ones(desc.shape[0], dtype=torch.bool)
    order = [0]
    left[0] = False
    while left.any():
        row = similarity[order[-1]].masked_fill(~left, -2.0)
        nxt = int(row.argmax())
        order.append(nxt)
        left[nxt] = False
    return order


def blocks_of(order: Sequence[int], block: int) -> list[list[int]]:
    """Consecutive blocks of ``block`` samples of an order."""
    return [list(order[i : i + block]) for i in range(0, len(order), block)]


def cycle_references(order: Sequence[int], block: int, budget: int) -> tuple[list[list[int]], int]:
    """References (by sample index) of the pipeline's block-cycle plan on an order; shards."""
    blocks = blocks_of(order, block)
    plan = reference_plan([len(b) for b in blocks], budget)
    refs: list[list[int]] = [[] for _ in order]
    for position, chosen in enumerate(plan.references):
        refs[order[position]] = [order[r] for r in chosen]
    return refs, len(plan.block_pairs)


def centroid_references(
    order: Sequence[int], block: int, budget: int, desc: torch.Tensor
) -> tuple[list[list[int]], int]:
    """Own block, then the blocks whose mean descriptor is nearest to the block's; shards."""
    blocks = blocks_of(order, block)
    centroids = torch.nn.functional.normalize(
        torch.stack([desc[b].mean(dim=0) for b in blocks]), dim=1
    )
    ranking = (centroids @ centroids.T).argsort(dim=1, descending=True)
    refs: list[list[int]] = [[] for _ in order]
    pairs: set[tuple[int, int]] = set()
    for b, members in enumerate(blocks):
        others = [int(o) for o in ranking[b] if int(o) != b]
        for sample in members:
            chosen = [m for m in members if m != sample][:budget]
            if chosen:
                pairs.add((b, b))
            for other in others:
                if len(chosen) >= budget:
                    break
                chosen += blocks[other][: budget - len(chosen)]
                pairs.add((min(b, other), max(b, other)))
            refs[sample] = chosen
    return refs, len(pairs)


def fixed_strategies(n: int, budget: int, desc: torch.Tensor) -> dict[str, list[list[int]]]:
    """The strategies that do not depend on a draw: all references, per-sample nearest."""
    similarity = desc @ desc.T
    similarity.fill_diagonal_(-2.0)
    nearest = [[int(j) for j in row] for row in similarity.topk(budget, dim=1).indices]
    return {"all": [[j for j in range(n) if j != i] for i in range(n)], "nearest": nearest}


def drawn_strategies(
    n: int, budget: int, block: int, desc: torch.Tensor, seed: int
) -> dict[str, tuple[list[list[int]], int | None]]:
    """The strategies of one draw (a seeded order for the content-hash order), with shards."""
    rng = np.random.default_rng(seed)
    hash_order = [int(i) for i in rng.permutation(n)]
    tour = [hash_order[i] for i in nearest_tour(desc[hash_order])]
    uniform = [
        [int(j) for j in rng.choice([k for k in range(n) if k != i], budget, replace=False)]
        for i in range(n)
    ]
    return {
        "cycle": cycle_references(hash_order, block, budget),
        "random": (uniform, None),
        "tour-cycle": cycle_references(tour, block, budget),
        "tour-centroid": centroid_references(tour, block, budget, desc),
    }


def evaluate(
    distances: torch.Tensor,
    references: list[list[int]],
    salient: torch.Tensor,
    masks: np.ndarray,
    labels: np.ndarray,
    patch_size: int,
    config: MuscConfig,
) -> dict[str, float]:
    """Image AUROC (RsCon scores) and pixel AP of every sample reduced over its references.

    Args:
        distances: (N, Y, M, N) every sample's distances to every sample (+inf on itself).
        references: per sample, the indices of its references.
        salient: (N, M, C) salient-layer features.
        masks: (N, S, S) ground truth.
        labels: (N,) 0/1.
        patch_size: ViT patch side.
        config: the core's settings.
    """
    maps, pooled = [], []
    for i, refs in enumerate(references):
        reduced = reduce_sample(
            distances[i][:, :, refs], None, None, salient[i], None, patch_size, config
        )
        maps.append(reduced.map)
        pooled.append(reduced.salient)
    stacked = torch.stack(maps)
    rescored = rscon(sample_scores(stacked), torch.stack(pooled), config.rescoring_windows)
    image = image_metrics(labels, rescored.numpy())
    pixel = pixel_metrics(masks, stacked.numpy())
    return {"image_auroc": image["auroc"], "pixel_ap": pixel["ap"]}


def run(work: Path, n: int, budget: int, block: int, size: int, seed: int, draws: int) -> dict:
    """The whole comparison; its figures."""
    config = MuscConfig(modality="2d", image_size=size)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    images, masks, labels = load_line(work, n, size, seed, config)
    timings["prepare_s"] = time.perf_counter() - start
    built = build_backbones(BackboneSpec(BACKBONE, "random"), config, torch.device("cpu"))
    extractor = built.extractor_2d
    start = time.perf_counter()
    feats = features_2d(images, extractor, config)
    timings["features_s"] = time.perf_counter() - start
    start = time.perf_counter()
    distances = torch.stack(layer_distances(feats, config), dim=1)  # (N, Y, M, N)
    timings["all_pairs_s"] = time.perf_counter() - start
    salient = feats.layers[config.salient_layer]
    desc = descriptors(salient)

    def score(refs: list[list[int]]) -> dict[str, float]:
        return evaluate(distances, refs, salient, masks, labels, extractor.patch_size, config)

    rows: dict[str, dict] = {}
    for name, refs in fixed_strategies(n, budget, desc).items():
        rows[name] = {**score(refs), "references": len(refs[0]), "draws": 1}
        print(f"  {name:>13}: image AUROC {rows[name]['image_auroc']:.3f}, pixel AP "
              f"{rows[name]['pixel_ap']:.3f}", flush=True)
    per_draw: dict[str, list[dict]] = {}
    for draw in range(draws):
        for name, (refs, shards) in drawn_strategies(n, budget, block, desc, seed + draw).items():
            figures = {**score(refs), "shards": shards}
            per_draw.setdefault(name, []).append(figures)
            print(f"  {name:>13} draw {draw}: image AUROC {figures['image_auroc']:.3f}, pixel AP "
                  f"{figures['pixel_ap']:.3f}, shards {shards}", flush=True)
    for name, figures in per_draw.items():
        row: dict[str, object] = {"references": budget, "draws": len(figures),
                                  "per_draw": figures}
        for metric in ("image_auroc", "pixel_ap"):
            values = [f[metric] for f in figures]
            row[metric] = float(np.mean(values))
            row[f"{metric}_min"] = float(min(values))
            row[f"{metric}_max"] = float(max(values))
        rows[name] = row
    reference = rows["all"]
    for row in rows.values():
        row["image_auroc_points"] = round(100 * (row["image_auroc"] - reference["image_auroc"]), 2)
        row["pixel_ap_points"] = round(100 * (row["pixel_ap"] - reference["pixel_ap"]), 2)
    for name, row in rows.items():
        print(f"  {name:>13}: image AUROC {row['image_auroc']:.3f} "
              f"({row['image_auroc_points']:+.1f} pt), pixel AP {row['pixel_ap']:.3f} "
              f"({row['pixel_ap_points']:+.1f} pt), {row['draws']} draw(s)", flush=True)
    return {
        "samples": n,
        "budget": budget,
        "block": block,
        "image_size": size,
        "seed": seed,
        "backbone": BACKBONE,
        "note": RANDOM_NOTE,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "strategies": rows,
    }


def main() -> None:
    """Parse the options, run, print and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="N, samples of the line")
    parser.add_argument("--budget", type=int, default=150, help="R, references per sample")
    parser.add_argument("--block", type=int, default=16, help="samples per block (shard size)")
    parser.add_argument("--image-size", type=int, default=128, help="image side (px)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the line and the draws")
    parser.add_argument("--draws", type=int, default=5, help="seeded orders per strategy")
    parser.add_argument("--work", default="benchmarks/out/references", help="the line's folder")
    parser.add_argument("--out", default=None, help="JSON file of the figures")
    args = parser.parse_args()
    machine = machine_info()
    print(f"reference strategies, N = {args.samples}, R = {args.budget} ({RANDOM_NOTE})")
    print(machine_line(machine), flush=True)
    result = run(Path(args.work), args.samples, args.budget, args.block, args.image_size,
                 args.seed, args.draws)
    result["machine"] = machine
    print(json.dumps(result["timings"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
