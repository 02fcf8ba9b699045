"""Precision and recall of the flag rules at defect rates of 1-40 % and batch sizes of 8-200.

Run from the repository root (about 10 minutes on 2 shared cores, 4 of them scoring the pool
once)::

    python -m benchmarks.bench_flags --table benchmarks/out/flag_table.md

Method. Re-running the pipeline for every (rate, size) cell would take hours, so one generated
line (``tasks.synthetic.generator``, 120 samples, half of them defective, 64 px, 2D, a tiny ViT with
**random weights**) is scored once with the in-memory pipeline; its scores before RsCon, its
salient features and its labels are kept (``--pool``, reused when present). Each cell then
draws ``--reps`` batches of N samples with round(N · rate) defective ones (with replacement
when the pool has too few), runs RsCon over the batch (so the min-max normalization and the
neighbourhoods are those of the batch) and applies each rule. Approximation: the mutual
scores of a sample are those it got in the pool, not in the drawn batch.

Rules:

- ``mad``: median + k · 1.4826 · MAD of the batch's RsCon scores (the rule before issue 15);
- ``outliers``: :func:`musc_core.decisions.flag_outliers`, grown from the lower half;
- ``bank mad`` / ``bank outliers``: the batch is scored with a clean bank of 32 normal
  samples in the pool (RsCon over both, as ``score-new`` does) and the rule's threshold comes
  from the bank's RsCon scores.

Precision and recall are pooled over the draws of a cell (TP, FP, FN summed); "no threshold"
counts the draws where the rule declined to set one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import machine_info, machine_line
from musc_core.config import MuscConfig
from musc_core.decisions import Decision, flag_outliers, flag_samples
from musc_core.rescoring import rscon

RATES = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4)
SIZES = (8, 12, 24, 50, 100, 200)
BANK = 32
RANDOM_NOTE = "random weights: the rules are compared with each other, not with the paper"
Rule = Callable[[np.ndarray, float], Decision]
RULES: dict[str, Rule] = {"mad": flag_samples, "outliers": flag_outliers}


def score_pool(
    path: Path, num_samples: int, seed: int, modality: str, preset: str | None = None
) -> dict[str, np.ndarray]:
    """Score one generated line once and keep what the rules need (cached in ``path``)."""
    if path.exists():
        with np.load(path) as stored:
            return {name: stored[name] for name in stored.files}
    from musc_core.pipeline import score
    from tasks.backbones import BackboneSpec, build_backbones
    from tasks.formats.datasets import read_dataset
    from tasks.formats.prepare import prepare_records
    from tasks.synthetic.generator import generate_line, preset_kwargs

    config = MuscConfig(
        modality=modality, image_size=64, num_groups=32, group_size=16, ipg_step=8,
        distance_dtype="float32", vit_dtype="float32",
    )
    with tempfile.TemporaryDirectory() as root:
        line = preset_kwargs(preset) if preset else {"image_size": 64}
        generate_line(
            root, category="part", num_samples=num_samples, defect_rate=0.5, seed=seed, **line
        )
        records = read_dataset(root, "mvtec3d", "part")
        prepared, _ = prepare_records(records, "mvtec3d", config)
    spec = BackboneSpec("vit_tiny_patch16_224", "random", "random", 8)
    built = build_backbones(spec, config, torch.device("cpu"))
    result = score([p.sample for p in prepared], config, built.extractor_2d, built.extractor_3d)
    pool = {
        "scores": result.scores.numpy(),
        "salient": result.salient.numpy(),
        "labels": np.array([p.record.label for p in prepared], dtype=np.int64),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **pool)
    return pool


def _draw(indices: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` of ``indices``, without replacement when there are enough."""
    return rng.choice(indices, size=count, replace=count > indices.size)


def evaluate(
    pool: dict[str, np.ndarray], rate: float, size: int, reps: int, k: float, seed: int
) -> dict[str, dict[str, float]]:
    """Pooled precision, recall and declined draws of every rule in one (rate, size) cell."""
    rng = np.random.default_rng([seed, int(rate * 1000), size])
    scores = torch.from_numpy(pool["scores"]).float()
    salient = torch.from_numpy(pool["salient"]).float()
    normal = np.flatnonzero(pool["labels"] == 0)
    defective = np.flatnonzero(pool["labels"] == 1)
    names = list(RULES) + [f"bank {name}" for name in RULES]
    counts = {name: {"tp": 0, "fp": 0, "fn": 0, "declined": 0} for name in names}
    for _ in range(reps):
        bad = int(np.floor(size * rate + 0.5))
        batch = np.concatenate([_draw(defective, bad, rng), _draw(normal, size - bad, rng)])
        truth = np.arange(size) < bad
        rest = np.setdiff1d(normal, batch)
        bank = _draw(rest if rest.size >= BANK else normal, BANK, rng)
        alone = rscon(scores[batch], salient[batch]).numpy()
        both = np.concatenate([batch, bank])
        together = rscon(scores[both], salient[both]).numpy()
        for name, rule in RULES.items():
            decisions = {name: rule(alone, k)}
            on_bank = rule(together[size:], k)
            decisions[f"bank {name}"] = on_bank._replace(
                flags=together[:size] > on_bank.threshold
            )
            for label, decision in decisions.items():
                tally = counts[label]
                tally["tp"] += int((decision.flags & truth).sum())
                tally["fp"] += int((decision.flags & ~truth).sum())
                tally["fn"] += int((~decision.flags & truth).sum())
                tally["declined"] += int(decision.reason is not None)
    out = {}
    for name, tally in counts.items():
        flagged = tally["tp"] + tally["fp"]
        positives = tally["tp"] + tally["fn"]
        out[name] = {
            "precision": tally["tp"] / flagged if flagged else float("nan"),
            "recall": tally["tp"] / positives if positives else float("nan"),
            "false_flags_per_batch": tally["fp"] / reps,
            "declined": tally["declined"],
        }
    return out


def _cell(value: float) -> str:
    return "–" if value != value else f"{value:.2f}"


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: one row per (rate, size); precision / recall / false flags per batch."""
    rules = list(next(iter(results.values())))
    head = "| defect rate | N | " + " | ".join(f"{r} P / R / FP" for r in rules) + " |"
    lines = [head, "|" + "---|" * (2 + len(rules))]
    for key, cell in results.items():
        rate, size = key.split("/")
        parts = [
            f"{_cell(cell[r]['precision'])} / {_cell(cell[r]['recall'])} / "
            f"{cell[r]['false_flags_per_batch']:.1f}"
            for r in rules
        ]
        lines.append(f"| {float(rate):.0%} | {size} | " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Score the pool (or reuse it), evaluate every cell, write JSON and the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/out/flags.json")
    parser.add_argument("--table", default="", help="also write the Markdown table here")
    parser.add_argument("--pool", default="benchmarks/out/flag_pool.npz")
    parser.add_argument("--pool-size", type=int, default=120)
    parser.add_argument("--modality", default="2d", choices=("2d", "3d", "2d+3d"))
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--k", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--preset", default=None,
                        help="generate the pool as musc synth --preset (e.g. mvtec3d-400: "
                        "scans shaped like MVTec 3D-AD, prepared down to 64 px); default: "
                        "the coarse 64 px line")
    args = parser.parse_args(argv)
    machine = machine_info()
    start = time.perf_counter()
    pool = score_pool(Path(args.pool), args.pool_size, args.seed, args.modality, args.preset)
    scored = time.perf_counter() - start
    results = {
        f"{rate}/{size}": evaluate(pool, rate, size, args.reps, args.k, args.seed)
        for rate in RATES
        for size in SIZES
    }
    payload = {
        "note": RANDOM_NOTE,
        "machine": machine,
        "pool": {
            "size": int(pool["labels"].size),
            "defective": int(pool["labels"].sum()),
            "modality": args.modality,
            "preset": args.preset,
        },
        "reps": args.reps,
        "k": args.k,
        "seconds": {"pool": scored, "total": time.perf_counter() - start},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    text = table(results) + "\n" + machine_line(machine) + "\n"
    if args.table:
        Path(args.table).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
