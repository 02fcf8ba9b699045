"""Report-stage memory benchmark: peak memory of the report task alone at several N.

Run from the repository root (the checkout whose code is measured)::

    python -m benchmarks.bench_report --sizes 200 800 --image-size 64

For each N it writes a synthetic labelled 2D line into a fresh local cache (float32 maps of
S × S px with nearly every value distinct, as real maps have; images; a ground-truth mask on
every third sample, so the pixel metrics run), then runs the report task
(:func:`tasks.results.report_line`, without Prefect artifacts) in a fresh process and records
its peak traced memory (Python and NumPy allocations, ``tracemalloc``), the growth of the
process's peak resident memory during the task, and its wall time. ``--compare`` runs other
checkouts' report task on the same lines (e.g. the code before a change);
``--values-per-pass`` lowers the distinct values one pass of the pixel metrics gathers, so
that small lines already reach the cap that bounds the stage's memory at large N. Memory that
does not grow with N is the point; the wall time is the share of a shared machine the task got.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def _write_line(root: Path, n: int, size: int, seed: int = 0) -> dict:
    """A synthetic labelled line in a cache under ``root``; what the report task needs."""
    from tasks.cache.store import FeatureCache
    from tasks.decisions import Decided, write_decided

    rng = np.random.default_rng(seed)
    cache = FeatureCache(str(root / "cache"))
    samples, scores = [], []
    for i in range(n):
        label = int(i % 3 == 0)
        truth = np.zeros((size, size), dtype=bool)
        if label:
            y, x = rng.integers(0, size // 2, 2)
            truth[y : y + size // 4, x : x + size // 5] = True
        anomaly_map = (rng.random((size, size)) * 0.5 + 0.3 * truth).astype(np.float32)
        cache.write(f"image-{i}", {"image": rng.random((3, size, size)).astype(np.float32)})
        if label:
            cache.write(f"mask-{i}", {"mask": truth.astype(np.uint8)})
        cache.write(f"reduced-{i}", {"map": anomaly_map})
        samples.append({"i": i, "label": label})
        scores.append(float(anomaly_map.max()))
    before = np.float32(scores)
    flags = before > np.median(before)
    decided = Decided(before, before.copy(), flags, float(np.median(before)), None, 0.7, None)
    write_decided(cache, "decided", decided)
    return {"cache": str(root / "cache"), "out": str(root / "out"), "samples": samples}


def _run_report(line: dict, size: int) -> dict:
    """Run the report task on a written line in this process; its peak memory and time."""
    from musc_core.config import MuscConfig
    from tasks import results
    from tasks.cache.keys import PreparedKeys, SampleKeys
    from tasks.planning.blocks import PoolSample
    from tasks.records.run_summary import RunFacts
    from tasks.results import RunInfo, report_line
    from tasks.runtime import Runtime

    if line.get("values_per_pass") and hasattr(results, "METRIC_VALUES_PER_PASS"):
        results.METRIC_VALUES_PER_PASS = line["values_per_pass"]

    pool = []
    for sample in line["samples"]:
        i = sample["i"]
        mask = f"mask-{i}" if sample["label"] else None
        keys = SampleKeys(PreparedKeys(f"image-{i}", None, mask), None, None, None, None, None)
        pool.append(PoolSample(f"part-{i}", "b1", keys, sample["label"], None))
    reduced = [f"reduced-{s['i']}" for s in line["samples"]]
    info = RunInfo("bench", "b1", "bench", "2026-01-01T00:00:00+00:00", line["out"], True,
                   {"2d": "random"}, {})
    facts = RunFacts(counts={}, timings={}, seconds=0.0, bank=[])
    config = MuscConfig(modality="2d", image_size=size)
    runtime = Runtime(line["cache"], "cpu")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    result = report_line.fn(info, pool, reduced, len(pool), "decided", [], config, runtime,
                            facts, publish=False)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "traced_peak_mib": round(peak / 2**20, 1),
        "rss_growth_mib": round((rss_after - rss_before) / 1024, 1),
        "peak_rss_mib": round(rss_after / 1024, 1),
        "seconds": round(seconds, 2),
        "pixel_auroc": (result.metrics or {}).get("pixel_auroc"),
    }


def _child(checkout: Path, spec: Path, size: int) -> dict:
    """The report task's figures, run in a fresh process on the code of ``checkout``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec),
               "--image-size", str(size)]
    path = os.pathsep.join(p for p in (str(checkout), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=checkout,
                          env={**os.environ, "PYTHONPATH": path})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse the options, measure every N, print a table and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 800])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--values-per-pass", type=int, default=None,
                        help="distinct map values per pass of the pixel metrics (the report "
                        "stage's METRIC_VALUES_PER_PASS; default: the stage's own)")
    parser.add_argument("--compare", type=Path, nargs="*", default=[],
                        help="other checkouts whose report task runs on the same lines")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        line = json.loads(args.child.read_text())
        print(json.dumps(_run_report(line, args.image_size)))
        return
    checkouts = [Path.cwd(), *args.compare]
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
            line = _write_line(Path(tmp), n, args.image_size)
            for index, checkout in enumerate(checkouts):
                spec = Path(tmp) / f"line-{index}.json"
                spec.write_text(json.dumps({**line, "out": f"{line['out']}-{index}",
                                            "values_per_pass": args.values_per_pass}))
                row = {"n": n, "image_size": args.image_size, "checkout": str(checkout),
                       **_child(checkout, spec, args.image_size)}
                rows.append(row)
                print(f"N = {n:>6} at {args.image_size} px, {checkout}: traced peak "
                      f"{row['traced_peak_mib']} MiB, peak RSS growth {row['rss_growth_mib']} MiB "
                      f"(peak {row['peak_rss_mib']} MiB), {row['seconds']} s", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
