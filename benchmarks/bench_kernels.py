"""Kernel benchmarks of musc_core against this machine's measured matmul peak.

Run from the repository root::

    python -m benchmarks.bench_kernels --out benchmarks/out/kernels.json

Every model uses random weights: the figures are timings only, never accuracy. Each timing is
repeated (``--repeat``) after one warm-up run; the table shows the median and the best run, the
JSON keeps every run. Targets are judged on the median. On a machine shared with other jobs the
best run is the better estimate of what the kernel can do, the median of what a job sees.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.machine import machine_info as shared_machine_info
from musc_core import grouping as grouping_module
from musc_core.aggregation import snamd_2d, snamd_3d
from musc_core.anomaly_maps import map_3d
from musc_core.attention import native_applies, native_attention
from musc_core.config import MuscConfig
from musc_core.features_2d import ViTFeatureExtractor
from musc_core.fpfh import FpfhFeatureExtractor, FpfhParams, point_descriptors, pool_groups
from musc_core.grouping import PointSample
from musc_core.hardware import cpu_has_fast_bf16
from musc_core.mutual_scoring import pair_distances, pair_minima_untiled
from musc_core.pipeline import prepare_points, vit_autocast
from musc_core.point_mae import PointFeatureExtractor, load_point_mae

RANDOM_NOTE = "random weights: timing only"
# bf16 only where it is native: on an AVX2-only CPU torch's bf16 GEMM runs at ~0.3 GFLOP/s
# and the pipeline refuses it, so there is nothing to measure.
DTYPES = {"float32": torch.float32} | (
    {"bfloat16": torch.bfloat16} if cpu_has_fast_bf16() else {}
)
SECTIONS = ("pairs", "grouping", "map3d", "snamd", "attention", "vit", "pointmae", "fpfh")
TARGETS = {
    "pair_ratio": 0.70,
    "grouping_s": 0.10,
    "map_3d_s": 0.05,
    "snamd_2d_s": 0.05,
    "vit_ratio": 0.70,
    "point_mae_ratio/float32": 0.70,
    "point_mae_ratio/bfloat16": 0.80,  # issue 17
    "vit_ratio/bfloat16": 0.65,  # issue 17
}
#: Attention shapes of the backbones: (name, batch, heads, tokens), head dimension 64.
ATTENTION_SHAPES = (
    ("vit_b8_224_batch8", 8, 12, 785),
    ("vit_b8_224_batch1", 1, 12, 785),
    ("point_mae_batch4", 4, 6, 1024),
    ("point_mae_batch1", 1, 6, 1024),
)


def measure(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> dict[str, Any]:
    """Wall seconds of ``fn()``: median, best and every run after ``warmup`` warm-up calls."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return {"median_s": statistics.median(runs), "best_s": min(runs), "runs_s": runs}


def rate(flops: float, timing: dict[str, Any], peak: float | None) -> dict[str, Any]:
    """GFLOP/s at the median and best run, and the median's ratio to a peak in GFLOP/s."""
    out = {
        "gflop": flops / 1e9,
        "gflops_median": flops / timing["median_s"] / 1e9,
        "gflops_best": flops / timing["best_s"] / 1e9,
    }
    if peak:
        out["ratio_median"] = out["gflops_median"] / peak
        out["ratio_best"] = out["gflops_best"] / peak
    return out


def machine_info() -> dict[str, Any]:
    """The shared machine record plus the dtypes this run measures and the weights note."""
    return {**shared_machine_info(), "dtypes_measured": list(DTYPES), "note": RANDOM_NOTE}


def bench_peak(sizes: Sequence[int], repeat: int) -> dict[str, Any]:
    """torch.mm of square matrices per dtype and size; the peak is the best run's GFLOP/s."""
    out: dict[str, Any] = {}
    for name, dtype in DTYPES.items():
        entries = {}
        for size in sizes:
            a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
            timing = measure(lambda a=a, b=b: torch.mm(a, b), repeat)
            entries[str(size)] = {"size": size, **timing, **rate(2.0 * size**3, timing, None)}
        best = max(entries.values(), key=lambda e: e["gflops_best"])
        out[name] = {**best, "by_size": entries, "peak_gflops": best["gflops_best"]}
    return out


def merge_peaks(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """The better of two peak measurements per dtype (noise from other jobs only slows)."""
    return {name: max(first[name], second[name], key=lambda e: e["peak_gflops"]) for name in first}


def unit_features(n: int, length: int, channels: int, seed: int) -> torch.Tensor:
    """(n, L, C) unit-norm random features, like SNAMD outputs."""
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, length, channels, generator=gen), dim=-1)


def bench_pairs(
    n: int, block: int, repeat: int, peaks: dict[str, float], shapes: dict[str, tuple[int, int]]
) -> dict[str, Any]:
    """pair_distances over N samples and pair_minima_untiled of block×block samples.

    FLOPs count each unordered pair once: ``N(N−1)/2 · 2·L²·C``.
    """
    out: dict[str, Any] = {}
    for shape_name, (length, channels) in shapes.items():
        features = unit_features(n, length, channels, seed=length)
        per_pair = 2.0 * length * length * channels
        for name, dtype in DTYPES.items():
            timing = measure(lambda f=features, d=dtype: pair_distances(f, block, d), repeat)
            out[f"pair_distances/{shape_name}/{name}"] = {
                "n": n,
                "block": block,
                "length": length,
                "channels": channels,
                **timing,
                **rate(n * (n - 1) / 2 * per_pair, timing, peaks[name]),
            }
            a, b = features[:block], features[block : 2 * block]
            timing = measure(lambda a=a, b=b, d=dtype: pair_minima_untiled(a, b, d), repeat)
            out[f"pair_minima_untiled/{shape_name}/{name}"] = {
                "block": block,
                "length": length,
                "channels": channels,
                **timing,
                **rate(block * block * per_pair, timing, peaks[name]),
            }
    return out


def synthetic_xyz(size: int, seed: int) -> torch.Tensor:
    """An organized (S, S, 3) scan of a ring-shaped part with a step, a bump and sensor noise.

    About 60 % of the pixels hold a point (≈ 31k at 224 px): a torus-like ring whose outer
    third is raised by a step, a small bump (a defect), and 0.5 ‰ of Gaussian depth noise, so
    that a realistic share of group centres lies on curved or broken surfaces (IPG).
    """
    gen = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1.0, 1.0, size)
    v, u = torch.meshgrid(axis, axis, indexing="ij")
    radius = torch.sqrt(u**2 + v**2)
    inside = (radius > 0.3) & (radius < 0.95)
    tube = (radius - 0.625) / 0.325
    z = 0.25 * torch.sqrt((1.0 - tube**2).clamp_min(0.0)) + 0.05 * (radius > 0.8)
    z = z + 0.04 * torch.exp(-((u - 0.4) ** 2 + (v - 0.3) ** 2) / 0.003)
    z = z + 5e-4 * torch.randn(size, size, generator=gen) + 1.0
    xyz = torch.stack([u, v, z], dim=-1)
    return torch.where(inside[..., None], xyz, torch.zeros(()))


def bench_grouping(config: MuscConfig, repeat: int) -> tuple[dict[str, Any], PointSample]:
    """prepare_points (foreground, normalization, FPS, KNN, curvature, IPG) of one sample."""
    xyz = synthetic_xyz(config.image_size, seed=0)
    sample = prepare_points(xyz, config)
    points = sample.points
    timing = measure(lambda: prepare_points(xyz, config), repeat)
    g = config.num_groups
    k = config.group_size
    fps = measure(lambda: grouping_module.farthest_point_sample(points, g), repeat)
    centre_index = sample.grouping.centre_index
    search = measure(lambda: grouping_module.knn(points[centre_index], points, 2 * k), repeat)
    space = grouping_module.knn(points[centre_index], points, 2 * k).index
    space = grouping_module._centre_first(space, centre_index)
    curvature = grouping_module.centre_curvature(points, centre_index, space, k)
    ipg = measure(
        lambda: grouping_module.iterative_point_grouping(
            points, space, curvature, k, config.ipg_step, config.curvature_threshold
        ),
        repeat,
    )
    return {
        "grouping": {
            "points": int(points.shape[0]),
            "groups": g,
            "group_size": k,
            "ipg_step": config.ipg_step,
            "ipg_fraction": float((curvature >= config.curvature_threshold).float().mean()),
            **timing,
            "target_s": TARGETS["grouping_s"],
            "parts_median_s": {
                "fps": fps["median_s"],
                "knn_2k": search["median_s"],
                "ipg": ipg["median_s"],
            },
        }
    }, sample


def bench_map3d(sample: PointSample, config: MuscConfig, repeat: int) -> dict[str, Any]:
    """3D→pixel map (IDW from the 3 nearest centres + blur) of one sample."""
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(config.num_groups, generator=gen)
    grouping = sample.grouping

    def run() -> torch.Tensor:
        return map_3d(
            scores,
            grouping.centres,
            sample.points,
            sample.pixel_index,
            config.image_size,
            config.map_blur_sigma,
        )

    timing = measure(run, repeat)
    return {
        "map_3d": {"points": int(sample.points.shape[0]), **timing, "target_s": TARGETS["map_3d_s"]}
    }


def bench_snamd(sample: PointSample, config: MuscConfig, n: int, repeat: int) -> dict[str, Any]:
    """2D SNAMD (784×768, all layers) and 3D SNAMD (1024×384, all layers) per sample."""
    layers = len(config.layers_2d)
    tokens_2d = torch.randn(n, 784, 768, generator=torch.Generator().manual_seed(2))
    timing_2d = measure(
        lambda: [snamd_2d(tokens_2d, 28, config.aggregation_degrees) for _ in range(layers)],
        repeat,
    )
    g = config.num_groups
    tokens_3d = torch.randn(n, g, 384, generator=torch.Generator().manual_seed(3))
    centres = sample.grouping.centres.expand(n, -1, -1).contiguous()
    curvature = sample.grouping.curvature.expand(n, -1).contiguous()
    timing_3d = measure(
        lambda: [
            snamd_3d(
                tokens_3d,
                centres,
                curvature,
                config.aggregation_degrees,
                config.curvature_threshold,
            )
            for _ in range(layers)
        ],
        repeat,
    )
    per = {"median_s": 1.0 / n, "best_s": 1.0 / n}
    return {
        "snamd_2d": {
            "n": n,
            "layers": layers,
            "shape": [784, 768],
            **timing_2d,
            "per_sample_median_s": timing_2d["median_s"] * per["median_s"],
            "per_sample_best_s": timing_2d["best_s"] * per["best_s"],
            "target_s": TARGETS["snamd_2d_s"],
        },
        "snamd_3d": {
            "n": n,
            "layers": layers,
            "shape": [g, 384],
            **timing_3d,
            "per_sample_median_s": timing_3d["median_s"] * per["median_s"],
            "per_sample_best_s": timing_3d["best_s"] * per["best_s"],
        },
    }


def bench_attention(repeat: int, peaks: dict[str, float]) -> dict[str, Any]:
    """The backbones' attention in bf16: PyTorch's CPU kernel against musc's native one.

    Only where the CPU has fast bf16 (the native kernel needs AVX512-BF16). FLOPs: the two
    products, 4·B·H·N²·64.
    """
    if "bfloat16" not in DTYPES:
        return {}
    out: dict[str, Any] = {}
    generator = torch.Generator().manual_seed(5)
    for name, batch, heads, tokens in ATTENTION_SHAPES:
        qkv = torch.randn(batch, tokens, 3, heads, 64, generator=generator).to(torch.bfloat16)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        flops = 4 * batch * heads * tokens * tokens * 64
        runs = {"torch_sdpa": F.scaled_dot_product_attention}
        if native_applies(q, k, v):
            runs["native"] = native_attention
        for kernel, fn in runs.items():
            timing = measure(lambda f=fn, a=(q, k, v): f(*a), repeat)
            out[f"attention/{name}/{kernel}/bfloat16"] = {
                "shape": [batch, heads, tokens, 64], **timing,
                **rate(flops, timing, peaks["bfloat16"]),
            }
        if "native" in runs:
            out[f"attention/{name}/native/bfloat16"]["faster_than_torch"] = (
                out[f"attention/{name}/torch_sdpa/bfloat16"]["median_s"]
                / out[f"attention/{name}/native/bfloat16"]["median_s"]
            )
    return out


def attention_flops(
    query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], *_, **__
) -> int:
    """FLOPs of ``softmax(q kᵀ) v``'s two products: ``2·B·H·N·M·d + 2·B·H·N·M·d_v``.

    Args:
        query_shape: (B, H, N, d).
        key_shape: (B, H, M, d).
        value_shape: (B, H, M, d_v).

    Returns:
        Multiply-adds counted as two FLOPs each; the softmax is not counted (as torch's
        counter does for its attention operations).
    """
    batch, heads, queries, dim = query_shape
    keys = key_shape[-2]
    return 2 * batch * heads * queries * keys * (dim + value_shape[-1])


#: Attention operations torch's FlopCounterMode has no formula for: PyTorch's CPU attention
#: (what ``F.scaled_dot_product_attention`` runs in float32 on a CPU).
UNCOUNTED_ATTENTION = {
    op: attention_flops
    for op in (getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None),)
    if op is not None
}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call: what torch's operations run (matmuls, convs, attention products).

    torch's FlopCounterMode counts matmuls, convolutions and its CUDA attention kernels;
    PyTorch's CPU attention is counted here with :func:`attention_flops`. Count in float32:
    musc's native bf16 attention is no torch operation the counter sees.
    """
    with FlopCounterMode(display=False, custom_mapping=UNCOUNTED_ATTENTION) as counter:
        fn()
    return counter.get_total_flops()


def bench_vit(config: MuscConfig, batch: int, repeat: int, peaks: dict[str, float]) -> dict:
    """ViT-B/8 forward_intermediates of a batch, bf16 autocast (pipeline's) and float32."""
    extractor = ViTFeatureExtractor.create("vit_base_patch8_224.dino", "random", 224)
    images = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    # Counted in float32, where the routed attention computes each product once as in bf16:
    # patch embedding, qkv, the two attention products, proj and MLP of every block run.
    flops = count_flops(lambda: extractor.extract(images[:1], config.layers_2d)) * batch
    out = {}
    for name in DTYPES:
        run_config = MuscConfig(vit_dtype=name)

        def run(c: MuscConfig = run_config) -> list[torch.Tensor]:
            with vit_autocast(c, images.device):
                return extractor.extract(images, c.layers_2d, batch_size=batch)

        timing = measure(run, repeat)
        out[f"vit/{name}"] = {
            "model": "vit_base_patch8_224.dino",
            "weights": RANDOM_NOTE,
            "batch": batch,
            **timing,
            **rate(flops, timing, peaks[name]),
            "images_per_s_median": batch / timing["median_s"],
            "target_ratio": TARGETS.get(f"vit_ratio/{name}", TARGETS["vit_ratio"]),
        }
    return out


def bench_point_mae(
    samples: Sequence[PointSample], config: MuscConfig, repeat: int, peaks: dict[str, float]
) -> dict[str, Any]:
    """Point-MAE encoder + 12 blocks in each dtype: one sample per call and a batch per call.

    ``bfloat16`` is the pipeline's bf16 path (wide products in bf16, statistics in float32);
    it is measured only where the CPU has fast bf16 (:data:`DTYPES`), and its ratio refers to
    the bf16 peak.
    """
    extractor = PointFeatureExtractor(load_point_mae(None, True, "sample"), weights="random")
    first = samples[0]
    out = {}
    for name in DTYPES:
        dtype = DTYPES[name]

        def single(d: torch.dtype = dtype) -> list[torch.Tensor]:
            return extractor.extract(first.points, first.grouping, config.layers_3d, d)

        def batch(d: torch.dtype = dtype) -> list[torch.Tensor]:
            return extractor.extract_many(
                [s.points for s in samples], [s.grouping for s in samples], config.layers_3d, d
            )

        for run_name, fn, count in (("extract", single, 1), ("extract_many", batch, len(samples))):
            # Counted in float32: the native bf16 attention is not a torch operation the
            # counter sees, and the FLOPs do not depend on the dtype.
            flops = count_flops(lambda f=fn: f(torch.float32))
            timing = measure(fn, repeat)
            out[f"point_mae/{run_name}/{name}"] = {
                "weights": RANDOM_NOTE,
                "samples_per_call": count,
                **timing,
                **rate(flops, timing, peaks[name]),
                "per_sample_median_s": timing["median_s"] / count,
                "per_sample_best_s": timing["best_s"] / count,
                "target_ratio": TARGETS[f"point_mae_ratio/{name}"],
            }
    return out


def bench_fpfh(
    samples: Sequence[PointSample],
    config: MuscConfig,
    repeat: int,
    point_mae: dict[str, Any] | None,
) -> dict[str, Any]:
    """The weight-free FPFH backbone (default parameters): a sample per call and a batch.

    Also its two parts on the first sample (Open3D normals + FPFH of every point; pooling),
    and, when the Point-MAE section ran, how many times faster per sample than Point-MAE's
    single-sample ``extract``.
    """
    extractor = FpfhFeatureExtractor()
    params = FpfhParams()
    first = samples[0]
    coords = first.points.double().numpy()
    descriptors = torch.from_numpy(point_descriptors(coords, params.radii, params.normal_radius)[0])
    members = first.grouping.members

    def single() -> list[torch.Tensor]:
        return extractor.extract(first.points, first.grouping, config.layers_3d)

    def batch() -> list[torch.Tensor]:
        return extractor.extract_many(
            [s.points for s in samples], [s.grouping for s in samples], config.layers_3d
        )

    def describe() -> list:
        return point_descriptors(coords, params.radii, params.normal_radius)

    def pool() -> list[torch.Tensor]:
        size = members.shape[1]
        return [
            pool_groups(descriptors, members[:, : max(1, round(f * size))], params.pooling)
            for f in params.fractions
        ]

    runs = [("extract", single, 1), ("extract_many", batch, len(samples))]
    runs += [("open3d_normals_fpfh", describe, 1), ("pooling", pool, 1)]
    reference = None if point_mae is None else point_mae["per_sample_median_s"]
    out = {}
    for name, fn, count in runs:
        timing = measure(fn, repeat)
        entry = {
            "backbone": params.identity,
            "points": int(first.points.shape[0]),
            "samples_per_call": count,
            **timing,
            "per_sample_median_s": timing["median_s"] / count,
            "per_sample_best_s": timing["best_s"] / count,
        }
        if reference is not None and name.startswith("extract"):
            entry["point_mae_per_sample_median_s"] = reference
            entry["faster_than_point_mae"] = reference / entry["per_sample_median_s"]
        out[f"fpfh/{name}"] = entry
    return out


def refresh_ratios(kernels: dict[str, Any], peaks: dict[str, float]) -> None:
    """Recompute every entry's ratio to the peak of its dtype (the key's last part)."""
    for name, entry in kernels.items():
        if "ratio_median" in entry:
            dtype = name.rsplit("/", 1)[-1]
            entry["peak_gflops"] = peaks[dtype]
            entry["ratio_median"] = entry["gflops_median"] / peaks[dtype]
            entry["ratio_best"] = entry["gflops_best"] / peaks[dtype]


def _row(name: str, entry: dict[str, Any]) -> str:
    median, best = entry.get("median_s"), entry.get("best_s")
    if "per_sample_median_s" in entry:
        median, best = entry["per_sample_median_s"], entry["per_sample_best_s"]
    parts = [f"{name:<38}", f"{median:10.4f}", f"{best:10.4f}"]
    if "gflops_median" in entry:
        parts.append(f"{entry['gflops_median']:9.1f} {entry['gflops_best']:9.1f}")
    else:
        parts.append(" " * 19)
    if "ratio_median" in entry:
        parts.append(f"{100 * entry['ratio_median']:6.1f}% {100 * entry['ratio_best']:6.1f}%")
    else:
        parts.append(" " * 15)
    extra = []
    if "images_per_s_median" in entry:
        extra.append(f"{entry['images_per_s_median']:.2f} img/s")
    if "target_s" in entry:
        extra.append(
            f"target <= {entry['target_s']} s: {'OK' if median <= entry['target_s'] else 'MISS'}"
        )
    if "faster_than_torch" in entry:
        extra.append(f"{entry['faster_than_torch']:.2f}x torch's attention")
    if "faster_than_point_mae" in entry:
        ratio = entry["faster_than_point_mae"]
        extra.append(
            f"{ratio:.1f}x Point-MAE's speed; target > 1: {'OK' if ratio > 1 else 'MISS'}"
        )
    for key in ("target_ratio",):
        if key in entry:
            ok = entry["ratio_median"] >= entry[key]
            extra.append(f"target >= {100 * entry[key]:.0f}%: {'OK' if ok else 'MISS'}")
    if name.startswith("pair") and "ratio_median" in entry:
        ok = entry["ratio_median"] >= TARGETS["pair_ratio"]
        extra.append(f"target >= 70%: {'OK' if ok else 'MISS'}")
    return " ".join(parts) + "  " + "; ".join(extra)


def print_table(results: dict[str, Any]) -> None:
    """Readable summary: seconds (per sample where it applies), GFLOP/s, ratio to peak."""
    print(f"musc kernel benchmarks — {RANDOM_NOTE}")
    info = results["machine"]
    print(
        f"torch {info['torch']}, CPU kind: {info['cpu_kind']}, load average "
        f"{info['load_average_start'][0]:.2f} at start, {info['load_average_end'][0]:.2f} at end"
    )
    header = f"{'kernel':<38} {'median s':>10} {'best s':>10} {'GF/s med':>9} {'GF/s best':>9}"
    print(header + f" {'%peak med':>7} {'best':>7}")
    for name, entry in results["kernels"].items():
        print(_row(name, entry))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line: output path, repeats, sample count and which sections to run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/kernels.json"))
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per kernel")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--samples", type=int, default=40, help="N for pair_distances")
    parser.add_argument("--block", type=int, default=MuscConfig().pair_block)
    parser.add_argument("--peak-sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--vit-batch", type=int, default=8)
    parser.add_argument("--snamd-samples", type=int, default=8)
    parser.add_argument("--point-batch", type=int, default=4, help="samples per extract_many")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    return parser.parse_args(argv)


def run_sections(args: argparse.Namespace, config: MuscConfig) -> tuple[dict, dict]:
    """Every selected section, with a short peak check after each one.

    Returns:
        The kernel entries and the best peak measurement seen over the whole run.
    """
    peak = bench_peak(args.peak_sizes, args.repeat)

    def peaks() -> dict[str, float]:
        return {name: peak[name]["peak_gflops"] for name in DTYPES}

    def recheck() -> None:
        nonlocal peak
        peak = merge_peaks(peak, bench_peak(args.peak_sizes[:1], 3))

    kernels: dict[str, Any] = {}
    with torch.inference_mode():
        if "pairs" in args.only:
            shapes = {"2d_784x768": (784, 768), "3d_1024x384": (1024, 384)}
            kernels.update(bench_pairs(args.samples, args.block, args.repeat, peaks(), shapes))
            recheck()
        grouped, sample = bench_grouping(config, args.repeat)
        if "grouping" in args.only:
            kernels.update(grouped)
        if "map3d" in args.only:
            kernels.update(bench_map3d(sample, config, args.repeat))
        if "snamd" in args.only:
            kernels.update(bench_snamd(sample, config, args.snamd_samples, args.repeat))
            recheck()
        if "attention" in args.only:
            kernels.update(bench_attention(args.repeat, peaks()))
            recheck()
        if "vit" in args.only:
            kernels.update(bench_vit(config, args.vit_batch, max(1, args.repeat // 2), peaks()))
            recheck()
        if "pointmae" in args.only or "fpfh" in args.only:
            samples = [sample] + [
                prepare_points(synthetic_xyz(config.image_size, seed), config)
                for seed in range(1, args.point_batch)
            ]
        if "pointmae" in args.only:
            kernels.update(bench_point_mae(samples, config, args.repeat, peaks()))
        if "fpfh" in args.only:
            reference = kernels.get("point_mae/extract/float32")
            kernels.update(bench_fpfh(samples, config, args.repeat, reference))
    peak = merge_peaks(peak, bench_peak(args.peak_sizes, args.repeat))
    return kernels, peak


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the selected benchmarks, print the table and write the JSON."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = MuscConfig()
    results: dict[str, Any] = {
        "machine": machine_info(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    kernels, peak = run_sections(args, config)
    # Other jobs only ever slow a run down: every ratio refers to the best peak seen.
    refresh_ratios(kernels, {name: peak[name]["peak_gflops"] for name in DTYPES})
    results["peak"] = peak
    results["kernels"] = {f"matmul_peak/{name}": peak[name] for name in DTYPES} | kernels
    results["machine"]["load_average_end"] = os.getloadavg()
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
