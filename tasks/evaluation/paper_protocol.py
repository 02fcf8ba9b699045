"""The paper's evaluation protocol on a benchmark dataset, and its table (``musc eval``).

Protocol (paper Sec. IV-A1 and IV-A3, Table I): each category's unlabeled test set is scored
on its own. To simulate small lines it is randomly partitioned into g subsets of equal size
(sizes differ by at most one; :func:`split_subsets`), each subset is scored independently
(mutual scoring and RsCon only inside the subset), and "the anomaly maps from all subsets are
collected and the metrics computed jointly": metrics are computed once per category over the
union of its subsets (:func:`union_metrics`). This is repeated for several random seeds
(the paper uses 10); a category's value is the mean over seeds (with the standard deviation
over seeds), the dataset's value the mean over categories, computed per seed and then
averaged (its standard deviation over seeds is the paper's "± std"). With g = 1 there is one
partition and the seeds are not used.

Columns (the paper's): AUROC-cls, F1-max-cls and AP-cls on the sample scores after RsCon;
AUROC-seg, F1-max-seg and AP-seg over every pixel of every sample; PRO@30% is the reference
release's 200-threshold AUPRO up to FPR 0.3 (``pixel_aupro_200``, what the paper's numbers
were computed with; the exact MVTec-style AUPRO is reported as ``pro_30_exact`` in the JSON).
Values are fractions in [0, 1] in JSON and CSV, percent in the markdown table (as the paper).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np

from tasks.cache.store import FeatureCache
from tasks.evaluation.metrics import line_metrics
from tasks.evaluation.published import COLUMNS, PublishedRow
from tasks.records.batch_record import read_batch_record
from tasks.records.result_store import ResultStore

#: Our metric behind each column of the paper's tables (after RsCon for the image level).
METRIC_OF_COLUMN = {
    "auroc_cls": "image_auroc",
    "f1_max_cls": "image_f1_max",
    "ap_cls": "image_ap",
    "auroc_seg": "pixel_auroc",
    "f1_max_seg": "pixel_f1_max",
    "ap_seg": "pixel_ap",
    "pro_30": "pixel_aupro_200",
}
#: Extra columns kept in the JSON and CSV (not in the paper's tables).
EXTRA_COLUMNS = {"pro_30_exact": "pixel_aupro"}


def split_subsets(names: Sequence[str], subsets: int, seed: int) -> list[list[str]]:
    """A random partition of a category's samples into g subsets of (nearly) equal size.

    Args:
        names: the category's sample names.
        subsets: g ≥ 1.
        seed: the random seed of the partition.

    Returns:
        g disjoint lists covering every name, each in name order; sizes differ by at most 1.
        With g = 1 the one subset is every name, whatever the seed.

    Raises:
        ValueError: g < 1, or a subset would hold fewer than 2 samples (no mutual scoring).
    """
    if subsets < 1:
        raise ValueError(f"the number of subsets must be at least 1, got {subsets}")
    ordered = sorted(names)
    if len(ordered) < 2 * subsets:
        raise ValueError(
            f"{len(ordered)} samples cannot be split into {subsets} subsets of at least 2"
        )
    if subsets == 1:
        return [ordered]
    order = np.random.default_rng(seed).permutation(len(ordered))
    return [sorted(ordered[i] for i in part) for part in np.array_split(order, subsets)]


def collect_run(summary: dict, storage: str, cache: FeatureCache) -> dict[str, list]:
    """The scored samples of one ``score_line`` run: labels, scores, maps and masks.

    Args:
        summary: the run's summary (its ``out``, ``line`` and ``batch``).
        storage: the run's storage root (its batch record names each sample's prepared keys).
        cache: the feature cache (mask entries hold the ground-truth masks).

    Returns:
        ``{"names", "labels", "scores", "rescored", "maps", "masks"}``, one entry per sample
        (masks None where the dataset has none).
    """
    store = ResultStore(summary["out"])
    text = store.read_bytes("scores.csv").decode("utf-8")
    rows = [r for r in csv.reader(io.StringIO(text)) if r and not r[0].startswith("#")]
    body = [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]
    record = read_batch_record(storage, summary["line"], summary["batch"])
    prepared = {s.name: s.prepared for s in record.samples}
    out: dict[str, list] = {k: [] for k in ("names", "labels", "scores", "rescored", "maps",
                                            "masks")}
    for row in body:
        mask_key = prepared[row["name"]].get("mask")
        mask = None if mask_key is None else cache.read_array(mask_key, "mask").astype(bool)
        out["names"].append(row["name"])
        out["labels"].append(None if row["label"] == "" else int(row["label"]))
        out["scores"].append(float(row["score"]))
        out["rescored"].append(float(row["score_rescored"]))
        out["maps"].append(np.load(io.BytesIO(store.read_bytes(row["map_file"]))))
        if mask is None and out["labels"][-1] == 0:  # labelled normal without a mask file
            mask = np.zeros(out["maps"][-1].shape, dtype=bool)
        out["masks"].append(mask)
    return out


def union_metrics(runs: Sequence[Mapping[str, list]]) -> dict[str, float] | None:
    """Metrics of a category over the union of its subsets' samples (the paper's protocol).

    Args:
        runs: :func:`collect_run` of each subset.

    Returns:
        The paper's columns (and the extra ones) as fractions, nan where undefined; None when
        the samples carry no labels.
    """
    joined: dict[str, list] = {k: [] for k in ("labels", "scores", "rescored", "maps", "masks")}
    for run in runs:
        for key in joined:
            joined[key] += list(run[key])
    if not joined["labels"]:
        return None
    metrics = line_metrics(
        joined["labels"],
        np.asarray(joined["scores"]),
        np.asarray(joined["rescored"]),
        joined["masks"],
        np.stack(joined["maps"]),
    )
    if metrics is None:
        return None
    columns = {**METRIC_OF_COLUMN, **EXTRA_COLUMNS}
    return {key: float(metrics.get(name, math.nan)) for key, name in columns.items()}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std over the finite values (nan, nan when none is)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite))


def aggregate(per_seed: Mapping[int, Mapping[str, Mapping[str, float]]]) -> dict:
    """Means and standard deviations over seeds, per category and for the dataset mean.

    Args:
        per_seed: ``{seed: {category: {column: value}}}``.

    Returns:
        ``{"categories": {cat: {col: mean}}, "categories_std": {...}, "mean": {col: mean},
        "mean_std": {col: std}}``; the dataset mean is the mean over categories per seed,
        then averaged over seeds.
    """
    seeds = list(per_seed)
    categories = list(next(iter(per_seed.values())))
    columns = [k for k, _ in COLUMNS] + list(EXTRA_COLUMNS)
    result: dict = {"categories": {}, "categories_std": {}, "mean": {}, "mean_std": {}}
    for category in categories:
        stats = {c: _mean_std([per_seed[s][category][c] for s in seeds]) for c in columns}
        result["categories"][category] = {c: m for c, (m, _) in stats.items()}
        result["categories_std"][category] = {c: d for c, (_, d) in stats.items()}
    for column in columns:
        dataset_means = [
            _mean_std([per_seed[s][c][column] for c in categories])[0] for s in seeds
        ]
        result["mean"][column], result["mean_std"][column] = _mean_std(dataset_means)
    return result


def _percent(value: float | None, std: float | None = None) -> str:
    if value is None or math.isnan(value):
        return "–"
    text = f"{100.0 * value:.1f}"
    if std is not None and not math.isnan(std):
        text += f" ± {100.0 * std:.1f}"
    return text


def markdown_table(
    title: str,
    summary: Mapping[str, Mapping],
    published: PublishedRow | None,
    note: str,
    show_std: bool,
    warning: str | None,
) -> str:
    """The paper's table layout in markdown: one row per category, our mean, the paper's mean.

    Args:
        title: the table's heading (dataset, modality, backbones, g, seeds).
        summary: :func:`aggregate`'s result.
        published: the paper's row, or None.
        note: how the paper's row differs from our setting ('' when it matches).
        show_std: print "± std over seeds" (g > 1 with several seeds).
        warning: the random-weights warning, or None.

    Returns:
        Markdown text: values in percent.
    """
    lines = [f"## {title}", ""]
    if warning:
        lines += [f"**{warning}**", ""]
    header = ["category"] + [name for _, name in COLUMNS]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for category, values in summary["categories"].items():
        stds = summary["categories_std"][category]
        cells = [_percent(values[k], stds[k] if show_std else None) for k, _ in COLUMNS]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    means = [
        _percent(summary["mean"][k], summary["mean_std"][k] if show_std else None)
        for k, _ in COLUMNS
    ]
    lines.append("| **mean (ours)** | " + " | ".join(means) + " |")
    if published is not None:
        paper = [
            "–" if v is None else f"{v:.1f}" for v in published.values
        ]
        lines.append(f"| paper: {published.source} | " + " | ".join(paper) + " |")
    lines.append("")
    lines.append("All metrics in %; image metrics after RsCon; PRO@30% is the reference's "
                 "200-threshold AUPRO (FPR ≤ 0.3).")
    if published is None:
        lines.append("The paper publishes no result for this setting.")
    elif note:
        lines.append(f"Paper row: {note}.")
    return "\n".join(lines) + "\n"


def csv_rows(
    summary: Mapping[str, Mapping], published: PublishedRow | None
) -> list[list[object]]:
    """The table as CSV rows (fractions; ``mean`` and ``paper`` rows last)."""
    columns = [k for k, _ in COLUMNS] + list(EXTRA_COLUMNS)
    rows: list[list[object]] = [["row"] + columns]
    for category, values in summary["categories"].items():
        rows.append([category] + [_fraction(values[c]) for c in columns])
    rows.append(["mean"] + [_fraction(summary["mean"][c]) for c in columns])
    if published is not None:
        paper = published.as_fractions()
        rows.append(["paper"] + ["" if paper.get(c) is None else paper[c] for c in columns])
    return rows


def _fraction(value: float) -> object:
    return "" if math.isnan(value) else round(value, 6)


def json_safe(value: object) -> object:
    """Nested data with every nan float replaced by None (valid JSON)."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
