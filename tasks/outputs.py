"""Write a scored line to disk: maps, overlays, scores CSV, metrics JSON, run summary."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from musc_core.pipeline import ScoreResult
from tasks.prepare import PreparedSample, SetAside

RANDOM_WEIGHTS_WARNING = (
    "WARNING: random backbone weights were used: these scores, maps and metrics are NOT "
    "meaningful anomaly detection results (they exercise the pipeline only)."
)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_stem(name: str) -> str:
    """A file-name-safe version of a sample name (no separators, no '..', stable).

    Args:
        name: sample name, e.g. ``"crack/003"``.

    Returns:
        E.g. ``"crack__003"``; never empty, never starting with a dot.
    """
    parts = [_UNSAFE.sub("_", p) for p in re.split(r"[/\\]+", name) if p not in ("", ".", "..")]
    stem = "__".join(p for p in parts if p).lstrip(".")
    return stem or "sample"


def jet(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to the 'jet' colour map.

    Args:
        values: (H, W) floats in [0, 1].

    Returns:
        (H, W, 3) uint8 RGB.
    """
    v = np.clip(values, 0.0, 1.0)[..., None]
    channels = np.concatenate(
        [
            np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0),
            np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0),
            np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0),
        ],
        axis=-1,
    )
    return (channels * 255.0).round().astype(np.uint8)


def overlay(image: torch.Tensor | None, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a heat map (already in [0, 1]) over an image, or return the heat map alone.

    Args:
        image: (3, S, S) float in [0, 1], or None (3D-only lines).
        heat: (S, S) in [0, 1].
        alpha: weight of the heat map.

    Returns:
        (S, S, 3) uint8.
    """
    colours = jet(heat).astype(np.float32)
    if image is None:
        return colours.astype(np.uint8)
    base = image.permute(1, 2, 0).numpy() * 255.0
    return np.clip((1 - alpha) * base + alpha * colours, 0, 255).round().astype(np.uint8)


def write_line_results(
    out_dir: Path,
    prepared: Sequence[PreparedSample],
    result: ScoreResult,
    set_aside: Sequence[SetAside],
    metrics: dict[str, float] | None,
    random_weights: bool,
) -> dict[str, str]:
    """Write one line's (category's) results.

    Layout under ``out_dir``: ``maps/<stem>.npy`` (float32 S×S anomaly map),
    ``overlays/<stem>.png`` (heat map over the image, shared colour scale across the line),
    ``scores.csv`` (one row per sample, ranked by the RsCon score), ``metrics.json`` (when
    labels exist), ``set_aside.csv`` (samples that could not be used).

    Args:
        out_dir: the category's output folder.
        prepared: the scored samples, in the result's order.
        result: the scoring result.
        set_aside: unusable samples with their reasons.
        metrics: metrics of this line, or None without labels.
        random_weights: whether any backbone had random weights (announced in every file).

    Returns:
        Paths of the written artefacts by kind.
    """
    maps_dir = out_dir / "maps"
    overlay_dir = out_dir / "overlays"
    maps_dir.mkdir(parents=True, exist_ok=True)
    overlay_dir.mkdir(parents=True, exist_ok=True)
    maps = result.maps.numpy().astype(np.float32)
    low, high = float(maps.min()), float(maps.max())
    scale = (high - low) or 1.0
    stems: list[str] = []
    used: set[str] = set()
    for index, item in enumerate(prepared):
        stem = safe_file_stem(item.record.name)
        while stem in used:
            stem = f"{stem}_{index}"
        used.add(stem)
        stems.append(stem)
        np.save(maps_dir / f"{stem}.npy", maps[index])
        heat = (maps[index] - low) / scale
        Image.fromarray(overlay(item.sample.image, heat)).save(overlay_dir / f"{stem}.png")

    order = np.argsort(-result.scores_rescored.numpy(), kind="stable")
    scores_path = out_dir / "scores.csv"
    with open(scores_path, "w", newline="", encoding="utf-8") as handle:
        if random_weights:
            handle.write(f"# {RANDOM_WEIGHTS_WARNING}\n")
        writer = csv.writer(handle)
        writer.writerow(
            ["rank", "name", "score", "score_rescored", "label", "defect_type", "map_file"]
        )
        for rank, index in enumerate(order, start=1):
            record = prepared[index].record
            writer.writerow(
                [
                    rank,
                    record.name,
                    f"{float(result.scores[index]):.6g}",
                    f"{float(result.scores_rescored[index]):.6g}",
                    "" if record.label is None else record.label,
                    record.defect_type or "",
                    f"maps/{stems[index]}.npy",
                ]
            )
    written = {"maps": str(maps_dir), "overlays": str(overlay_dir), "scores": str(scores_path)}
    if set_aside:
        aside_path = out_dir / "set_aside.csv"
        with open(aside_path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["name", "path", "problem"])
            for item in set_aside:
                writer.writerow([item.name, item.path, item.problem])
        written["set_aside"] = str(aside_path)
    if metrics is not None:
        metrics_path = out_dir / "metrics.json"
        payload: dict[str, object] = {"metrics": metrics}
        if random_weights:
            payload["warning"] = RANDOM_WEIGHTS_WARNING
        metrics_path.write_text(json.dumps(payload, indent=2, allow_nan=True))
        written["metrics"] = str(metrics_path)
    return written
