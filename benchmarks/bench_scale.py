"""Scale benchmark: the score-line flow on a 2D line of N = 1000 and 10,000 parts with R = 150.

Run from the repository root::

    python -m benchmarks.bench_scale --sizes 1000 10000 --out benchmarks/out/scale.json

For each N it generates a synthetic line (``tasks.synthetic.generator``, MVTec 3D-AD layout,
small images: 64 px by default), then runs the real ``score_line`` flow, 2D only, with a tiny
timm ViT (``vit_tiny_patch16_224`` at patch 8) with **random weights**, a reference budget
R = 150 and blocks of 16 samples, on a local Dask cluster (``--cluster``, ``--workers``), with
a fresh store. It prints and records:

- the flow's wall time, its stage times and the time per sample; the CPU seconds of the flow
  process and of the worker processes (robust on a shared machine) and per sample; the ratios
  of both per-sample figures at each N to those at the first N (1.0: linear in N);
- the task runs: those the Prefect API recorded for the flow run, and those the planner
  (:func:`tasks.planning.groups.planned_task_runs`) says its stages submit;
- peak resident memory of the flow process, of the largest Dask worker process, and of the
  local Prefect server, each sampled every 50 ms; the worker's peak per stage (stages placed
  back to back from the run's end, boundaries to about a second);
- the task runs the planner gives, without running anything, for N up to 100,000; for N up
  to ``--plan-keys-max`` also the time of the flow's full planning (every cache key) and the
  pickled size of the pair and reduction tasks' parameters.

Random weights and small images: timings and memory only, never detection figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import threading
import time
from pathlib import Path

import psutil

from benchmarks.machine import machine_info, machine_line

BACKBONE = "vit_tiny_patch16_224"
#: Task names of the stages the planner groups (2D runs).
STAGE_TASKS = {
    "prepare": ("prepare",),
    "features": ("extract-2d", "aggregate-2d"),
    "pairs": ("score-pairs",),
    "reduction": ("reduce",),
}
NOTE = (
    "random weights, tiny ViT ({backbone}, patch 8) at {size} px, 2D only: timings, task runs "
    "and memory only"
)


class ProcessPeaks:
    """Peak resident memory and CPU time of this process and of the processes it started.

    Sampled every ``interval`` seconds. Processes that were already children of this one when
    sampling began (the local Prefect server) are reported apart from those started during the
    run (the Dask cluster's nanny and worker processes). CPU seconds (user + system, as last
    sampled) count only what the run used, so they hold on a machine shared with other loads,
    where wall time does not.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.own = 0
        self.started: dict[int, int] = {}
        self.existing: dict[int, int] = {}
        self.own_cpu = 0.0
        self.started_cpu: dict[int, float] = {}
        #: Largest worker RSS (bytes) seen in each second since the start, by second.
        self.worker_timeline: dict[int, int] = {}
        self._own_cpu_start = 0.0
        self._t0 = time.perf_counter()
        self._before: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        self.own = max(self.own, me.memory_info().rss)
        times = me.cpu_times()
        self.own_cpu = times.user + times.system - self._own_cpu_start
        for child in me.children(recursive=True):
            try:
                rss = child.memory_info().rss
                times = child.cpu_times()
            except psutil.Error:
                continue
            peaks = self.existing if child.pid in self._before else self.started
            peaks[child.pid] = max(peaks.get(child.pid, 0), rss)
            if child.pid not in self._before:
                self.started_cpu[child.pid] = times.user + times.system
                second = int(time.perf_counter() - self._t0)
                self.worker_timeline[second] = max(self.worker_timeline.get(second, 0), rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> ProcessPeaks:
        self._before = {p.pid for p in psutil.Process().children(recursive=True)}
        times = psutil.Process().cpu_times()
        self._own_cpu_start = times.user + times.system
        self._t0 = time.perf_counter()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _mib(value: int) -> float:
    return round(value / 2**20, 1)


def stage_worker_peaks(timeline: dict[int, int], stages: dict[str, float],
                       wall: float) -> dict[str, float]:
    """Peak worker RSS (MiB) during each stage, stages placed back to back from the run's end.

    The flow's stages run one after the other and the run ends with its last stage, so stage
    k is taken to span the ``stages[k]`` seconds before the later stages' total; the gaps
    between stages (task submission, a second or so) are not placed, so boundaries are
    approximate to about that.

    Args:
        timeline: largest worker RSS in bytes per second since the run's start.
        stages: stage durations in seconds, in run order.
        wall: the run's wall time in seconds.
    """
    peaks: dict[str, float] = {}
    end = wall
    for name, seconds in reversed(list(stages.items())):
        start = end - seconds
        inside = [rss for t, rss in timeline.items() if start - 1 <= t <= end]
        peaks[name] = _mib(max(inside, default=0))
        end = start
    return dict(reversed(list(peaks.items())))


async def _task_runs(run_id: str) -> dict[str, int]:
    """Task runs the Prefect API holds for one flow run, by task name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    counts: dict[str, int] = {}
    flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
    async with get_client() as client:
        offset = 0
        while page := await client.read_task_runs(
            flow_run_filter=flow_filter, limit=200, offset=offset
        ):
            for run in page:
                name = run.name.rsplit("-", 1)[0]
                counts[name] = counts.get(name, 0) + 1
            offset += len(page)
    return counts


def recorded_task_runs(run_id: str, settle: float = 3.0, patience: float = 120.0) -> dict:
    """Task runs of the flow run by name, once the server's count stopped growing.

    Task run records reach the server asynchronously (events): read until the count is the
    same ``settle`` seconds apart, or ``patience`` seconds passed.
    """
    deadline = time.monotonic() + patience
    counts = asyncio.run(_task_runs(run_id))
    while time.monotonic() < deadline:
        time.sleep(settle)
        again = asyncio.run(_task_runs(run_id))
        if sum(again.values()) == sum(counts.values()):
            return again
        counts = again
    return counts


def planned_runs(n: int, shard_size: int, budget: int) -> dict[str, int]:
    """The planner's task runs per stage for a 2D batch of ``n`` samples (nothing is run)."""
    from musc_core.references import reference_plan
    from tasks.planning.groups import planned_task_runs

    sizes = [shard_size] * (n // shard_size) + ([n % shard_size] if n % shard_size else [])
    shards = len(reference_plan(sizes, budget).block_pairs)
    runs = planned_task_runs(n, shard_size, len(sizes), shards, "2d")
    return {
        "blocks": len(sizes), "shards": shards, "prepare": runs.prepare,
        "features": runs.features, "pairs": runs.pairs, "reduction": runs.reduction,
        "total": runs.total,
    }


def plan_costs(n: int, shard_size: int, budget: int) -> dict[str, object]:
    """The flow's planning of a 2D pool of ``n`` samples, timed, and its tasks' parameter sizes.

    The samples get made-up content keys (nothing is read or computed); the plan and its groups
    are those the flow makes. Parameter sizes are pickled bytes (what a Dask worker is sent),
    per stage: the largest task's and all tasks' together.
    """
    import pickle

    from musc_core.config import MuscConfig
    from tasks.cache.keys import Identities, PreparedKeys, sample_keys
    from tasks.planning.blocks import PoolSample, batch_blocks, plan_scoring
    from tasks.planning.groups import reduce_groups, shard_groups

    config = MuscConfig(modality="2d")
    identities = Identities("synthetic", None)
    samples = [
        PoolSample(f"s{i:06d}", "bench",
                   sample_keys(PreparedKeys(f"{i:064x}", None, None), config, identities))
        for i in range(n)
    ]
    start = time.perf_counter()
    blocks = batch_blocks(samples, shard_size)
    plan = plan_scoring(blocks, config, budget)
    pairs = shard_groups(plan)
    reductions = reduce_groups(plan)
    seconds = time.perf_counter() - start

    def sizes(params: list[object]) -> dict[str, float]:
        each = [len(pickle.dumps(p)) for p in params]
        return {"largest_kib": round(max(each) / 1024, 1),
                "total_mib": round(sum(each) / 2**20, 2)}

    pair_params = [([[s.keys for s in plan.blocks[b]] for b in g.blocks], list(g.shards))
                   for g in pairs]
    return {
        "plan_s": round(seconds, 2),
        "pairs_params": sizes(pair_params),
        "reduce_params": sizes(reductions),
    }


def run_size(work: Path, n: int, args: argparse.Namespace) -> dict:
    """Generate the line of ``n`` parts (once) and score it with a fresh store."""
    from flows.score_line import score_line
    from flows.settings import Algorithm, Backbones, LineInput, LineRun, RollingBank
    from tasks.synthetic.generator import generate_line

    data = work / f"line{n}-{args.image_size}px"
    if not (data / "part").exists():
        start = time.perf_counter()
        generate_line(data, category="part", num_samples=n, image_size=args.image_size,
                      defect_rate=0.1, seed=n)
        print(f"  N={n}: line generated in {time.perf_counter() - start:.0f} s", flush=True)
    store = work / f"store-{n}"
    shutil.rmtree(store, ignore_errors=True)
    start = time.perf_counter()
    with ProcessPeaks() as peaks:
        summary = score_line(
            data=LineInput(data=str(data), data_format="mvtec3d"), batch="bench",
            backbones=Backbones(backbone_2d=BACKBONE, weights_2d="random", patch_size_2d=8),
            algorithm=Algorithm(modality="2d", image_size=args.image_size,
                                distance_dtype="float32", vit_dtype="float32"),
            bank=RollingBank(reference_budget=args.budget),
            run=LineRun(storage=str(store), cluster=args.cluster, workers=args.workers,
                        shard_size=args.shard_size, device="cpu"),
        )
    wall = time.perf_counter() - start
    recorded = recorded_task_runs(summary["run_id"])
    planned = planned_runs(summary["scored"], args.shard_size, args.budget)
    return {
        "n": n,
        "scored": summary["scored"],
        "budget": args.budget,
        "shard_size": args.shard_size,
        "cluster": args.cluster,
        "workers": args.workers,
        "wall_s": round(wall, 1),
        "s_per_sample": round(wall / n, 4),
        "stage_s": summary["timings"],
        "task_runs": sum(recorded.values()),
        "task_runs_by_name": recorded,
        "task_runs_grouped_stages": {
            stage: sum(recorded.get(name, 0) for name in names)
            for stage, names in STAGE_TASKS.items()
        },
        "planned": planned,
        "cpu_s_flow": round(peaks.own_cpu, 1),
        "cpu_s_workers": round(sum(peaks.started_cpu.values()), 1),
        "cpu_s_per_sample": round((peaks.own_cpu + sum(peaks.started_cpu.values())) / n, 4),
        "peak_rss_flow_mib": _mib(peaks.own),
        "peak_rss_worker_mib": _mib(max(peaks.started.values(), default=0)),
        "peak_rss_worker_by_stage_mib": stage_worker_peaks(
            peaks.worker_timeline, summary["timings"], wall),
        "processes_started": len(peaks.started),
        "peak_rss_prefect_server_mib": _mib(max(peaks.existing.values(), default=0)),
    }


def main() -> None:
    """Run the sizes, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--budget", type=int, default=150, help="reference budget R")
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--cluster", default="local", help="'local' (Dask) or 'threads'")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--plan-sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--plan-keys-max", type=int, default=10000,
                        help="largest N whose full plan (keys, groups) is built and timed")
    parser.add_argument("--work", default="benchmarks/out/scale-work")
    parser.add_argument("--out", default="benchmarks/out/scale.json")
    args = parser.parse_args()
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from flows.cli import quiet_console
    from infra.prefect_api import prefect_api

    note = NOTE.format(backbone=BACKBONE, size=args.image_size)
    info = machine_info()
    print(f"musc scale benchmark — {note}\n{machine_line(info)}", flush=True)
    report: dict[str, object] = {"machine": info, "note": note, "planned": {}, "runs": []}
    for n in args.plan_sizes:
        start = time.perf_counter()
        planned = planned_runs(n, args.shard_size, args.budget)
        planned["counting_s"] = round(time.perf_counter() - start, 2)
        if n <= args.plan_keys_max:
            planned["plan"] = plan_costs(n, args.shard_size, args.budget)
        report["planned"][str(n)] = planned
        print(f"  planned N={n:6d}: {planned['blocks']} blocks, {planned['shards']} shards -> "
              f"{planned['total']} task runs ({planned})", flush=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    quiet_console()
    runs: list[dict] = []
    with prefect_api(work / "prefect-home"):
        for n in args.sizes:
            row = run_size(work, n, args)
            first = runs[0] if runs else row
            row["per_sample_ratio"] = round(row["s_per_sample"] / first["s_per_sample"], 2)
            row["cpu_per_sample_ratio"] = round(
                row["cpu_s_per_sample"] / first["cpu_s_per_sample"], 2
            )
            runs.append(row)
            print(f"  N={n:6d} R={args.budget}: {row['wall_s']} s, {row['s_per_sample']} s/sample "
                  f"(x{row['per_sample_ratio']} of N={runs[0]['n']}), CPU {row['cpu_s_flow']} s "
                  f"flow + {row['cpu_s_workers']} s workers = {row['cpu_s_per_sample']} s/sample "
                  f"(x{row['cpu_per_sample_ratio']}), {row['task_runs']} task "
                  f"runs (planner: {row['planned']['total']} + discovery/report), peak RSS flow "
                  f"{row['peak_rss_flow_mib']:.0f} MiB, worker {row['peak_rss_worker_mib']:.0f} "
                  f"MiB, Prefect server {row['peak_rss_prefect_server_mib']:.0f} MiB; stages "
                  f"{row['stage_s']}; worker peak by stage (MiB) "
                  f"{row['peak_rss_worker_by_stage_mib']}", flush=True)
    report["runs"] = runs
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
