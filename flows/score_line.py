"""Score product lines end to end in this process: discover → prepare → score → report."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from musc_core.config import MuscConfig
from musc_core.metrics import summarize
from musc_core.pipeline import Progress, score
from tasks.backbones import BackboneSpec, build_backbones
from tasks.datasets import list_categories, read_dataset
from tasks.evaluate import line_metrics
from tasks.outputs import RANDOM_WEIGHTS_WARNING, safe_file_stem, write_line_results
from tasks.prepare import prepare_records


@dataclass
class LineOutcome:
    """What happened to one category (line).

    Attributes:
        category: the line's name.
        num_scored: samples scored.
        set_aside: (name, problem) of samples that could not be used.
        outputs: written artefacts by kind.
        metrics: metrics when labels exist.
        error: why the line could not be scored at all, else None.
        seconds: wall time of the line.
        timings: wall seconds per stage (preparation, the core's stages, writing).
    """

    category: str
    num_scored: int = 0
    set_aside: list[tuple[str, str]] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] | None = None
    error: str | None = None
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class RunSummary:
    """The outcome of a whole run.

    Attributes:
        out_dir: where everything was written.
        lines: one outcome per category.
        random_weights: whether results came from random backbones.
        summary_path: the run's JSON summary.
        metrics_path: the per-category + mean metrics JSON, when any line had labels.
    """

    out_dir: Path
    lines: list[LineOutcome]
    random_weights: bool
    summary_path: Path
    metrics_path: Path | None

    @property
    def num_set_aside(self) -> int:
        """Samples set aside over all lines."""
        return sum(len(line.set_aside) for line in self.lines)

    @property
    def failed_lines(self) -> list[LineOutcome]:
        """Lines that could not be scored."""
        return [line for line in self.lines if line.error is not None]


def score_lines(
    data: str | Path,
    fmt: str,
    categories: Sequence[str] | None,
    config: MuscConfig,
    backbones: BackboneSpec,
    out_dir: str | Path,
    device: torch.device,
    progress: Progress | None = None,
) -> RunSummary:
    """Score every requested category of a dataset and write results.

    Args:
        data: dataset root.
        fmt: dataset format (``mvtec3d``, ``eyecandies``, ``mvtec``, ``visa``, ``btad``,
            ``mpdd``, ``folder``).
        categories: categories to score, or None for all.
        config: MuSc-V2 hyperparameters.
        backbones: backbone names and weights.
        out_dir: output root; each category gets a subfolder.
        device: where models and scoring run.
        progress: optional stage progress callback.

    Returns:
        The run summary (also written as ``run.json``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen = list(categories) if categories else list_categories(data, fmt)
    built = build_backbones(backbones, config, device)
    lines: list[LineOutcome] = []
    for category in chosen:
        start = time.perf_counter()
        outcome = LineOutcome(category=category)
        records = read_dataset(data, fmt, category)
        prepared, set_aside = prepare_records(records, fmt, config)
        outcome.timings["prepare"] = time.perf_counter() - start
        outcome.set_aside = [(s.name, s.problem) for s in set_aside]
        line_dir = out / safe_file_stem(category)
        if len(prepared) < 2:
            outcome.error = (
                f"{category}: {len(prepared)} usable sample(s) of {len(records)}; mutual "
                "scoring needs at least 2"
            )
            lines.append(outcome)
            continue
        result = score(
            [p.sample for p in prepared],
            config,
            built.extractor_2d,
            built.extractor_3d,
            device=device,
            progress=progress,
        )
        outcome.timings.update(result.timings)
        reporting = time.perf_counter()
        outcome.metrics = line_metrics(prepared, result)
        outcome.outputs = write_line_results(
            line_dir, prepared, result, set_aside, outcome.metrics, built.random_weights
        )
        outcome.timings["metrics_and_writing"] = time.perf_counter() - reporting
        outcome.num_scored = len(prepared)
        outcome.seconds = time.perf_counter() - start
        lines.append(outcome)

    metrics_path = None
    per_category = {line.category: line.metrics for line in lines if line.metrics}
    if per_category:
        metrics_path = out / "metrics.json"
        payload: dict[str, object] = {"categories": summarize(per_category)}
        if built.random_weights:
            payload["warning"] = RANDOM_WEIGHTS_WARNING
        metrics_path.write_text(json.dumps(payload, indent=2))
    summary_path = out / "run.json"
    summary = {
        "warning": RANDOM_WEIGHTS_WARNING if built.random_weights else None,
        "random_weights": built.random_weights,
        "data": str(data),
        "format": fmt,
        "backbones": built.identities(),
        "config": config.as_dict(),
        "device": str(device),
        "lines": [
            {
                "category": line.category,
                "scored": line.num_scored,
                "set_aside": [{"name": n, "problem": p} for n, p in line.set_aside],
                "error": line.error,
                "outputs": line.outputs,
                "seconds": round(line.seconds, 3),
                "stage_seconds": {k: round(v, 3) for k, v in line.timings.items()},
            }
            for line in lines
        ],
    }
    summary_path.write_text(json.dumps(summary, indent=2))
    return RunSummary(out, lines, built.random_weights, summary_path, metrics_path)
