"""Paper-style evaluation of a benchmark dataset: runs of a line's stages composed per protocol.

For each category of the dataset and each seed, the category's test set is split into g
random subsets (:func:`tasks.evaluation.paper_protocol.split_subsets`), each subset is one
``score_line`` run
(line ``eval-<category>``, batch ``<eval id>-s<seed>-<k>of<g>``), and the category's metrics
are computed over the union of its subsets; the seeds are then averaged and the table is
written in the paper's layout beside the paper's published means (see
:mod:`tasks.evaluation.paper_protocol` for the protocol and :mod:`tasks.evaluation.published` for
the paper's numbers).
The feature cache is content-addressed, so every sample goes through the backbones once
whatever the number of seeds: another seed only computes new pair shards and reductions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flows.line_request import line_request
from flows.line_stages import run_line
from flows.locations import cache_url, eval_line, eval_tag
from flows.settings import AlgorithmBase, Backbones, LineInput, LineRun, RollingBank
from tasks.cache.store import FeatureCache
from tasks.evaluation.paper_protocol import (
    aggregate,
    collect_run,
    csv_rows,
    json_safe,
    markdown_table,
    split_subsets,
    union_metrics,
)
from tasks.evaluation.published import COLUMNS, published_mean
from tasks.formats.datasets import list_categories, read_dataset
from tasks.records.result_store import RANDOM_WEIGHTS_WARNING, ResultStore, safe_file_stem

#: Called after each subset run with (category, seed, subset index, g, the run's summary).
Progress = Callable[[str, int, int, int, dict], None]


@dataclass(frozen=True)
class BenchmarkResult:
    """What an evaluation wrote and found.

    Attributes:
        table: the JSON payload (also in ``table.json``).
        markdown: the markdown table (also in ``table.md``).
        outputs: written files by kind (``json``, ``markdown``, ``csv``).
    """

    table: dict
    markdown: str
    outputs: dict[str, str]


def evaluate_benchmark(
    data: str,
    data_format: str,
    out: str,
    backbones: Backbones,
    algorithm: AlgorithmBase,
    run: LineRun,
    reference_budget: int | None = None,
    subsets: int = 1,
    seeds: Sequence[int] = (0,),
    categories: Sequence[str] | None = None,
    eval_id: str = "eval",
    progress: Progress | None = None,
) -> BenchmarkResult:
    """Score every category of a dataset per the paper's protocol and write the table.

    Args:
        data: dataset root.
        data_format: ``mvtec3d``, ``eyecandies``, ``mvtec``, ``visa``, ``btad`` or ``mpdd``.
        out: output prefix: ``table.{json,md,csv}`` and ``runs/<category>/s<seed>-<k>of<g>/``.
        backbones: the feature extractors and their weights.
        algorithm: MuSc-V2's settings.
        run: storage root of the feature cache and the runs' batch records, cluster, workers,
            device and block size (its ``out`` is not used: each run writes below ``out``).
        reference_budget: most references per sample (None: all of its subset).
        subsets: g, subsets per category (1: each category scored whole).
        seeds: seeds of the random partitions (only the first is used when g = 1).
        categories: the categories to score (default: all of the dataset).
        eval_id: prefix of the runs' batch ids.
        progress: called after each run.

    Returns:
        The table, its markdown and the written files.
    """
    seeds = list(seeds)[:1] if subsets == 1 else list(seeds)
    if not seeds:
        raise ValueError("at least one seed is needed")
    names = list(categories or list_categories(data, data_format))
    storage = run.storage
    bank = RollingBank(reference_budget=reference_budget)
    cache = FeatureCache(cache_url(storage))
    per_seed: dict[int, dict[str, dict[str, float]]] = {seed: {} for seed in seeds}
    runs: list[dict] = []
    random_weights = False
    for category in names:
        samples = [r.name for r in read_dataset(data, data_format, category)]
        for seed in seeds:
            collected = []
            for index, part in enumerate(split_subsets(samples, subsets, seed), start=1):
                tag = eval_tag(seed, index, subsets)
                request = line_request(
                    LineInput(data=data, data_format=data_format, category=category,
                              line=eval_line(category), samples=part),
                    f"{eval_id}-{tag}", backbones, algorithm, bank,
                    run.model_copy(update={
                        "out": f"{out.rstrip('/')}/runs/{safe_file_stem(category)}/{tag}"
                    }),
                )
                summary = run_line(request, run.cluster, run.workers)
                random_weights = random_weights or bool(summary["random_weights"])
                collected.append(collect_run(summary, storage, cache))
                runs.append({
                    "category": category, "seed": seed, "subset": index,
                    "samples": len(part), "scored": summary["scored"],
                    "set_aside": len(summary["set_aside"]), "out": summary["out"],
                    "seconds": summary["seconds"],
                })
                if progress is not None:
                    progress(category, seed, index, subsets, summary)
            metrics = union_metrics(collected)
            if metrics is None:
                raise ValueError(f"{category}: the samples carry no labels; nothing to evaluate")
            per_seed[seed][category] = metrics
    summary = aggregate(per_seed)
    modality = algorithm.modality
    backbone = backbones.backbone_2d
    published, note = published_mean(data_format, modality, backbone, subsets)
    warning = RANDOM_WEIGHTS_WARNING if random_weights else None
    backbones = {"2d": backbone, "3d": "Point-MAE", "2d+3d": f"{backbone} + Point-MAE"}
    title = (
        f"{data_format}, {modality} ({backbones[modality]}), g={subsets}, "
        f"seed(s) {', '.join(map(str, seeds))}"
    )
    markdown = markdown_table(
        title, summary, published, note, subsets > 1 and len(seeds) > 1, warning
    )
    table = {
        "warning": warning,
        "random_weights": random_weights,
        "dataset": data,
        "format": data_format,
        "modality": modality,
        "backbone_2d": backbone,
        "subsets": subsets,
        "seeds": seeds,
        "protocol": (
            "each category's test set split at random into g subsets of equal size (per "
            "seed), each scored on its own; metrics over the union of the subsets; category "
            "values averaged over seeds; dataset mean = mean over categories per seed, "
            "averaged over seeds (std over seeds)"
        ),
        "columns": {key: name for key, name in COLUMNS},
        "categories": summary["categories"],
        "categories_std": summary["categories_std"],
        "mean": summary["mean"],
        "mean_std": summary["mean_std"],
        "published": None if published is None else {
            "source": published.source,
            "backbone": published.backbone,
            "subsets": published.subsets,
            "values": published.as_fractions(),
            "note": note,
        },
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "runs": runs,
    }
    store = ResultStore(out)
    outputs = {
        "json": store.write_json("table.json", json_safe(table)),
        "markdown": store.write_text("table.md", markdown),
        "csv": store.write_csv("table.csv", csv_rows(summary, published), comment=warning or ""),
    }
    return BenchmarkResult(json_safe(table), markdown, outputs)
