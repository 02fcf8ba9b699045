"""The headline benchmark: ``musc score`` as a user runs it, a fresh process per run.

Run from the repository root::

    python -m benchmarks.bench_cli --out benchmarks/out/cli.json
    python -m benchmarks.bench_cli --n 150 --out benchmarks/out/cli-n150.json
    python -m benchmarks.bench_cli --before /path/to/older/checkout --out ...

A line shaped like MVTec 3D-AD (``--preset``, default ``mvtec3d-400``: 400 × 400 XYZ maps at
0.2 mm pitch, ≈ 70k foreground points per scan, pre-cleaned, half of the parts touching or
crossing the frame) is generated once; then each checkout (this one, and ``--before`` if given)
runs ``python -m flows.cli score`` on it in a new process with a new storage: the local Prefect
server's start and stop, the imports, the preparation, the features, the scoring and the
report are all inside the process wall time, which is the headline figure. The flow's own stage
times (from the run's ``run.json``) are the breakdown; "outside the flow" is the rest (start-up
and shutdown). Peak memory is sampled over the command's whole process tree (the server
included) and for its largest process.

Every figure comes from random weights (``--weights-2d random --weights-3d random``), which
cost what real weights cost: timings and memory only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks.machine import machine_info, machine_line

RANDOM_NOTE = "random weights: timings and memory only"
ROOT = Path(__file__).resolve().parents[1]


class TreeMemory:
    """Peak resident memory of a process tree (sum) and of its largest process, every 50 ms."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.tree = self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                sizes = [root.memory_info().rss]
                for child in root.children(recursive=True):
                    try:
                        sizes.append(child.memory_info().rss)
                    except psutil.Error:
                        pass
            except psutil.Error:
                sizes = []
            if sizes:
                self.tree = max(self.tree, sum(sizes))
                self.largest = max(self.largest, max(sizes))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _revision(root: Path) -> str:
    """The checkout's commit (with ``+dirty`` when it has uncommitted changes)."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def generate(data: Path, n: int, preset: str, seed: int) -> None:
    """The benchmark line (skipped when ``data`` holds it already)."""
    from tasks.synthetic.generator import generate_line, preset_kwargs

    if (data / "part" / "line.json").exists():
        info = json.loads((data / "part" / "line.json").read_text())
        if info["parameters"].get("num_samples") == n:
            return
    generate_line(data, category="part", num_samples=n, seed=seed, **preset_kwargs(preset))


def run_once(root: Path, data: Path, work: Path, modality: str, extra: list[str]) -> dict:
    """One ``musc score`` process of the checkout at ``root``; its wall time and breakdown."""
    store, out = work / "store", work / "out"
    shutil.rmtree(work, ignore_errors=True)
    command = [
        sys.executable, "-m", "flows.cli", "score", str(data), "--format", "mvtec3d",
        "--modality", modality, "--weights-2d", "random", "--weights-3d", "random",
        "--storage", str(store), "--out", str(out), "--quiet", *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(root), "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    with TreeMemory(process.pid) as memory:
        output, _ = process.communicate()
    wall = time.perf_counter() - started
    summary = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    line = (summary.get("lines") or [{}])[0]
    flow = float(line.get("seconds", 0.0))
    return {
        "exit_status": process.returncode,
        "wall_s": round(wall, 2),
        "flow_s": round(flow, 2),
        "outside_flow_s": round(wall - flow, 2),
        "stages_s": line.get("timings", {}),
        "scored": line.get("scored"),
        "set_aside": len(line.get("set_aside", [])),
        "peak_tree_mib": round(memory.tree / 2**20, 1),
        "peak_process_mib": round(memory.largest / 2**20, 1),
        "metrics": line.get("metrics"),
        "output_tail": output[-2000:] if process.returncode else "",
    }


def _row(name: str, result: dict, n: int) -> str:
    stages = ", ".join(f"{k} {v:.1f}" for k, v in result["stages_s"].items())
    return (
        f"{name:>7} | {result['wall_s']:7.1f} s | {result['wall_s'] / n:6.2f} s/sample | "
        f"outside the flow {result['outside_flow_s']:5.1f} s | scored {result['scored']}, "
        f"set aside {result['set_aside']} | peak {result['peak_tree_mib']:.0f} MiB tree, "
        f"{result['peak_process_mib']:.0f} MiB largest | {stages}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "cli.json")
    parser.add_argument("--n", type=int, default=40, help="samples in the line")
    parser.add_argument("--preset", default="mvtec3d-400", help="musc synth --preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modality", default="2d+3d")
    parser.add_argument("--runs", type=int, default=1, help="runs of each checkout, alternated")
    parser.add_argument("--data", type=Path, default=None, help="where the line is generated")
    parser.add_argument("--before", type=Path, default=None,
                        help="an older checkout to run on the same line (the baseline)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further musc score options, for every checkout")
    args = parser.parse_args(argv)

    info = machine_info()
    print(machine_line(info), flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="musc-bench-cli-"))
    data = args.data or scratch / "line"
    generate(data, args.n, args.preset, args.seed)
    roots = {"now": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    results: dict[str, list[dict]] = {name: [] for name in roots}
    for _ in range(args.runs):
        for name, root in roots.items():
            result = run_once(root, data, scratch / f"run-{name}", args.modality, args.extra)
            results[name].append(result)
            print(_row(name, result, args.n), flush=True)
    shutil.rmtree(scratch / "run-now", ignore_errors=True)
    shutil.rmtree(scratch / "run-before", ignore_errors=True)
    record = {
        "benchmark": "bench_cli",
        "note": RANDOM_NOTE,
        "machine": info,
        "line": {"preset": args.preset, "num_samples": args.n, "seed": args.seed,
                 "modality": args.modality},
        "command": "python -m flows.cli score <line> --format mvtec3d --modality "
                   f"{args.modality} --weights-2d random --weights-3d random --storage <new> "
                   f"--out <new> --quiet {' '.join(args.extra)}".strip(),
        "checkouts": {name: {"root": str(root), "revision": _revision(root)}
                      for name, root in roots.items()},
        "results": results,
        "load_average_end": os.getloadavg(),
    }
    if "before" in results:
        record["wall_ratio_before_over_now"] = [
            round(b["wall_s"] / a["wall_s"], 3)
            for a, b in zip(results["now"], results["before"], strict=True)
        ]
        print(f"before / now, process wall: {record['wall_ratio_before_over_now']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"record: {args.out}")
    if args.data is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
