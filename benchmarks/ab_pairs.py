"""Interleaved A/B timing of ``pair_distances``: another git revision against the working tree.

Run from the repository root::

    python -m benchmarks.ab_pairs --baseline b324565 --out benchmarks/out/ab_pairs.json

Both versions of ``musc_core/mutual_scoring.py`` are loaded in one process and timed in
alternation on the same features, so that load from other jobs hits both alike; on a shared
machine this compares two revisions far more reliably than two separate benchmark runs. The
matmul peak is measured before and after (the better one is kept).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from musc_core import mutual_scoring
from musc_core.hardware import cpu_has_fast_bf16, cpu_kind

# bf16 only where it is native (see musc_core.hardware): elsewhere it is ~300x slower.
DTYPES = {"float32": torch.float32} | (
    {"bfloat16": torch.bfloat16} if cpu_has_fast_bf16() else {}
)
SHAPES = {"2d_784x768": (784, 768), "3d_1024x384": (1024, 384)}


def load_revision(revision: str, folder: Path) -> ModuleType:
    """``musc_core.mutual_scoring`` as it was at a git revision, as a standalone module."""
    source = subprocess.run(
        ["git", "show", f"{revision}:musc_core/mutual_scoring.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = folder / "mutual_scoring_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("mutual_scoring_baseline", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def matmul_peak(size: int, repeat: int) -> dict[str, float]:
    """Best GFLOP/s of a size×size torch.mm per dtype."""
    out = {}
    for name, dtype in DTYPES.items():
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        torch.mm(a, b)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        out[name] = 2.0 * size**3 / min(times) / 1e9
    return out


def compare(
    versions: dict[str, ModuleType], n: int, block: int, repeat: int
) -> dict[str, dict[str, dict[str, float | list[float]]]]:
    """Alternate the versions ``repeat`` times per shape and dtype; GFLOP/s per version."""
    results = {}
    for shape, (length, channels) in SHAPES.items():
        features = F.normalize(torch.randn(n, length, channels), dim=-1)
        flops = n * (n - 1) / 2 * 2.0 * length * length * channels
        for name, dtype in DTYPES.items():
            runs: dict[str, list[float]] = {version: [] for version in versions}
            for module in versions.values():  # warm-up
                module.pair_distances(features[:4], block, dtype)
            for _ in range(repeat):
                for version, module in versions.items():
                    start = time.perf_counter()
                    module.pair_distances(features, block, dtype)
                    runs[version].append(time.perf_counter() - start)
            results[f"{shape}/{name}"] = {
                version: {
                    "gflops_median": flops / statistics.median(times) / 1e9,
                    "gflops_best": flops / min(times) / 1e9,
                    "runs_s": times,
                }
                for version, times in runs.items()
            }
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line: baseline revision, output, sample count, block, repeats."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare against")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/ab_pairs.json"))
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the comparison, print it and write the JSON."""
    args = parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        baseline = load_revision(args.baseline, Path(folder))
        versions = {args.baseline: baseline, "working tree": mutual_scoring}
        before = matmul_peak(2048, 5)
        results = compare(versions, args.samples, args.block, args.repeat)
        after = matmul_peak(2048, 5)
    peaks = {name: max(before[name], after[name]) for name in DTYPES}
    kind = cpu_kind()
    print(f"pair_distances, N={args.samples}, block={args.block}, CPU kind: {kind.label()}")
    print(f"matmul peak (2048², best seen): {peaks}")
    for key, entry in results.items():
        dtype = key.rsplit("/", 1)[-1]
        cells = []
        for version, e in entry.items():
            ratio = e["gflops_median"] / peaks[dtype]
            cells.append(
                f"{version}: {e['gflops_median']:.0f} GF/s median ({ratio:.0%}), "
                f"{e['gflops_best']:.0f} best"
            )
        print(f"{key:<24} " + " | ".join(cells))
    output = {
        "peaks_gflops": peaks,
        "threads": torch.get_num_threads(),
        "cpu_kind": kind._asdict() | {"label": kind.label()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=2))
    return output


if __name__ == "__main__":
    main()
