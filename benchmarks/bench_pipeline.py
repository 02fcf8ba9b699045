"""Pipeline benchmarks: the score-line flow end to end, scoring memory, reference budget, workers.

Run from the repository root (``make bench`` runs this after the kernel benchmarks)::

    python -m benchmarks.bench_pipeline --out benchmarks/out/pipeline.json

Sections (``--sections``):

- ``e2e``: the ``score_line`` flow on generated lines of N = 40 and 150 samples (``--sizes``),
  224 px, ViT-B/8 and Point-MAE with random weights, for 2d, 3d and 2d+3d: per-stage wall time,
  seconds per sample and peak memory of the process tree. A fresh cache each time.
- ``memory``: peak memory of the scoring stages (pair shards, reductions, report) for
  N = 100, 500, 1000 with features of the real ViT-B/8 shape (784 × 768), normal shard size,
  and a reference budget R = 150 (``--memory-budget``): the work is N·R pairs, so the wall
  time must grow linearly in N and the memory must not grow with N.
- ``budget``: time and detection quality versus the reference budget R on a generated line of
  N = 1000 (a small ViT at 128 px, 2D, so that R = all is affordable here), R = all, 300, 150
  and 50 (``--budgets``), each with the reference choices of ``--choices`` (``similar``, the
  default, and ``cycle``); a budget's later choices reuse its first choice's cached features.
- ``workers``: throughput of the shardable stages (features, pair shards, reductions) with 2
  single-threaded Dask workers over 1, on a 2d+3d line of N = 32 (``--workers-n``).

Every figure comes from random weights: timings and memory only; the detection figures compare
budgets with each other, never with the paper.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil

RANDOM_NOTE = "random weights: timings, memory and relative quality only"
ROOT = Path(__file__).resolve().parents[1]


class PeakMemory:
    """Peak resident memory of this process and all its children, sampled every 50 ms."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.baseline = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def _mib(value: int) -> float:
    return round(value / 2**20, 1)


def machine() -> dict[str, object]:
    """What the figures were measured on, the CPU kind included."""
    import torch

    from musc_core.hardware import cpu_kind

    kind = cpu_kind()
    return {
        "cpu": kind.model,
        "cpu_isa": kind.isa,
        "cpu_capability": kind.capability,
        "fast_bf16": kind.fast_bf16,
        "cpu_kind": kind.label(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": os.getloadavg(),
        "note": RANDOM_NOTE,
    }


# ----------------------------------------------------------------------------------- e2e
def bench_e2e(work: Path, sizes: list[int], modalities: list[str]) -> list[dict]:
    """The score-line flow end to end on generated 224 px lines (ViT-B/8, Point-MAE)."""
    from flows.score_line import score_line
    from flows.settings import Algorithm, Backbones, LineInput, LineRun
    from tasks.synthetic.generator import generate_line

    results = []
    for n in sizes:
        data = work / f"line{n}"
        if not data.exists():
            generate_line(data, category="part", num_samples=n, image_size=224, seed=n)
        for modality in modalities:
            store = work / f"store-e2e-{n}-{modality.replace('+', '')}"
            shutil.rmtree(store, ignore_errors=True)
            start = time.perf_counter()
            with PeakMemory() as memory:
                summary = score_line(
                    data=LineInput(data=str(data), data_format="mvtec3d"), batch="bench",
                    backbones=Backbones(weights_2d="random", weights_3d="random"),
                    algorithm=Algorithm(modality=modality),
                    run=LineRun(storage=str(store), cluster="threads", workers=1),
                )
            wall = time.perf_counter() - start
            row = {
                "n": n,
                "modality": modality,
                "wall_s": round(wall, 1),
                "s_per_sample": round(wall / n, 3),
                "stage_s": summary["timings"],
                "peak_rss_mib": _mib(memory.peak),
                "baseline_rss_mib": _mib(memory.baseline),
                "metrics": summary.get("metrics"),
            }
            print(f"  e2e N={n:4d} {modality:6s}: {wall:7.1f} s ({wall / n:.2f} s/sample), "
                  f"peak {row['peak_rss_mib']:.0f} MiB, stages {summary['timings']}", flush=True)
            results.append(row)
    return results


# -------------------------------------------------------------------------------- memory
def _synthetic_pool(cache_url: str, n: int, config, seed: int):
    """Pool samples whose SNAMD features (real 784 × 768 shape) are written to the cache."""
    from tasks.cache.keys import Identities, PreparedKeys, sample_keys
    from tasks.cache.store import FeatureCache
    from tasks.planning.blocks import PoolSample

    cache = FeatureCache(cache_url)
    identities = Identities("synthetic-features", None)
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((1, 784, 768)).astype(np.float32)
    samples = []
    for i in range(n):
        image_key = f"{seed:08x}{i:056x}"
        keys = sample_keys(PreparedKeys(image_key, None, None), config, identities)
        if not cache.has(keys.snamd_2d):
            noise = rng.standard_normal((1, 784, 768)).astype(np.float32)
            features = base + 0.3 * noise
            features /= np.linalg.norm(features, axis=-1, keepdims=True)
            cache.write(keys.snamd_2d, {"features": features})
        if not cache.has(image_key):
            cache.write(image_key, {"none": np.zeros(1, np.uint8)}, meta={})
        samples.append(PoolSample(f"s{i:04d}", "bench", keys))
    return samples


def bench_memory(work: Path, sizes: list[int], budget: int, shard_size: int) -> list[dict]:
    """Peak memory of the scoring stages through the pipeline's own stage functions."""
    from prefect import flow

    from flows.progress import StageTracker
    from flows.stages import report_run, score_pool
    from musc_core.config import MuscConfig
    from musc_core.hardware import resolved_dtypes
    from tasks.planning.blocks import batch_blocks
    from tasks.results import RunInfo
    from tasks.runtime import Runtime

    given = MuscConfig(modality="2d", layers_2d=(12,), salient_layer=0)
    # Keys name the dtypes the tasks compute in (this process runs them: one thread).
    config = replace(given, **resolved_dtypes(given, "cpu"))

    @flow(name="bench-scoring-memory", validate_parameters=False)
    def scoring(blocks, runtime, out):
        timings: dict[str, float] = {}
        tracker = StageTracker(3)
        pool, reduced, counts, _ = score_pool(
            blocks, None, config, budget, runtime, tracker, timings
        )
        info = RunInfo("bench", "bench", "", "2026-01-01T00:00:00+00:00", out, True, {}, {})
        report_run(info, pool, reduced, len(pool), [], config, runtime, counts, timings,
                   tracker, [])
        return timings

    results = []
    for n in sizes:
        shutil.rmtree(work / f"store-mem-{n}", ignore_errors=True)
        cache_url = str(work / f"store-mem-{n}" / "cache")
        samples = _synthetic_pool(cache_url, n, config, seed=n)
        blocks = batch_blocks(samples, shard_size)
        runtime = Runtime(cache_url, "cpu")
        start = time.perf_counter()
        with PeakMemory() as memory:
            timings = scoring.with_options(task_runner=_threads(1))(
                blocks, runtime, str(work / f"out-mem-{n}")
            )
        row = {
            "n": n,
            "budget": budget,
            "shard_size": shard_size,
            "wall_s": round(time.perf_counter() - start, 1),
            "stage_s": {k: round(v, 2) for k, v in timings.items()},
            "peak_rss_mib": _mib(memory.peak),
            "baseline_rss_mib": _mib(memory.baseline),
            "peak_above_baseline_mib": _mib(memory.peak - memory.baseline),
        }
        print(f"  memory N={n:5d} R={budget}: peak {row['peak_rss_mib']:.0f} MiB "
              f"(+{row['peak_above_baseline_mib']:.0f} over the process), {row['wall_s']} s",
              flush=True)
        results.append(row)
    return results


def _threads(workers: int):
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=workers)


# -------------------------------------------------------------------------------- budget
def bench_budget(
    work: Path, n: int, budgets: list[int | None], choices: list[str]
) -> list[dict]:
    """Time and detection quality versus the reference budget and choice on one line."""
    from flows.score_line import score_line
    from flows.settings import Algorithm, Backbones, LineInput, LineRun, RollingBank
    from tasks.synthetic.generator import generate_line

    data = work / f"budget-line{n}"
    if not data.exists():
        generate_line(data, category="part", num_samples=n, image_size=128, defect_rate=0.3,
                      seed=7)
    results = []
    for budget in budgets:
        store = work / f"store-budget-{budget}"
        shutil.rmtree(store, ignore_errors=True)
        for choice in choices if budget is not None else choices[:1]:
            start = time.perf_counter()
            summary = score_line(
                data=LineInput(data=str(data), data_format="mvtec3d"), batch=f"bench-{choice}",
                backbones=Backbones(backbone_2d="vit_small_patch8_224.dino", weights_2d="random"),
                algorithm=Algorithm(modality="2d", image_size=128, reference_choice=choice),
                bank=RollingBank(reference_budget=budget, reference_nights=0),
                run=LineRun(storage=str(store), cluster="threads", workers=1,
                            out=str(work / f"out-budget-{budget}-{choice}")),
            )
            wall = time.perf_counter() - start
            metrics = summary["metrics"] or {}
            row = {
                "n": n,
                "budget": "all" if budget is None else budget,
                "choice": choice if budget is not None else "(all references)",
                "wall_s": round(wall, 1),
                "features_s": summary["timings"].get("features"),
                "pair_scoring_s": summary["timings"].get("pair_scoring"),
                "reduction_s": summary["timings"].get("reduction"),
                "image_auroc": metrics.get("image_auroc"),
                "pixel_ap": metrics.get("pixel_ap"),
            }
            print(f"  budget N={n} R={row['budget']} {row['choice']}: pairs "
                  f"{row['pair_scoring_s']} s, image AUROC {row['image_auroc']:.3f}, "
                  f"pixel AP {row['pixel_ap']:.3f}", flush=True)
            results.append(row)
    return results


# ------------------------------------------------------------------------------- workers
#: Task names of the shardable stages (features, pair shards, reductions).
SHARDABLE_TASKS = ("extract-2d", "aggregate-2d", "group", "extract-3d", "aggregate-3d",
                   "score-pairs", "reduce")


def task_busy_seconds(run_id: str, names: tuple[str, ...]) -> float:
    """Sum of the run times of a flow run's task runs with these names (from the API)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> tuple[int, float]:
        flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        count, busy, offset = 0, 0.0, 0
        async with get_client() as client:
            while page := await client.read_task_runs(
                flow_run_filter=flow_filter, limit=200, offset=offset
            ):
                for run in page:
                    count += 1
                    if run.name.rsplit("-", 1)[0] in names and run.start_time and run.end_time:
                        busy += (run.end_time - run.start_time).total_seconds()
                offset += len(page)
        return count, busy

    count, busy = asyncio.run(read())
    for _ in range(40):  # task runs reach the server asynchronously: wait until they settle
        time.sleep(3)
        again, busy = asyncio.run(read())
        if again == count:
            break
        count = again
    return busy


def bench_workers(work: Path, n: int) -> list[dict]:
    """Shardable stages with 1 and 2 single-threaded local Dask workers.

    Besides the stages' wall time, each row has the time the workers spent inside the
    shardable stages' task runs (``task_busy_s``, from the Prefect API) and the worker-seconds
    they were not (``worker_idle_s`` = workers × wall − busy: waits at the end of a stage and
    between tasks); the speed-up splits into the slowdown of the tasks themselves when two run
    at once and that idle share.
    """
    from prefect_dask import DaskTaskRunner

    from flows.line_request import LineRequest
    from flows.line_stages import score_line_stages
    from infra.cluster import configure_worker_spawn
    from musc_core.config import MuscConfig
    from tasks.backbones import BackboneSpec
    from tasks.synthetic.generator import generate_line

    data = work / f"workers-line{n}"
    if not data.exists():
        generate_line(data, category="part", num_samples=n, image_size=224, seed=5)
    results = []
    configure_worker_spawn("1")  # as musc's own local clusters: no malloc-trim penalty
    for workers in (1, 2):
        shutil.rmtree(work / f"store-workers-{workers}", ignore_errors=True)
        runner = DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": workers, "threads_per_worker": 1, "processes": True,
                "dashboard_address": ":0",
                "env": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
            },
        )
        request = LineRequest(
            data=str(data), data_format="mvtec3d", category="part", line="part",
            batch="bench", config=MuscConfig(modality="2d+3d"),
            spec=BackboneSpec(weights_2d="random", weights_3d="random"),
            storage=str(work / f"store-workers-{workers}"), out=str(work / f"out-w{workers}"),
            shard_size=4, reference_budget=None, reference_nights=0, reference_samples=None,
            device="cpu",
        )
        summary = score_line_stages.with_options(task_runner=runner)(request)
        shardable = sum(summary["timings"][k] for k in ("features", "pair_scoring", "reduction"))
        busy = task_busy_seconds(summary["run_id"], SHARDABLE_TASKS)
        row = {"workers": workers, "n": n, "shardable_s": round(shardable, 1),
               "task_busy_s": round(busy, 1), "worker_idle_s": round(workers * shardable - busy, 1),
               "stage_s": summary["timings"]}
        print(f"  workers={workers}: shardable stages {shardable:.1f} s, tasks busy {busy:.1f} s, "
              f"workers idle {row['worker_idle_s']:.1f} worker-s", flush=True)
        results.append(row)
    if len(results) == 2:
        one, two = results
        split = {
            "speedup": round(one["shardable_s"] / two["shardable_s"], 2),
            "task_slowdown": round(two["task_busy_s"] / one["task_busy_s"], 3),
            "idle_share_2": round(two["worker_idle_s"] / (2 * two["shardable_s"]), 3),
        }
        results.append(split)
        print(f"  2 workers / 1 worker throughput: {split['speedup']}x (target >= 1.8); the tasks "
              f"themselves {split['task_slowdown']}x slower when two run at once, workers idle "
              f"{100 * split['idle_share_2']:.1f} % of the 2-worker stages", flush=True)
    return results


def main() -> None:
    """Run the selected sections and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out/pipeline.json")
    parser.add_argument("--work", default="benchmarks/out/work")
    parser.add_argument("--sections", nargs="+", default=["e2e", "memory", "budget", "workers"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[40, 150])
    parser.add_argument("--modalities", nargs="+", default=["2d", "3d", "2d+3d"])
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--memory-budget", type=int, default=150)
    parser.add_argument("--budget-n", type=int, default=1000)
    parser.add_argument("--budgets", nargs="+", default=["all", "300", "150", "50"])
    parser.add_argument("--choices", nargs="+", default=["similar", "cycle"],
                        choices=["similar", "cycle"])
    parser.add_argument("--workers-n", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from flows.cli import quiet_console
    from infra.prefect_api import prefect_api

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"machine": machine()}
    print(f"musc pipeline benchmarks — {RANDOM_NOTE}", flush=True)
    print(f"CPU kind: {report['machine']['cpu_kind']}\n{report['machine']}", flush=True)
    quiet_console()
    with prefect_api(work / "prefect-home"):
        if "e2e" in args.sections:
            report["e2e"] = bench_e2e(work, args.sizes, args.modalities)
        if "memory" in args.sections:
            report["memory"] = bench_memory(work, args.memory_sizes, args.memory_budget, 16)
        if "budget" in args.sections:
            budgets = [None if b == "all" else int(b) for b in args.budgets]
            report["budget"] = bench_budget(work, args.budget_n, budgets, args.choices)
        if "workers" in args.sections:
            report["workers"] = bench_workers(work, args.workers_n)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
