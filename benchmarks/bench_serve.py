"""Latency of the inspection station (``musc serve``): one part per HTTP request, 2D+3D.

Run from the repository root::

    python -m benchmarks.bench_serve --config small --out benchmarks/out/serve-small.json
    python -m benchmarks.bench_serve --config default --out benchmarks/out/serve-default.json

It generates a synthetic line (:mod:`tasks.synthetic.generator`): ``--bank-samples`` parts
scored as batch ``b1`` with ``musc score`` (the bank), and ``--parts`` other parts of the same
object kind (another seed). Then it starts ``musc serve`` on the bank in its own process
(127.0.0.1, a free port, ``--no-clean-bank``: the bank holds every one of the
``--bank-samples``), waits for ``GET /health``, sends ``--warmup`` parts (not counted), and
scores the ``--parts`` parts one by one over HTTP (``POST /score``, multipart image + XYZ
TIFF), timing each request from the client: the figures are p50/p95/mean/max of those wall
times, and the medians of the station's own per-stage times (``timings`` of each answer).

``--config small``: 64 px, a tiny ViT (patch 8) and Point-MAE with 32 groups, quick.
``--config default``: the default backbones (ViT-B/8 DINO, Point-MAE) at 224 px. Both use
**random weights** (no pretrained checkpoint is fetched): the latencies are those of the real
computation, the scores mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.machine import machine_info, machine_line
from tasks.synthetic.generator import generate_line

RANDOM_NOTE = "random weights: latencies are real, the scores mean nothing"
#: ``musc score`` options of each configuration (the station takes the bank's).
CONFIGS = {
    "small": ["--backbone-2d", "vit_tiny_patch16_224", "--patch-size-2d", "8",
              "--image-size", "64", "--num-groups", "32", "--group-size", "16",
              "--ipg-step", "8", "--distance-dtype", "float32", "--vit-dtype", "float32"],
    "default": [],
}
SIZES = {"small": 64, "default": 224}
SHAPE = "puck"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def musc(*args: str) -> list[str]:
    """The command line running ``musc`` from this checkout."""
    return [sys.executable, "-m", "flows.cli", *args]


def score_bank(data: Path, storage: Path, out: Path, config: str) -> None:
    """Score the bank's line as batch ``b1`` (2D+3D, random weights)."""
    subprocess.run(
        musc("score", str(data), "--format", "mvtec3d", "--category", "part", "--batch", "b1",
             "--out", str(out), "--storage", str(storage), "--modality", "2d+3d",
             "--weights-2d", "random", "--weights-3d", "random", "--cluster", "threads",
             "--quiet", *CONFIGS[config]),
        check=True, stdout=subprocess.DEVNULL,
    )


def wait_healthy(client: httpx.Client, server: subprocess.Popen, limit: float) -> dict:
    """``GET /health`` once the station answers (it loads the bank and builds the backbones)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"musc serve ended with status {server.returncode}")
        try:
            return client.get("/health").raise_for_status().json()
        except httpx.TransportError:
            time.sleep(0.5)
    raise TimeoutError(f"the station did not answer within {limit:.0f} s")


def part_files(data: Path) -> list[tuple[Path, Path]]:
    """(image, XYZ TIFF) of every part of a generated line, in name order."""
    images = sorted((data / "part" / "test").glob("*/rgb/*.png"))
    return [(p, p.parent.parent / "xyz" / f"{p.stem}.tiff") for p in images]


def post(client: httpx.Client, image: Path, xyz: Path) -> tuple[float, dict]:
    """Score one part; the client's wall seconds and the answer."""
    files = {"image": (image.name, image.read_bytes(), "image/png"),
             "xyz": (xyz.name, xyz.read_bytes(), "image/tiff")}
    start = time.perf_counter()
    response = client.post("/score", files=files, data={"name": f"{image.parent.parent.name}/"
                                                              f"{image.stem}"})
    seconds = time.perf_counter() - start
    response.raise_for_status()
    return seconds, response.json()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between order statistics."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def run(config: str, bank_samples: int, parts: int, warmup: int, work: Path) -> dict:
    """The whole benchmark in ``work``; its figures."""
    size = SIZES[config]
    # one object kind for both (the seed would pick it): the parts are the bank's product
    generate_line(work / "bank", category="part", num_samples=bank_samples, image_size=size,
                  defect_rate=0.25, seed=0, shape=SHAPE)
    generate_line(work / "parts", category="part", num_samples=parts + warmup, image_size=size,
                  defect_rate=0.25, seed=1, shape=SHAPE)
    storage = work / "store"
    start = time.perf_counter()
    score_bank(work / "bank", storage, work / "bank-results", config)
    bank_seconds = time.perf_counter() - start
    port = free_port()
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen(
        musc("serve", "part", "--storage", str(storage), "--port", str(port),
             "--out", str(work / "served"), "--no-clean-bank"),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            start = time.perf_counter()
            health = wait_healthy(client, server, 900)
            ready = time.perf_counter() - start
            files = part_files(work / "parts")
            for image, xyz in files[:warmup]:
                post(client, image, xyz)
            latencies, stages, flagged = [], {}, 0
            for image, xyz in files[warmup:warmup + parts]:
                seconds, answer = post(client, image, xyz)
                latencies.append(seconds)
                flagged += int(answer["flagged"])
                for stage, value in answer["timings"].items():
                    stages.setdefault(stage, []).append(value)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {
        "config": config,
        "bank_samples": health["bank_samples"],
        "bank_memory_mb": health["bank_memory_mb"],
        "bank_scoring_seconds": round(bank_seconds, 1),
        "station_ready_seconds": round(ready, 1),
        "parts": len(latencies),
        "warmup": warmup,
        "flagged": flagged,
        "latency_seconds": {
            "p50": round(percentile(latencies, 50), 3),
            "p95": round(percentile(latencies, 95), 3),
            "mean": round(statistics.fmean(latencies), 3),
            "max": round(max(latencies), 3),
        },
        "stage_median_seconds": {k: round(statistics.median(v), 3) for k, v in stages.items()},
        "backbones": health["backbones"],
        "random_weights": health["random_weights"],
        "note": RANDOM_NOTE,
    }


def print_figures(result: dict, machine: dict) -> None:
    """The figures as printed lines."""
    latency = result["latency_seconds"]
    print(f"musc serve, config {result['config']} (2D+3D, {RANDOM_NOTE})")
    print(machine_line(machine))
    print(f"bank: {result['bank_samples']} samples ({result['bank_memory_mb']} MiB in memory), "
          f"station ready in {result['station_ready_seconds']} s")
    print(f"{result['parts']} parts over HTTP after {result['warmup']} warm-up: p50 "
          f"{latency['p50']:.3f} s, p95 {latency['p95']:.3f} s, mean {latency['mean']:.3f} s, "
          f"max {latency['max']:.3f} s")
    split = ", ".join(f"{k} {v:.3f}" for k, v in result["stage_median_seconds"].items())
    print(f"station's stage medians (s): {split}")


def main() -> None:
    """Parse the options, run, print and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small",
                        help="small (64 px, tiny backbones) or default (224 px, ViT-B/8)")
    parser.add_argument("--bank-samples", type=int, default=16, help="samples of the bank")
    parser.add_argument("--parts", type=int, default=50, help="parts timed")
    parser.add_argument("--warmup", type=int, default=3, help="parts sent first, not timed")
    parser.add_argument("--work", default=None,
                        help="working folder, a new one for each run: the bank's batch record is "
                        "never replaced (default: a temporary one)")
    parser.add_argument("--out", default=None, help="JSON file of the figures")
    args = parser.parse_args()
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as temporary:
        work = Path(args.work or temporary)
        result = run(args.config, args.bank_samples, args.parts, args.warmup, work)
    result["machine"] = machine
    print_figures(result, machine)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
