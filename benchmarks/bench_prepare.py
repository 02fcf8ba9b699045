"""Preparation at real scan density: the MVTec 3D-AD cleaning per scan, and a line's preparation.

Run from the repository root::

    python -m benchmarks.bench_prepare --out benchmarks/out/prepare.json

Scans come from the generator's MVTec 3D-AD presets (``musc synth --preset``): 400 px at
0.2 mm (≈ 70k foreground points) and 800 px at 0.12 mm (≈ 200k), pre-cleaned and raw (with
the support plane), half of the parts touching or crossing the frame. For each scan:

- ``dbscan``: the grid DBSCAN (:func:`musc_core.clustering.dbscan`) and Open3D's
  ``cluster_dbscan`` on the same points (eps 6 mm, 30 points), with a check that the labels
  are equal; Open3D only up to ``--open3d-max`` points (it takes minutes at 200k);
- ``cleaning``: the whole :func:`musc_core.preprocess_points.mvtec3d_cleaning` (plane fit and
  decision, padding, largest cluster).

``line``: the ``prepare`` task's work on a whole line (``--line-n`` scans at 400 px: reading,
cleaning, resizing, writing the cache) with one thread and with one per core, which is how a
worker prepares its samples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import machine_info, machine_line
from musc_core.clustering import _open3d_dbscan, dbscan
from musc_core.preprocess_points import foreground_mask, mvtec3d_cleaning

EPS, MIN_POINTS = 0.006, 30


def _scans(root: Path, preset: str, count: int, seed: int) -> list[Path]:
    from tasks.synthetic.generator import generate_line, preset_kwargs

    generate_line(root / preset, category="part", num_samples=count, seed=seed,
                  defect_rate=0.0, **preset_kwargs(preset))
    return sorted((root / preset).glob("part/test/*/xyz/*.tiff"))


def _timed(function, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def per_scan(paths: list[Path], repeat: int, open3d_max: int) -> list[dict]:
    """DBSCAN and whole-cleaning times of each scan."""
    from tasks.formats.datasets import load_xyz

    rows = []
    for path in paths:
        xyz = load_xyz(str(path))
        points = xyz.reshape(-1, 3)[foreground_mask(xyz).reshape(-1)].astype(np.float64)
        grid_s, labels = _timed(lambda p=points: dbscan(p, EPS, MIN_POINTS), repeat)
        row = {"scan": str(path.relative_to(path.parents[4])), "points": int(len(points)),
               "grid_dbscan_s": round(grid_s, 4)}
        if len(points) <= open3d_max:
            open3d_s, reference = _timed(
                lambda p=points: _open3d_dbscan(p, EPS, MIN_POINTS), 1
            )
            row["open3d_dbscan_s"] = round(open3d_s, 3)
            row["labels_equal"] = bool(np.array_equal(labels, reference))
        clean_s, cleaned = _timed(lambda x=xyz: mvtec3d_cleaning(x, None, None), repeat)
        row["cleaning_s"] = round(clean_s, 4)
        row["plane_removed"] = cleaned.plane_removed
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def line_preparation(root: Path, count: int) -> dict:
    """The prepare task's work on one line, with 1 thread and with one per core."""
    from musc_core.config import MuscConfig
    from tasks.cache.keys import prepared_keys
    from tasks.discover import discover_line
    from tasks.features import prepare_samples
    from tasks.runtime import Runtime
    from tasks.synthetic.generator import generate_line, preset_kwargs

    data = root / "line"
    generate_line(data, category="part", num_samples=count, seed=5,
                  **preset_kwargs("mvtec3d-400"))
    config = MuscConfig()
    found, _ = discover_line(str(data), "mvtec3d", "part")
    items = [(s, prepared_keys(s.digests, "mvtec3d", "part", config)) for s in found]
    result = {"scans": count}
    cores = torch.get_num_threads()
    for threads in sorted({1, cores}):
        cache = tempfile.mkdtemp(dir=root)
        torch.set_num_threads(threads)
        start = time.perf_counter()
        outcomes = prepare_samples.fn(items, "mvtec3d", config, Runtime(cache, "cpu"))
        seconds = time.perf_counter() - start
        torch.set_num_threads(cores)
        result[f"{threads}_threads_s_per_scan"] = round(seconds / count, 4)
        result["set_aside"] = sum(problem is not None for _, problem, _ in outcomes)
        print(f"line of {count} scans, {threads} thread(s): {seconds / count:.3f} s/scan",
              flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the sections and write the JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/prepare.json"))
    parser.add_argument("--scans", type=int, default=4, help="scans per preset")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--open3d-max", type=int, default=90_000,
                        help="largest scan (points) also clustered by Open3D")
    parser.add_argument("--line-n", type=int, default=40)
    args = parser.parse_args(argv)
    info = machine_info()
    print(machine_line(info), flush=True)
    record: dict[str, object] = {"benchmark": "bench_prepare", "machine": info}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        presets = ("mvtec3d-400", "mvtec3d-400-raw", "mvtec3d-800", "mvtec3d-800-raw")
        record["scans"] = {
            preset: per_scan(_scans(root, preset, args.scans, seed), args.repeat,
                             args.open3d_max)
            for seed, preset in enumerate(presets)
        }
        record["line"] = line_preparation(root, args.line_n)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"record: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
